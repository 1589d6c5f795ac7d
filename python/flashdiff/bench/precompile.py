"""Parallel warm-up of the Triton attention kernels before `flashdiff tune` times them.

Tuning one Triton attention class compiles every candidate config of every Triton variant
("triton", "triton:v2", "triton:tma": up to 9 configs each) before timing it, one compile
after another in the tuning process; on a GPU machine with many cores that leaves most of them
idle while the tune's time budget runs out. Here worker processes (spawned: each has its own
CUDA context) each take one (shape class, dtype, variant) and launch every candidate once, no
timing, which compiles them into Triton's on-disk cache. The tuner's compiles that follow are
cache hits; the timings themselves still happen in the tuning process, one at a time.

A warm-up that fails (a config that does not fit, a worker that dies) costs nothing but its
time: the tuner compiles and judges that config itself afterwards.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Task = Tuple[int, str, str, bool, Optional[Tuple[str, ...]], Optional[Tuple[int, ...]], str]


def default_workers() -> int:
    """One worker per core up to 16 (each holds a CUDA context, ~0.5 GB of device memory)."""
    return max(1, min(16, os.cpu_count() or 1))


def triton_attention_impls() -> List[str]:
    """The registered attention implementations that run Triton kernels."""
    from ..backends import REGISTRY

    return [name for name in REGISTRY["attention"][0].impls if name.split(":")[0] == "triton"]


def tasks(quick: bool, device: str, dtypes: Sequence[str], presets: Optional[Sequence[str]] = None,
          batches: Optional[Sequence[int]] = None) -> List[Task]:
    """One task per (attention shape class of the tune, dtype, Triton variant)."""
    from .tune import shape_classes

    n = len(shape_classes("attention", quick, device, presets, batches))
    pre = tuple(presets) if presets else None
    bat = tuple(batches) if batches else None
    return [(i, dt, impl, quick, pre, bat, device) for i in range(n) for dt in dtypes
            for impl in triton_attention_impls()]


def _launch_once(launch) -> float:
    """Stands in for the tuner's timing: one launch compiles (and runs) the config; 0.0, or inf
    when the config does not fit this GPU."""
    from .. import _ext

    attention = _ext.load_triton()[0].attention
    try:
        launch()
    except attention._CONFIG_ERRORS:
        return float("inf")
    return 0.0


def run_task(task: Task) -> Tuple[str, str, float, Optional[str]]:
    """Launch every candidate config of one variant on one class's inputs: (label, variant,
    seconds, error or None). Runs in a worker process, or inline (tests)."""
    from .. import _ext
    from ..backends import REGISTRY
    from .core import DTYPES, _first_line
    from .tune import _call, shape_classes

    index, dt, impl, quick, presets, batches, device = task
    t0 = time.perf_counter()
    label, make = shape_classes("attention", quick, device, presets, batches)[index]
    attention = _ext.load_triton()[0].attention
    tuned = attention.tuned_configs()
    try:
        g = torch.Generator(device=device).manual_seed(0)
        inp = make(DTYPES[dt], torch.device(device), g)
        with attention.tuning(timer=_launch_once), torch.inference_mode():
            _call("attention", REGISTRY["attention"][0].impls[impl], inp)()
        if device == "cuda":
            torch.cuda.synchronize()
        err = None
    except Exception as e:  # noqa: BLE001 - reported; the tuner meets the same error itself
        err = _first_line(e)
    finally:
        attention.load_tuned_configs(tuned, replace=True)  # warm-up choices are not measurements
    return f"{label} {dt}", impl, round(time.perf_counter() - t0, 2), err


def precompile(quick: bool, dtypes: Sequence[str], presets: Optional[Sequence[str]] = None,
               batches: Optional[Sequence[int]] = None, workers: Optional[int] = None,
               device: str = "cuda", say: Callable[[str], None] = print,
               time_budget_s: Optional[float] = None) -> List[tuple]:
    """Warm Triton's cache for every attention class the tune will time. workers=0 runs the
    tasks in this process (a check of the machinery; no parallelism). After time_budget_s no
    new task starts (those running finish); what was not warmed is compiled by the tuner."""
    todo = tasks(quick, device, dtypes, presets, batches)
    if not todo:
        return []
    workers = default_workers() if workers is None else workers
    t0 = time.perf_counter()
    say(f"precompiling Triton attention: {len(todo)} (class, dtype, variant) warm-ups on "
        f"{workers or 'no'} worker process{'es' if workers != 1 else ''}")
    deadline = t0 + time_budget_s if time_budget_s is not None else None
    if workers == 0:
        done = []
        for t in todo:
            if deadline is not None and time.perf_counter() > deadline:
                break
            done.append(run_task(t))
    else:
        ctx = multiprocessing.get_context("spawn")  # a forked CUDA context is unusable
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            futures = [pool.submit(run_task, t) for t in todo]
            wait(futures, timeout=None if deadline is None else max(0.0, deadline - time.perf_counter()))
            for f in futures:
                f.cancel()  # not started yet: dropped; running: finishes
            wait(futures)
            done = [f.result() for f in futures if not f.cancelled()]
    failed = [d for d in done if d[3]]
    skipped = len(todo) - len(done)
    say(f"  precompile took {time.perf_counter() - t0:.1f} s"
        + (f"; {skipped} warm-ups not started (time budget)" if skipped else "")
        + "".join(f"\n  {label} {impl}: {err}" for label, impl, _, err in failed))
    return done
