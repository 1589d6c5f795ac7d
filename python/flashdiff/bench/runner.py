"""Running a benchmark: build the cases of the chosen ops/presets/dtypes, measure the
ceilings, time every row, check flashdiff's outputs against a baseline's, add the speedups."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List

import torch

from .. import presets as P
from .cases import attention_cases, group_norm_cases, layer_norm_cases, rms_norm_cases, scheduler_cases
from .core import (DTYPES, SCHEMA, BenchOptions, Case, Skip, _Compiler, _first_line, default_dtypes,
                   flashdiff_backends, triton_tuning)
from .e2e import e2e_cases
from .machine import machine_info
from .report import write_json
from .timing import measure, measure_ceilings, steady_host_allocator

CASE_BUILDERS = {"attention": attention_cases, "group_norm": group_norm_cases, "layer_norm": layer_norm_cases,
                 "rms_norm": rms_norm_cases, "scheduler": scheduler_cases, "e2e": e2e_cases}


def build_cases(opts: BenchOptions, device: str, compiler: _Compiler) -> List[Case]:
    preset_names = list(opts.presets or P.names(device))
    backends = flashdiff_backends(device, opts.backends)
    cases = []
    for op in opts.ops:
        if op not in CASE_BUILDERS:
            raise ValueError(f"op must be one of {P.OPS}, got {op!r}")
        for dt in (opts.dtypes or default_dtypes(op, device)):
            if dt not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dt!r}")
            for preset, batch, shape in P.expand(preset_names, op, opts.batches):
                cases.append(CASE_BUILDERS[op](preset, batch, shape, DTYPES[dt], device, backends, compiler))
    return cases


# ------------------------------------------------------------------ running
def _rel_error(y, expected) -> float:
    y, e = y.detach().float(), expected.detach().float()
    if y.shape != e.shape:
        return float("inf")
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((y - e).abs().max()) if e.numel() else 0.0
    return err / max(scale, 1e-6) if math.isfinite(err) else float("inf")


def _run_case(case: Case, device: str, opts: BenchOptions, ceilings: dict, say) -> List[dict]:
    records: List[dict] = []
    base = dict(op=case.op, preset=case.preset, batch=case.batch, case=case.label, shape=case.shape,
                dtype=case.dtype, metric=case.metric)
    try:
        inp = case.setup()
    except Exception as err:  # noqa: BLE001 - Skip, or a failure (OOM, a model API change): recorded
        why = str(err) if isinstance(err, Skip) else f"setup failed: {_first_line(err)}"
        say(f"  skipped {case.id}: {why}")
        return [dict(base, backend=r.name, role=r.role, skipped=why) for r in case.rows]
    # Baselines first: they produce the output the flashdiff rows are sanity-checked against.
    order = sorted(case.rows, key=lambda r: {"flashdiff": 1, "auto": 2}.get(r.role, 0))
    for row in order:
        inp.pop("_row_note", None)
        rec = dict(base, backend=row.name, role=row.role)
        try:
            with torch.inference_mode():
                fn = row.make(inp)
                out = fn()
                check_err = None
                if opts.check and case.tol and row.role in ("flashdiff", "auto") and isinstance(out, torch.Tensor) \
                        and isinstance(inp.get("expected"), torch.Tensor):
                    check_err = _rel_error(out, inp["expected"])
                del out  # not held while timing: a live extra output changes where the allocator puts the next ones
                reps = case.reps if case.reps is None or not opts.quick else max(1, case.reps // 2)
                t = measure(fn, device, opts.quick, reps=reps)
        except Skip as why:
            rec["skipped"] = str(why)
            say(f"  {row.name:22s} skipped: {why}")
            records.append(rec)
            continue
        except Exception as err:  # noqa: BLE001 - one failing row (OOM, a kernel error) must not end the run
            rec["skipped"] = f"failed: {_first_line(err)}"
            say(f"  {row.name:22s} {rec['skipped']}")
            records.append(rec)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        rec.update(asdict(t))
        if hasattr(case, "record_fields"):  # e2e: steps, per-step time, compile time
            rec.update(case.record_fields(rec))
        if "_row_note" in inp:
            rec["note"] = inp.pop("_row_note")
        rate = case.work / (t.median_ms * 1e-3)
        if case.metric == "GB/s":
            rec["value"] = rate / 1e9
            rec["fraction_of_ceiling"] = rec["value"] / ceilings["copy_gbps"] if ceilings.get("copy_gbps") else None
        elif case.metric == "TFLOP/s":
            rec["value"] = rate / 1e12
            rec["fraction_of_ceiling"] = (rec["value"] / ceilings["matmul_tflops"]
                                          if ceilings.get("matmul_tflops") else None)
        else:
            rec["value"] = rate
            rec["fraction_of_ceiling"] = None
        if check_err is not None:
            rec["check_rel_error"] = check_err
            rec["check"] = "ok" if check_err <= case.tol else "MISMATCH"
        records.append(rec)
        say(f"  {row.name:22s} {t.median_ms:10.4f} ms  ({t.q20_ms:.4f}–{t.q80_ms:.4f})  "
            f"{rec['value']:.4g} {case.metric}" + (f"  check {rec['check']}" if "check" in rec else ""))
    del inp
    if device == "cuda":
        torch.cuda.empty_cache()
    _add_ratios(records)
    return records


def _add_ratios(records: List[dict]) -> None:
    """Speedup of every row against the best (fastest) baseline of its case, and time relative
    to the copy row where the case has one."""
    timed = [r for r in records if "median_ms" in r]
    baselines = [r for r in timed if r["role"] == "baseline"]
    copy = next((r for r in timed if r["role"] == "copy"), None)
    best = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
    for r in timed:
        if best is not None and r["role"] != "copy":
            r["best_baseline"] = best["backend"]
            r["speedup_vs_best_baseline"] = best["median_ms"] / r["median_ms"]
        if copy is not None and r["role"] != "copy":
            r["time_vs_copy"] = r["median_ms"] / copy["median_ms"]


def run(opts: BenchOptions) -> Dict[str, Any]:
    """Measure the ceilings, then every case; returns (and writes, with json_path) the results."""
    say = opts.progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    compile_on = opts.compile if opts.compile is not None else device == "cuda"
    mode = opts.compile_mode or ("max-autotune-no-cudagraphs" if device == "cuda" else "default")
    compiler = _Compiler(compile_on, mode, opts.compile_budget_s)
    t_start = time.perf_counter()
    result: Dict[str, Any] = {"schema": SCHEMA, "meta": machine_info(device)}
    result["meta"].update(host_allocator=steady_host_allocator(), argv=sys.argv[1:], quick=opts.quick, ops=list(opts.ops),
                          presets=list(opts.presets or P.names(device)), compile=compile_on,
                          compile_mode=mode if compile_on else None)
    say(f"flashdiff bench on {result['meta']['card'] or result['meta']['cpu']} "
        f"(torch {torch.__version__}, backends timed: {', '.join(flashdiff_backends(device, opts.backends)) or 'none'})")
    load = result["meta"].get("load_avg_1m")
    if device == "cpu" and load is not None and load > (os.cpu_count() or 1):
        say(f"WARNING: load average {load} on {os.cpu_count()} cores: other processes share this CPU, "
            "so timings (multi-threaded ones most) are inflated and noisy")
    say("measuring ceilings (large copy, large matmul) ...")
    result["ceilings"] = measure_ceilings(device, opts.quick)
    c = result["ceilings"]
    say(f"  copy {c['copy_gbps']:.1f} GB/s; {c['matmul_dtype']} matmul {c['matmul_tflops']:.3f} TFLOP/s")
    if not compile_on:
        say("torch.compile baselines: off (--compile turns them on; on a CPU each compile takes ~30 s)")
    cases = build_cases(opts, device, compiler)
    result["results"] = []
    ops_order = [op for op in opts.ops if any(c.op == op for c in cases)]
    op_deadline, current_op = math.inf, None
    with triton_tuning(device == "cuda"):  # Triton configs timed at first launch, as flashdiff tune does
        for i, case in enumerate(cases, 1):
            if case.op != current_op:  # a new op family: its compile budget and its share of time
                current_op = case.op
                compiler.new_op()
                if opts.time_budget_s is not None:
                    left = opts.time_budget_s - (time.perf_counter() - t_start)
                    op_deadline = time.perf_counter() + left / (len(ops_order) - ops_order.index(case.op))
            if time.perf_counter() > op_deadline:
                why = f"time budget spent (--time-budget {opts.time_budget_s:.0f} s, shared among the ops)"
                result["results"] += [dict(op=case.op, preset=case.preset, batch=case.batch, case=case.label,
                                           shape=case.shape, dtype=case.dtype, metric=case.metric,
                                           backend=r.name, role=r.role, skipped=why) for r in case.rows]
                continue
            say(f"[{i}/{len(cases)}] {case.op} {case.preset} b{case.batch} {case.shape} {case.dtype}")
            result["results"] += _run_case(case, device, opts, result["ceilings"], say)
            result["compile_times_s"] = dict(compiler.times)
            result["wall_s"] = round(time.perf_counter() - t_start, 1)
            if opts.json_path:
                write_json(result, opts.json_path)
    result["compile_times_s"] = dict(compiler.times)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if opts.json_path:
        write_json(result, opts.json_path)
    return result
