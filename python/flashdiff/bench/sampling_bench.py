"""Sampling measurements: the fused DDIM step against diffusers', and whole digit-model
sampling runs, auto against the reference backend (CPU, interleaved, same process).

    python -m flashdiff.bench.sampling_bench bench-step [--threads 1]
    python -m flashdiff.bench.sampling_bench bench-unet [--model digits-unet]

(`python -m flashdiff.sampling bench-step` still works: it forwards here.) Moved out of
flashdiff.sampling so that the sampling API does not carry benchmark code.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

from ..sampling import make_scheduler, sample, timed
from ..schedulers import DDIMScheduler

__all__ = ["bench_scheduler_step", "bench_unet_sampling", "main"]


def bench_scheduler_step(shape=(2, 4, 64, 64), steps: int = 50, repeats: int = 21, threads: int = 1) -> dict:
    """Median µs per DDIM step (whole 50-step schedules, fp32, CPU): flashdiff's fused
    DDIMScheduler vs diffusers' DDIMScheduler, same inputs, same process, runs interleaved so
    a change of machine load hits both."""
    import diffusers

    torch.set_num_threads(threads)
    x, m = torch.randn(shape), torch.randn(shape)
    scheds = {"diffusers": diffusers.DDIMScheduler(), "flashdiff": DDIMScheduler()}
    runs = {name: [] for name in scheds}
    for name, sched in scheds.items():
        sched.set_timesteps(steps)
        for t in list(sched.timesteps)[:10]:  # warm-up
            sched.step(m, t, x)
    for _ in range(repeats):
        for name, sched in scheds.items():
            ts = list(sched.timesteps)
            t0 = time.perf_counter()
            for t in ts:
                sched.step(m, t, x)
            runs[name].append((time.perf_counter() - t0) / len(ts) * 1e6)
    out = {name: float(np.median(r)) for name, r in runs.items()}
    out["speedup"] = out["diffusers"] / out["flashdiff"]
    return out


def bench_unet_sampling(model_name: str = "digits-unet", per_label: int = 10, steps: int = 50,
                        guidance: float = 3.0, repeats: int = 2, threads: int = 1) -> dict:
    """Seconds to sample 10×per_label digits (DDIM, CFG), backend auto vs reference,
    interleaved repeats, best of each."""
    from ..models import load_pretrained

    torch.set_num_threads(threads)
    labels = torch.arange(10).repeat_interleave(per_label)
    best = {"auto": math.inf, "reference": math.inf}
    for _ in range(repeats):
        for backend in best:
            be = None if backend == "auto" else backend
            model = load_pretrained(model_name, backend=be)
            _, sec = timed(sample, model, make_scheduler("ddim", be, model), labels, steps, guidance,
                           generator=torch.Generator().manual_seed(0), progress=False)
            best[backend] = min(best[backend], sec)
    best["speedup"] = best["reference"] / best["auto"]
    return best


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m flashdiff.bench.sampling_bench", description="sampling measurements")
    p.add_argument("what", choices=["bench-step", "bench-unet"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="digits-unet")
    args = p.parse_args(argv)
    if args.what == "bench-step":
        r = bench_scheduler_step(threads=args.threads)
        print(f"DDIM step [2, 4, 64, 64] fp32: diffusers {r['diffusers']:.1f} us, flashdiff {r['flashdiff']:.1f} us "
              f"-> {r['speedup']:.2f}x")
    else:
        r = bench_unet_sampling(args.model, threads=args.threads)
        print(f"{args.model}, 100 digits, 50 DDIM steps, CFG 3: auto {r['auto']:.2f}s, reference "
              f"{r['reference']:.2f}s -> {r['speedup']:.2f}x")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
