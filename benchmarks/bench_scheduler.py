"""Sampler step (DDIM + CFG; flow-matching Euler for FLUX): flashdiff's fused update vs the
eager torch expression, diffusers' scheduler step, and torch.compile of the eager expression.
Rate: GB/s counting the latents read and written; ceiling: the measured copy bandwidth."""
OP = "scheduler"


def test_scheduler_step(bench_row):
    bench_row()
