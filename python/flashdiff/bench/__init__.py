"""The benchmark engine behind `flashdiff bench` and benchmarks/ (pytest-benchmark).

Every case times flashdiff's backends next to the strongest baselines, in the same process,
on the same inputs:

    attention    F.scaled_dot_product_attention under each SDPA backend that runs
                 (flash, efficient, cudnn, math on a GPU; the default on a CPU)
    group_norm   F.silu(F.group_norm(x)) eager (+ the modulation when the case has one),
                 torch.compile of the reference, and a plain copy of x (the floor)
    scheduler    the eager torch expression of the step (DDIM + CFG: ~8 ops), diffusers'
                 scheduler step, torch.compile of the eager expression
    e2e          whole DDIM + CFG sampling runs (DiT-XL/2 256 px, the SD 1.5 U-Net; digit models
                 on a CPU): torch eager, torch.compile, flashdiff patch, flashdiff patch+graph
                 (the loop captured once, GPU); per-step time and images/s
    auto rows    every op case also times backend=None: what a user gets by default

Timing: warm-up first, then the median and the 20 %/80 % quantiles: triton.testing.do_bench on
CUDA (it flushes L2 between calls), a time.perf_counter loop on the CPU. Ceilings are measured
once per run: the bandwidth of a large device-to-device copy (GB/s; memory-bound ops are a
fraction of it) and the rate of a large matmul (bf16 on CUDA, fp32 on the CPU: TFLOP/s;
attention is a fraction of it). Speedups are against the best baseline of the same case.

    from flashdiff import bench
    result = bench.run(bench.BenchOptions(ops=["group_norm"], quick=True))
    print(bench.format_tables(result))
"""
from __future__ import annotations

# The package's modules, one concern each:
#   core     options, Skip, the Case/Row model, the torch.compile budget keeper
#   machine  the machine description stored with every result
#   timing   timers, quantiles, ceilings
#   cases    the per-op cases (attention, group_norm, scheduler) and their baselines
#   e2e      end-to-end sampling
#   runner   building the cases and running them
#   report   JSON, the printed tables, the Markdown summary
from .cases import (DDIM_A_PREV, DDIM_A_T, FLOW_SIGMA, FLOW_SIGMA_NEXT, GUIDANCE, attention_cases,
                    ddim_cfg_eager, flow_euler_eager, group_norm_cases, group_norm_eager, scheduler_cases)
from .core import (DTYPE_NAME, DTYPES, EPS, SCHEMA, BenchOptions, Case, Row, Skip, _Compiler,
                   default_dtypes, flashdiff_backends)
from .e2e import e2e_cases, load_model, set_model_backend
from .machine import git_commit, machine_info
from .report import format_tables, summary_markdown, summary_rows, write_json
from .runner import CASE_BUILDERS, _run_case, build_cases, run
from .timing import Timing, measure, measure_ceilings, steady_host_allocator

__all__ = [
    "SCHEMA", "DTYPES", "DTYPE_NAME", "EPS", "Skip", "BenchOptions", "default_dtypes", "Row", "Case",
    "flashdiff_backends", "git_commit", "machine_info", "Timing", "measure", "measure_ceilings",
    "steady_host_allocator",
    "attention_cases", "group_norm_eager", "group_norm_cases", "DDIM_A_T", "DDIM_A_PREV", "GUIDANCE",
    "FLOW_SIGMA", "FLOW_SIGMA_NEXT", "ddim_cfg_eager", "flow_euler_eager", "scheduler_cases",
    "load_model", "set_model_backend", "e2e_cases", "CASE_BUILDERS", "build_cases", "run",
    "write_json", "format_tables", "summary_rows", "summary_markdown",
]
