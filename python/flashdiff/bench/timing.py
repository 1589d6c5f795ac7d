"""Timing (median and 20/80 % quantiles after a warm-up) and the ceilings a run is measured
against (copy bandwidth, matmul rate)."""
from __future__ import annotations

import ctypes
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

def steady_host_allocator() -> str:
    """Keep glibc from handing freed heap memory back to the OS between timed calls; returns
    what was set, for the results' metadata.

    By default glibc serves large allocations with fresh mmaps and trims the heap top after
    frees, adjusting both thresholds as a program runs. An op whose outputs cross them (tens of
    MB at SD shapes) then pays a page fault per 4 KiB on every call, depending on what ran
    before it: torch eager `F.silu(F.group_norm(x))` on [2, 320, 64, 64] fp32 measured 7 ms
    (1400 faults per call) in one order of cases and 0.6 ms in another. A long-running program
    settles into the no-fault state by itself; the bench sets it up front so that every row,
    baselines included, is timed in it (allocations over 32 MiB, glibc's cap, still map)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc <malloc.h>
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1 and libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "default (not glibc)"


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    # Distinct data pointers of the tensor the timed calls returned (CPU loop only; None
    # otherwise). 2 means the allocator alternated two output blocks: a larger cache
    # footprint, and on a CPU a slower mode of the same code (see steady_host_allocator).
    output_buffers: Optional[int] = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _loop_timing(fn: Callable, device: str, warmup_s: float, budget_s: float, min_reps: int,
                 max_reps: int) -> Timing:
    """Time each call on its own (perf_counter; synchronized on CUDA)."""
    start = time.perf_counter()
    if warmup_s > 0:
        fn()
        _sync(device)
    while time.perf_counter() - start < warmup_s:
        fn()
        _sync(device)
    times: List[float] = []
    buffers = set()
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if isinstance(out, torch.Tensor) and device == "cpu":
            buffers.add(out.data_ptr())
        del out  # freed before the next call, as when the result is not kept
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times),
                  len(buffers) or None)


def measure(fn: Callable, device: str, quick: bool = False, *, reps: Optional[int] = None) -> Timing:
    """Median and 20/80 % quantiles of fn() in milliseconds, after a warm-up.

    CUDA: triton.testing.do_bench (L2 flushed between calls). CPU, or `reps` given (long calls
    such as whole sampling loops, already warmed up by the caller): a perf_counter loop,
    synchronized on CUDA.
    """
    if reps is not None:
        return _loop_timing(fn, device, 0.0, 0.0, reps, reps)
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            warmup, rep = (10, 40) if quick else (25, 100)
            med, q20, q80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            return Timing(float(med), float(q20), float(q80), -1)  # do_bench does not say how many
        return _loop_timing(fn, device, 0.05, 0.1 if quick else 0.4, 10, 1000)
    if quick:
        return _loop_timing(fn, device, 0.02, 0.25, 5, 400)
    return _loop_timing(fn, device, 0.1, 1.0, 10, 2000)


# ------------------------------------------------------------------ ceilings
def measure_ceilings(device: str, quick: bool = False) -> Dict[str, Any]:
    """Copy bandwidth (GB/s) and matmul rate (TFLOP/s), once per run."""
    out: Dict[str, Any] = {}
    if device == "cuda":
        n = (256 if quick else 1024) * 2**20
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), device, quick)
        out.update(copy_gbps=2 * n / t.median_ms / 1e6, copy_bytes=n,
                   copy_what=f"device-to-device copy of {n // 2**20} MiB (read + write)")
        del src, dst
        m = 4096 if quick else 8192
        a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        t = measure(lambda: a @ b, device, quick)
        out.update(matmul_tflops=2 * m**3 / t.median_ms / 1e9, matmul_dtype="bf16",
                   matmul_what=f"bf16 matmul {m}×{m}×{m}")
        del a, b
        torch.cuda.empty_cache()
    else:
        n = (64 if quick else 256) * 2**20
        src = torch.rand(n // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch outside the timing
        t = measure(lambda: dst.copy_(src), device, quick)
        out.update(copy_gbps=2 * n / t.median_ms / 1e6, copy_bytes=n,
                   copy_what=f"CPU copy of {n // 2**20} MiB (read + write)")
        m = 1024 if quick else 2048
        a, b = torch.randn(m, m), torch.randn(m, m)
        t = measure(lambda: a @ b, device, quick)
        out.update(matmul_tflops=2 * m**3 / t.median_ms / 1e9, matmul_dtype="fp32",
                   matmul_what=f"fp32 matmul {m}×{m}×{m} (CPU: no fast bf16 path, so fp32)")
    return out
