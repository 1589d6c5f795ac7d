"""GroupNorm + SiLU (+ AdaGN scale/shift): flashdiff backends vs F.silu(F.group_norm(x)) eager,
torch.compile of the reference (with --fd-compile; on by default on a GPU), and a plain copy of x.
Rate: GB/s counting read x + write y (+ parameters); ceiling: the measured copy bandwidth."""
OP = "group_norm"


def test_group_norm(bench_row):
    bench_row()
