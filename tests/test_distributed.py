"""flashdiff.distributed on CPU with gloo: Ulysses, ring and USP attention against the reference
(DESIGN.md tolerance rule), parallel DiT sampling against the single-process sample (also
through `flashdiff sample --parallel` under torchrun), and a failing rank that must end the run
instead of hanging.

Each multi-process test launches this file as a script on N processes with torchrun's
environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE): `python tests/test_distributed.py
CASE`. A case runs many checks in one process group, since starting processes dominates.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch

RUN_BOUND_S = 150  # wall-clock bound on a launch (gloo's own timeout, per collective, is 60 s)


# ================================================================== launcher (parent side)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(case: str, nprocs: int, bound_s: float = RUN_BOUND_S):
    """Run CASE on nprocs processes; returns [(returncode, output)] per rank and the seconds
    taken. Kills everything and fails if the run outlives bound_s."""
    port = _free_port()
    logs, procs = [], []
    t0 = time.monotonic()
    for rank in range(nprocs):
        log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), case], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=max(0.1, bound_s - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{case} on {nprocs} processes did not end within {bound_s} s (a hang)")
    finally:
        for p in procs:
            p.wait()
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read()))
    return results, time.monotonic() - t0


def _run_ok(case, nprocs):
    results, seconds = _launch(case, nprocs)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"{case}: rank {rank} exited with {rc}:\n{out[-6000:]}"
    return seconds


# ================================================================== the tests
# one launch per world size: process start-up (torch + flashdiff imports) dominates
def test_attention_dit_sampling_and_bench_2_ranks():
    _run_ok("attention,dit,bench", 2)


def test_attention_and_dit_sampling_4_ranks():
    _run_ok("attention,dit", 4)


def test_a_failing_rank_ends_the_run():
    """Rank 1 raises on bad input while rank 0 already waits in the all-to-all: rank 1 exits with
    the error, rank 0 with an error (gloo sees the peer go), well before any timeout."""
    results, seconds = _launch("fail", 2, bound_s=45)
    (rc0, out0), (rc1, out1) = results
    assert rc1 != 0 and "attn_mask must be a bool key-padding mask" in out1, out1[-3000:]
    assert rc0 != 0, f"rank 0 should fail once its peer is gone:\n{out0[-3000:]}"
    assert seconds < 45


SAMPLE_ARGS = ["sample", "--model", "digits-dit", "--steps", "4", "--labels", "0,1,2", "--seed", "0", "--guidance", "3"]


def _torchrun_sample(plan: str, out: str) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m flashdiff sample --parallel plan`, in its own session
    (so a hang can be killed with every worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flashdiff",
           *SAMPLE_ARGS, "--out", out, "--grid", out + ".png", "--parallel", plan, "--dist-timeout", "60"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sample_command_under_torchrun_matches_one_process(tmp_path):
    """The issue's bar: `flashdiff sample --parallel cfg=2` and `--parallel ulysses=2` on 2
    torchrun ranks write the samples of a single-process run within 1e-5 (fp32); rank 0 alone
    writes. The two launches run side by side (process start-up dominates)."""
    import numpy as np

    from flashdiff.cli import main

    threads = torch.get_num_threads()
    try:  # the single-process run in this process: no second start-up
        assert main([*SAMPLE_ARGS, "--out", str(tmp_path / "single.npz"), "--grid", "", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    single = np.load(tmp_path / "single.npz")
    plans = ("cfg=2", "ulysses=2")
    runs = {plan: _torchrun_sample(plan, str(tmp_path / f"{plan.replace('=', '')}.npz")) for plan in plans}
    deadline = time.monotonic() + 100
    try:
        outputs = {plan: p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for plan, p in runs.items()}
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not end within 100 s (a hang)")
    finally:
        for p in runs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for plan, p in runs.items():
        assert p.returncode == 0, f"--parallel {plan}: torchrun exited with {p.returncode}:\n{outputs[plan][-6000:]}"
        got = np.load(tmp_path / f"{plan.replace('=', '')}.npz")
        assert (got["labels"] == single["labels"]).all()
        err = float(np.abs(got["images"] - single["images"]).max())
        assert err <= 1e-5, f"--parallel {plan}: samples differ from the single-process run by {err:.2e}"
        assert outputs[plan].count("3 samples (digits-dit") == 1, outputs[plan]  # rank 0 alone reports
        assert (tmp_path / f"{plan.replace('=', '')}.npz.png").exists()


def test_sample_parallel_refusals(monkeypatch, capsys):
    """--parallel without torchrun's environment, or with degrees that do not multiply to the
    world size, stops before any process group exists."""
    from flashdiff.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="runs one process per rank under torchrun"):
            main([*SAMPLE_ARGS, "--parallel", "cfg=2"])
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "1")
        with pytest.raises(SystemExit, match="must multiply to the world size"):
            main([*SAMPLE_ARGS, "--parallel", "ulysses=2,cfg=2"])
        with pytest.raises(SystemExit, match="needs a DiT"):
            main(["sample", "--model", "digits-unet", "--parallel", "cfg=2"])
        with pytest.raises(SystemExit):  # argparse: unknown degree
            main([*SAMPLE_ARGS, "--parallel", "tensor=2"])
        assert "--parallel takes ulysses=N,ring=N,cfg=N" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_merge_attention_matches_whole_attention():
    """Blocks of keys merged by log-sum-exp equal attention over all keys (fp64 reference), with
    a row that has no key in one block and a row with no key at all."""
    from flashdiff import reference
    from flashdiff.distributed import attention_with_lse, merge_attention

    B, H, Sq, Skv, D = 2, 3, 5, 11, 8
    q, k, v = (torch.randn(B, H, s, D) for s in (Sq, Skv, Skv))
    mask = torch.rand(B, Skv) > 0.3
    mask[0, :4] = False      # batch 0: nothing in the first block
    mask[1, :] = False       # batch 1: no key at all
    parts = [attention_with_lse(q, k[:, :, s], v[:, :, s], mask[:, s]) for s in (slice(0, 4), slice(4, Skv))]
    out, lse = merge_attention([o for o, _ in parts], [l for _, l in parts])
    ref = reference.attention(q, k, v, mask[:, None, None, :], upcast=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    _, whole_lse = attention_with_lse(q, k, v, mask)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=0)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all() and not out.isnan().any()
    # +inf (FlashAttention-2's empty-row lse) counts as an empty block too
    o2, l2 = merge_attention([out, torch.randn_like(out)], [lse, torch.full_like(lse, float("inf"))])
    torch.testing.assert_close(o2, out)


def test_merge_attention_rejects_mismatched_lists():
    from flashdiff.distributed import merge_attention

    with pytest.raises(ValueError, match="outs and lses"):
        merge_attention([torch.zeros(1, 1, 1, 1)], [])


def test_communication_model():
    """The formulas of docs/distributed.md: equal bytes at 2 ranks, ring/Ulysses = P/2 beyond."""
    from flashdiff.distributed import communication_model

    M = 4608 * 24 * 128 * 2
    for P in (2, 4, 8):
        m = communication_model(4608, 24, 128, P)
        assert m["ulysses_bytes"] == pytest.approx(4 * M * (P - 1) / P**2)
        assert m["ring_bytes"] / m["ulysses_bytes"] == pytest.approx(P / 2)
    assert communication_model(4608, 24, 128, 2)["ring_wins_above_seq_len"] == 0


def test_not_initialized_is_an_error():
    import torch.distributed as dist
    from flashdiff.distributed import ulysses_attention

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="not initialized"):
        ulysses_attention(q, q, q)


# ================================================================== worker side
def _references(q, k, v, mask):
    """The two outputs DESIGN.md's rule compares with: the fp64 reference and the reference run
    in the inputs' dtype, both of the whole (unsharded) inputs."""
    from flashdiff import reference

    m = None if mask is None else mask[:, None, None, :]
    ref = reference.attention(q, k, v, m, upcast=torch.float64)
    in_dtype = reference.attention(q, k, v, m, upcast=False).to(q.dtype)
    return ref, in_dtype


def _shard(x, P, i, dim=2):
    return x.chunk(P, dim=dim)[i]


def _case_attention():
    import torch.distributed as dist
    from flashdiff import testing
    from flashdiff.distributed import ring_attention, ulysses_attention, usp_attention, usp_groups

    P, r = dist.get_world_size(), dist.get_rank()
    world = dist.group.WORLD
    ug, rg = usp_groups(2, P // 2)
    methods = {"ring": lambda q, k, v, m: ring_attention(q, k, v, world, attn_mask=m)}
    methods["ulysses"] = lambda q, k, v, m: ulysses_attention(q, k, v, world, attn_mask=m)
    if P == 4:  # on 2 ranks usp(2, 1) is Ulysses
        methods["usp"] = lambda q, k, v, m: usp_attention(q, k, v, ug, rg, attn_mask=m)
    # local lengths 3 and 5 (odd; S divisible by P), Sq != Skv (joint tokens vs a longer key set)
    shapes = [(2, 4, 3 * P, 3 * P, 16), (1, 4, 3 * P, 5 * P, 40)]
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, Sq, Skv, D in shapes:
            for masked in (False, True):
                g = torch.Generator().manual_seed(Sq * 100 + Skv)  # same full inputs on every rank
                q, k, v = (torch.randn(B, H, s, D, generator=g).to(dtype) for s in (Sq, Skv, Skv))
                mask = None
                if masked:
                    mask = torch.rand(B, Skv, generator=g) > 0.4
                    mask[0, : Skv // P] = False   # rank 0's keys all padded out in batch 0
                    if B > 1:
                        mask[1] = False           # batch 1: no key at all -> zeros
                ref, in_dtype = _references(q, k, v, mask)
                for name, fn in methods.items():
                    local_mask = None if mask is None else _shard(mask, P, r, dim=1)[:, None, None, :]
                    y = fn(_shard(q, P, r), _shard(k, P, r), _shard(v, P, r), local_mask)
                    assert y.dtype == dtype and y.shape == _shard(q, P, r).shape
                    testing.assert_close(y, _shard(ref, P, r), _shard(in_dtype, P, r),
                                         f"{name} P={P} {dtype} {(B, H, Sq, Skv, D)} mask={masked}")
    # refusals, identical on every rank (shapes are the same everywhere: no rank waits)
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible by the Ulysses degree"):
        ulysses_attention(q, q, q, world)
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(TypeError, match="attn_mask must be a bool"):
        ring_attention(q, q, q, world, attn_mask=torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="attn_mask must be a key-padding mask"):
        ulysses_attention(q, q, q, world, attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        ring_attention(q, q, q, group="world")
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ulysses_attention(q, q, q[:, :, :2], world)
    with pytest.raises(TypeError, match="k has dtype"):
        usp_attention(q, q.double(), q, ug, rg)


def _sample(model, labels, **kw):
    from flashdiff.sampling import make_scheduler, sample

    return sample(model, make_scheduler("ddim", model=model), labels, num_inference_steps=6, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), progress=False, **kw)


def _case_dit():
    import torch.distributed as dist
    from flashdiff.distributed import parallelize, sample_data_parallel, unparallelize
    from flashdiff.models import DiT, load_pretrained
    from flashdiff.sampling import make_scheduler, sample

    P = dist.get_world_size()
    model = load_pretrained("digits-dit")
    labels = torch.arange(3)
    single = _sample(model, labels)
    # digits-dit: 16 tokens, 2 heads. 4 ranks: cfg x Ulysses, cfg x ring, USP
    plans = [dict(cfg=2), dict(ulysses=2), dict(ring=2)] if P == 2 else [dict(cfg=2, ulysses=2), dict(cfg=2, ring=2),
                                                           dict(ulysses=2, ring=2)]
    for plan in plans:
        par = parallelize(model, **plan)
        got = _sample(par, labels)
        err = (got - single).abs().max().item()
        assert err <= 1e-5, f"{plan}: parallel sample differs from the single-process one by {err:.2e}"
        assert unparallelize(par) is model and "forward" not in vars(model.blocks[0].attn)
    # tokens that do not shard evenly: 9 tokens padded to a multiple of the degree (masked keys);
    # with cross-attention to (masked) context tokens, which every rank holds whole
    torch.manual_seed(0)
    odd = DiT(input_size=6, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10,
              context_dim=8).eval()
    for block in odd.blocks:  # adaLN-Zero starts as identity: give the blocks something to do
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    torch.nn.init.normal_(odd.final_layer.linear.weight, std=0.2)
    x, t, y = torch.randn(2, 1, 6, 6), torch.tensor([10, 500]), torch.tensor([1, 10])
    ctx, ctx_mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        want = odd(x, t, y, ctx, ctx_mask)
        for plan in ([dict(ring=2), dict(ulysses=2)] if P == 2 else [dict(ring=4), dict(ulysses=2, ring=2)]):
            par = parallelize(odd, **plan)
            torch.testing.assert_close(par(x, t, y, ctx, ctx_mask), want, atol=1e-5, rtol=0, msg=f"{plan}")
            unparallelize(par)
    with pytest.raises(ValueError, match="must equal the group size"):
        parallelize(model, ulysses=P, cfg=2)
    if P == 4:
        with pytest.raises(ValueError, match=r"heads \(2\) must be divisible by the Ulysses degree"):
            parallelize(model, ulysses=4)
    with pytest.raises(ValueError, match="already parallelized"):
        par = parallelize(model, cfg=P)
        parallelize(model, cfg=P)
    unparallelize(par)
    # data parallel: 5 labels over P ranks, rank i's chunk drawn with seed 7 + i
    labels = torch.arange(5)
    got = sample_data_parallel(model, make_scheduler("ddim", model=model), labels, seed=7, num_inference_steps=4,
                               guidance_scale=3.0, progress=False)
    chunks = torch.tensor_split(labels, P)
    want = torch.cat([sample(model, make_scheduler("ddim", model=model), c, num_inference_steps=4, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(7 + i), progress=False)
                      for i, c in enumerate(chunks)])
    assert got.shape == (5, 1, 8, 8)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _case_bench():
    """The scaling bench's worker at tiny sizes: records in the bench schema, outputs that agree
    with local attention, and gloo's bytes on the wire equal to docs/distributed.md's formulas
    (plus gloo's message headers: under 200 bytes per collective)."""
    import torch.distributed as dist
    from flashdiff.bench import distributed_bench as db

    out = db.run_worker(db._config(db.ScalingOptions(ranks=dist.get_world_size(), seq_lens=(64, 128), quick=True),
                                   "cpu"))
    if dist.get_rank() != 0:
        assert out is None
        return
    recs = out["records"]
    methods = ("local", "ulysses", "ring")
    assert [(r["seq_len"], r["backend"]) for r in recs] == [(s, b) for s in (64, 128) for b in methods]
    for r in recs:
        assert r["op"] == "distributed" and r["median_ms"] > 0 and r["value"] > 0
        if r["backend"] != "local":
            assert r["check"] == "ok", r
            assert 0 <= r["bytes_written"] - r["bytes_model"] < 2 * 200, r  # Ulysses: 2 all-to-alls, ring: 1 hop
            assert r["model_ms"] > 0 and 0 <= r["comm_fraction"] <= 1
    assert out["fit"]["fitted_at_seq_len"] == 128


def _case_fail():
    import torch.distributed as dist
    from flashdiff.distributed import ulysses_attention

    q = torch.randn(1, 2, 4, 8)
    bad = torch.zeros(1, 1, 1, 4) if dist.get_rank() == 1 else None  # rank 1 alone gets a float mask
    ulysses_attention(q, q, q, attn_mask=bad)


def _worker(cases: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        for case in cases.split(","):
            {"attention": _case_attention, "dit": _case_dit, "bench": _case_bench, "fail": _case_fail}[case]()
    except BaseException:
        # exit now, without destroy_process_group (which would wait for the peers): closing the
        # sockets is what tells the other ranks this one is gone
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
