"""`flashdiff bench --op distributed`: communication vs attention time of sequence-parallel
attention as the sequence grows (flashdiff.distributed, docs/distributed.md).

Per sequence length S, on P ranks (one process each; gloo on CPUs, NCCL on GPUs), one
attention layer [1, H, S, D] timed three ways, every rank at once:

    local      flashdiff.attention over the whole sequence on one rank (the single-device step)
    ulysses    ulysses_attention on the rank's S/P tokens; apart: its two all-to-alls alone
               (comm) and the local attention over [1, H/P, S, D] alone (compute)
    ring       ring_attention on the rank's S/P tokens; apart: its P−1 K/V hops alone (comm)
               and its P block attentions + merges alone (compute)

Bytes: the formulas of communication_model (b = the dtype's size), and on gloo the bytes this
process wrote to its sockets (/proc/self/io wchar: gloo sends with write/writev) per call.
The model's time: communication_model with the link bandwidth fitted to the largest ring hop
series (bytes / comm time) and the attention rate fitted to the largest local attention, so
what it checks is the shape of the formulas across S (latency at small messages, overlap),
not the two fitted constants.

    python -m flashdiff.bench.distributed_bench [--ranks 2] [--seq-lens 256 512 1024 2048] [--json F]

starts the ranks itself (one machine: gloo on the CPU, NCCL when it has ≥ ranks GPUs); under
torchrun it runs in place (rank 0 prints and writes). Records follow the bench JSON schema
(op "distributed", preset "scaling").
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

import torch

from .core import DTYPES, SCHEMA, _sanity_tol
from .timing import Timing, measure

# per device: sequence lengths, heads, head_dim, dtype. CPU: tiny, so 2 processes on 2 cores
# finish in about a minute; GPU: a Flux-like layer (24 × 128, bf16). The ring's block attention
# materializes [H, S/P, S/P] fp32 scores unless flashdiff.attention returns lse, hence ≤ 16k.
DEFAULTS = {"cpu": dict(seq_lens=(256, 512, 1024, 2048), heads=4, head_dim=64, dtype="fp32"),
            "cuda": dict(seq_lens=(2048, 4096, 8192, 16384), heads=24, head_dim=128, dtype="bf16")}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ScalingOptions:
    ranks: int = 2
    device: Optional[str] = None                 # None: cuda when ≥ ranks GPUs, else cpu
    seq_lens: Optional[Sequence[int]] = None     # None: DEFAULTS[device]
    heads: Optional[int] = None
    head_dim: Optional[int] = None
    dtype: Optional[str] = None
    quick: bool = False
    timeout_s: float = 900.0                     # the whole launch; a rank that hangs is killed
    json_path: Optional[str] = None
    progress: Optional[Callable[[str], None]] = field(default=None, repr=False)


def _device_for(opts: ScalingOptions) -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if opts.device == "cuda" and gpus < opts.ranks:
        raise RuntimeError(f"--device cuda with {opts.ranks} ranks needs {opts.ranks} GPUs, torch sees {gpus}")
    return opts.device or ("cuda" if gpus >= opts.ranks else "cpu")


def _config(opts: ScalingOptions, device: str) -> dict:
    d = DEFAULTS[device]
    cfg = dict(device=device, ranks=opts.ranks, quick=opts.quick,
               seq_lens=list(opts.seq_lens or d["seq_lens"]), heads=opts.heads or d["heads"],
               head_dim=opts.head_dim or d["head_dim"], dtype=opts.dtype or d["dtype"])
    P = cfg["ranks"]
    if P < 2:
        raise ValueError(f"ranks must be >= 2, got {P}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    if cfg["heads"] % P:
        raise ValueError(f"heads ({cfg['heads']}) must be divisible by the ranks ({P}) for Ulysses")
    bad = [s for s in cfg["seq_lens"] if s % P or s < P]
    if bad:
        raise ValueError(f"sequence lengths must be positive multiples of the ranks ({P}), got {bad}")
    return cfg


# ================================================================== worker side
def _wchar() -> Optional[int]:
    """Bytes this process handed to write-like syscalls (sockets included), or None."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _timed(fn, device, reps, warmup, group) -> tuple[Timing, Optional[float], object]:
    """(timing, bytes written per call, last output) with the same number of calls on every rank
    (a collective series must not diverge across ranks). Timing: the slowest rank's median and
    quantiles (a parallel step waits for its slowest rank)."""
    import torch.distributed as dist

    for _ in range(warmup):
        out = fn()
    dist.barrier(group)
    w0 = _wchar()
    t = measure(fn, device, reps=reps)
    w1 = _wchar()
    out = fn()
    stats = torch.tensor([t.median_ms, t.q20_ms, t.q80_ms], dtype=torch.float64,
                         device=device if device == "cuda" else "cpu")
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    med, q20, q80 = stats.tolist()
    # socket writes are gloo's traffic; NCCL moves its bytes over NVLink / RDMA, not syscalls
    written = None if w0 is None or w1 is None or device != "cpu" else (w1 - w0) / reps
    return Timing(med, q20, q80, reps), written, out


def _ring_hops(kv, group):
    """The ring's communication alone: P−1 hops of the stacked K/V block (what _ring sends)."""
    import torch.distributed as dist

    P, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (r + 1) % P), dist.get_global_rank(group, (r - 1) % P)
    cur, buf = kv, torch.empty_like(kv)
    for _ in range(P - 1):
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, cur, nxt, group),
                                            dist.P2POp(dist.irecv, buf, prv, group)]):
            work.wait()
        cur, buf = buf, cur
    return cur


def _ring_blocks(q, k, v, P):
    """The ring's computation alone: P block attentions merged as _ring merges them (this rank's
    K/V stands in for every block: same shapes, same work)."""
    from ..distributed import _block_attention, _merge_into

    out = lse = None
    for _ in range(P):
        out, lse = _merge_into(out, lse, *_block_attention(q, k, v, None, None))
    return out.to(q.dtype)


def _measure_seq(S, cfg, group) -> List[dict]:
    """The three ways at one sequence length: records (rank 0's view, timings the max over ranks)."""
    import torch.distributed as dist

    from ..distributed import _heads_to_seq, _seq_to_heads, communication_model, ring_attention, ulysses_attention
    from ..ops.attention import attention
    from .runner import _rel_error

    P, r = dist.get_world_size(group), dist.get_rank(group)
    H, D, device, dtype = cfg["heads"], cfg["head_dim"], cfg["device"], DTYPES[cfg["dtype"]]
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    reps, warmup = (3, 1) if cfg["quick"] else (10, 2)
    g = torch.Generator().manual_seed(S)  # the same whole q, k, v on every rank
    q, k, v = (torch.randn(1, H, S, D, generator=g).to(dev, dtype) for _ in range(3))
    ql, kl, vl = (x.chunk(P, dim=2)[r].contiguous() for x in (q, k, v))
    heads = torch.randn(1, H // P, S, D, generator=g).to(dev, dtype)  # a head-sharded o to send back
    series = {
        "local": lambda: attention(q, k, v),
        "ulysses": lambda: ulysses_attention(ql, kl, vl, group),
        "ulysses comm": lambda: (_seq_to_heads(torch.stack((ql, kl, vl)), P, group), _heads_to_seq(heads, P, group)),
        "ulysses compute": lambda: attention(heads, heads, heads),
        "ring": lambda: ring_attention(ql, kl, vl, group),
        "ring comm": lambda: _ring_hops(torch.stack((kl, vl)), group),
        "ring compute": lambda: _ring_blocks(ql, kl, vl, P),
    }
    res = {}
    with torch.inference_mode():
        for name, fn in series.items():
            res[name] = _timed(fn, device, reps, warmup, group)
    elem = torch.empty((), dtype=dtype).element_size()
    model = communication_model(S, H, D, P, bytes_per_element=elem)
    flops = 4 * H * S * S * D  # the whole layer's attention
    local_out = res["local"][2].chunk(P, dim=2)[r]
    base = dict(op="distributed", preset="scaling", batch=1, case=f"S{S}", shape=f"B1 H{H} S{S} D{D} P{P}",
                dtype=cfg["dtype"], metric="TFLOP/s", seq_len=S, heads=H, head_dim=D, ranks=P)
    records = []
    for name in ("local", "ulysses", "ring"):
        t, written, out = res[name]
        rec = dict(base, backend=name, role="baseline" if name == "local" else "flashdiff", **asdict(t),
                   value=flops / (t.median_ms * 1e-3) / 1e12, fraction_of_ceiling=None)
        if name != "local":
            comm, comm_written, _ = res[f"{name} comm"]
            compute = res[f"{name} compute"][0]
            rec.update(comm_ms=comm.median_ms, compute_ms=compute.median_ms,
                       # the time not spent in attention (all of the exposed communication and packing)
                       comm_fraction=max(0.0, 1 - compute.median_ms / t.median_ms),
                       comm_alone_fraction=comm.median_ms / t.median_ms,
                       bytes_model=model[f"{name}_bytes"], bytes_written=written,
                       bytes_written_comm_only=comm_written)
            err = _rel_error(out, local_out)
            rec.update(check_rel_error=err, check="ok" if err <= _sanity_tol(dtype) else "MISMATCH")
        records.append(rec)
    return records


def _fit_model(records: List[dict]) -> dict:
    """Fit communication_model's two constants (link GB/s from the largest ring hop series,
    attention TFLOP/s from the largest local attention) and add each row's modelled times."""
    from ..distributed import communication_model

    if not records:
        return {}
    S = max(r["seq_len"] for r in records)
    ring = next(r for r in records if r["seq_len"] == S and r["backend"] == "ring")
    local = next(r for r in records if r["seq_len"] == S and r["backend"] == "local")
    fit = {"link_gbytes_per_s": ring["bytes_model"] / (ring["comm_ms"] * 1e-3) / 1e9,
           "attention_tflops": local["value"], "fitted_at_seq_len": S}
    for r in records:
        if r["backend"] == "local":
            continue
        m = communication_model(r["seq_len"], r["heads"], r["head_dim"], r["ranks"], DTYPES[r["dtype"]].itemsize,
                                fit["link_gbytes_per_s"], fit["attention_tflops"])
        r["model_ms"] = m[f"{r['backend']}_s"] * 1e3
        r["comm_model_ms"] = r["bytes_model"] / (fit["link_gbytes_per_s"] * 1e9) * 1e3
        r["compute_model_ms"] = m["attention_s"] * 1e3
        if r.get("bytes_written") is not None:
            r["bytes_written_vs_model"] = r["bytes_written"] / r["bytes_model"]
    return fit


def run_worker(cfg: dict, say=None) -> Optional[dict]:
    """Every rank, in an initialized default group: measure every sequence length; rank 0
    returns {"records", "fit"}, the others None."""
    import torch.distributed as dist

    if cfg["device"] == "cpu":
        torch.set_num_threads(1)  # one core per rank, as one GPU per rank
    records = []
    for S in cfg["seq_lens"]:
        records += _measure_seq(S, cfg, dist.group.WORLD)
        if say and dist.get_rank() == 0:
            say(f"  S={S}: done")
    if dist.get_rank() != 0:
        return None
    return {"records": records, "fit": _fit_model(records)}


def _init(cfg, timeout_s=120.0):
    import torch.distributed as dist

    if cfg["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def _worker_main(cfg_path: str, out_path: str) -> None:
    import torch.distributed as dist

    with open(cfg_path) as f:
        cfg = json.load(f)
    _init(cfg)
    try:
        out = run_worker(cfg)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no destroy_process_group: it would wait for peers that may be gone
    if out is not None:
        with open(out_path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


# ================================================================== launcher side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg: dict, timeout_s: float) -> dict:
    """Start cfg["ranks"] worker processes on this machine; rank 0's output, or an error with
    the failing rank's log. Kills every rank past timeout_s."""
    P = cfg["ranks"]
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "out.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        procs, logs = [], []
        for rank in range(P):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(P), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
            logs.append(open(os.path.join(tmp, f"rank{rank}.log"), "w+"))
            cmd = [sys.executable, "-m", "flashdiff.bench.distributed_bench", "--worker", cfg_path, out_path]
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        t0 = time.monotonic()
        try:
            for p in procs:
                p.wait(timeout=max(0.1, timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            hung = [p for p in procs if p.poll() is None]
            for p in hung:
                p.kill()
                p.wait()
        for rank, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            text = log.read()
            log.close()
            if hung:
                raise RuntimeError(f"distributed bench: {len(hung)} rank(s) still running after {timeout_s:.0f} s "
                                   f"(killed); rank {rank}'s log:\n{text[-3000:]}")
            if p.returncode != 0:
                raise RuntimeError(f"distributed bench: rank {rank} exited with {p.returncode}:\n{text[-3000:]}")
        with open(out_path) as f:
            return json.load(f)


def run_scaling(opts: ScalingOptions) -> dict:
    """The scaling case on opts.ranks processes of this machine; the result in the bench JSON
    schema (written to opts.json_path when given)."""
    from .report import write_json

    say = opts.progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = _device_for(opts)
    cfg = _config(opts, device)
    t0 = time.perf_counter()
    say(f"distributed scaling: {cfg['ranks']} ranks ({'NCCL' if device == 'cuda' else 'gloo'}, {device}), "
        f"S = {', '.join(map(str, cfg['seq_lens']))}, H {cfg['heads']}, D {cfg['head_dim']}, {cfg['dtype']} ...")
    out = _launch(cfg, opts.timeout_s)
    result = _result(cfg, out, time.perf_counter() - t0)
    if opts.json_path:
        write_json(result, opts.json_path)
    return result


def _result(cfg, out, wall_s) -> dict:
    from .machine import machine_info
    from .runner import _add_ratios

    records = out["records"]
    for S in cfg["seq_lens"]:  # speedup of ulysses / ring against local attention
        _add_ratios([r for r in records if r["seq_len"] == S])
    from ..distributed import FUSED_PARTIALS

    meta = machine_info(cfg["device"])
    meta.update(ops=["distributed"], argv=sys.argv[1:], quick=cfg["quick"], ranks=cfg["ranks"],
                process_group="nccl" if cfg["device"] == "cuda" else "gloo",
                ring_partials="flashdiff.attention(return_lse=True) + flashdiff.merge_attention" if FUSED_PARTIALS
                else "torch reference (attention_with_lse + merge_attention)",
                torch_threads=1 if cfg["device"] == "cpu" else meta["torch_threads"])
    return {"schema": SCHEMA, "meta": meta, "ceilings": {}, "model_fit": out["fit"], "results": records,
            "wall_s": round(wall_s, 1)}


def format_scaling(result: dict) -> str:
    """The printed table: per S, local vs ulysses vs ring, the communication share, bytes."""
    meta, fit = result.get("meta", {}), result.get("model_fit", {})
    recs = [r for r in result.get("results", []) if r["op"] == "distributed"]
    if not recs:
        return "no distributed records"
    lines = [f"== distributed scaling: {meta.get('ranks')} ranks, {meta.get('process_group')}, "
             f"{meta.get('card') or meta.get('cpu')}, H {recs[0]['heads']}, D {recs[0]['head_dim']}, {recs[0]['dtype']}",
             f"model fitted at S={fit.get('fitted_at_seq_len')}: link {fit.get('link_gbytes_per_s', 0):.2f} GB/s, "
             f"attention {fit.get('attention_tflops', 0):.4f} TFLOP/s"]
    header = (f"{'S':>6s} {'method':8s} {'median ms':>10s} {'vs local':>8s} {'comm ms':>8s} {'compute':>8s} "
              f"{'comm %':>7s} {'model ms':>9s} {'bytes (formula)':>16s} {'bytes written':>14s} check")
    lines += [header, "-" * len(header)]
    for r in recs:
        if r["backend"] == "local":
            lines.append(f"{r['seq_len']:6d} {'local':8s} {r['median_ms']:10.3f}")
            continue
        bw = r.get("bytes_written")
        lines.append(f"{'':6s} {r['backend']:8s} {r['median_ms']:10.3f} {r.get('speedup_vs_best_baseline', 0):7.2f}x "
                     f"{r['comm_ms']:8.3f} {r['compute_ms']:8.3f} {100 * r['comm_fraction']:6.1f}% "
                     f"{r.get('model_ms', float('nan')):9.3f} {r['bytes_model']:16,.0f} "
                     f"{'—' if bw is None else format(bw, ',.0f'):>14s} {r.get('check', '')}")
    lines.append("comm %: 1 − compute/total (exposed communication and packing); comm ms: the collectives alone; "
                 "bytes written: /proc/self/io wchar per call (gloo)")
    return "\n".join(lines)


# ================================================================== command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths (default: per device)")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the ranks are killed")
    p.add_argument("--json", help="write the records to this file")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        _worker_main(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(prog="python -m flashdiff.bench.distributed_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    opts = ScalingOptions(ranks=args.ranks, device=args.device, seq_lens=args.seq_lens, heads=args.heads,
                          head_dim=args.head_dim, dtype=args.dtype, quick=args.quick, timeout_s=args.timeout,
                          json_path=args.json)
    if all(v in os.environ for v in TORCHRUN_ENV):  # under torchrun: this process is one rank
        import torch.distributed as dist

        cfg = _config(ScalingOptions(**{**asdict(opts), "ranks": int(os.environ["WORLD_SIZE"]), "progress": None}),
                      "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        _init(cfg, args.timeout)
        t0 = time.perf_counter()
        out = run_worker(cfg)
        dist.destroy_process_group()
        if out is None:
            return 0
        result = _result(cfg, out, time.perf_counter() - t0)
        if args.json:
            from .report import write_json
            write_json(result, args.json)
    else:
        result = run_scaling(opts)
    print(format_scaling(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
