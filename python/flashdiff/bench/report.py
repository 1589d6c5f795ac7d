"""Reporting: the results as JSON, the per-op tables `flashdiff bench` prints, and the short
Markdown summary (per case, the fastest flashdiff backend vs the best baseline)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from .. import presets as P

def write_json(result: Dict[str, Any], path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------ reporting
def _fmt_ms(t: float) -> str:
    return f"{t:.4g}" if t < 1000 else f"{t:.0f}"


def format_tables(result: Dict[str, Any]) -> str:
    """Per op: case, dtype, backend, median (q20–q80), GB/s or TFLOP/s, fraction of ceiling,
    speedup vs the best baseline; skipped rows with their reason."""
    c = result.get("ceilings", {})
    lines = []
    meta = result.get("meta", {})
    lines.append(f"flashdiff bench — {meta.get('card') or meta.get('cpu')} — torch {meta.get('torch')}"
                 f" — {meta.get('date')} — commit {str(meta.get('git_commit'))[:10]}")
    if meta.get("device") == "cpu" and meta.get("load_avg_1m") is not None:
        lines.append(f"CPU: {meta.get('cpu_cores')} cores, {meta.get('torch_threads')} torch threads, "
                     f"load average {meta['load_avg_1m']} at the start")
    if c:
        lines.append(f"ceilings: {c.get('copy_what')}: {c.get('copy_gbps', 0):.1f} GB/s; "
                     f"{c.get('matmul_what')}: {c.get('matmul_tflops', 0):.3f} TFLOP/s")
    for op in P.OPS:
        recs = [r for r in result.get("results", []) if r["op"] == op]
        if not recs:
            continue
        metric = recs[0]["metric"]
        ceil = {"GB/s": "copy", "TFLOP/s": "matmul"}.get(metric, "")
        lines.append("")
        lines.append(f"== {op} ({metric}" + (f", fraction of the {ceil} ceiling" if ceil else "") + ")")
        header = (f"{'case':34s} {'dtype':5s} {'backend':20s} {'median ms (q20–q80)':>26s} "
                  f"{metric:>9s} {'%ceil':>6s} {'vs best baseline':>24s}  note")
        lines.append(header)
        lines.append("-" * len(header))
        last_case = None
        for r in recs:
            key = (r["preset"], r["batch"], r["case"], r["dtype"])
            case = f"{r['shape']}" if key != last_case else ""
            dtype = r["dtype"] if key != last_case else ""
            last_case = key
            if "median_ms" not in r:
                lines.append(f"{case[:34]:34s} {dtype:5s} {r['backend']:20s} skipped: {r.get('skipped')}")
                continue
            timing = f"{_fmt_ms(r['median_ms'])} ({_fmt_ms(r['q20_ms'])}–{_fmt_ms(r['q80_ms'])})"
            frac = r.get("fraction_of_ceiling")
            frac_s = f"{100 * frac:5.1f}%" if frac is not None else "     —"
            sp = r.get("speedup_vs_best_baseline")
            sp_s = f"{sp:.2f}× ({r['best_baseline']})" if sp is not None and r["role"] != "baseline" \
                else (f"{sp:.2f}×" if sp is not None else "—")
            notes = []
            if r["role"] != "copy" and r.get("time_vs_copy") is not None:
                notes.append(f"{r['time_vs_copy']:.2f}× copy time")
            if r.get("check") == "MISMATCH":
                notes.append(f"MISMATCH rel err {r['check_rel_error']:.2e}")
            if (r.get("output_buffers") or 1) > 1:
                notes.append(f"output alternated {r['output_buffers']} blocks")
            lines.append(f"{case[:34]:34s} {dtype:5s} {r['backend']:20s} {timing:>26s} "
                         f"{r['value']:9.4g} {frac_s:>6s} {sp_s:>24s}  {'; '.join(notes)}")
    if not meta.get("compile"):
        lines.append("")
        lines.append("torch.compile baselines were off in this run (flashdiff bench --compile).")
    if result.get("compile_times_s"):
        lines.append("")
        lines.append("torch.compile times (s, excluded from the timings): " +
                     ", ".join(f"{k}: {v}" for k, v in result["compile_times_s"].items()))
    return "\n".join(lines)


def summary_rows(result: Dict[str, Any]) -> List[dict]:
    """Per case: the fastest flashdiff row against the best baseline."""
    out = []
    cases: Dict[tuple, List[dict]] = {}
    for r in result.get("results", []):
        cases.setdefault((r["op"], r["preset"], r["batch"], r["case"], r["dtype"]), []).append(r)
    for key, recs in cases.items():
        ours = [r for r in recs if r["role"] == "flashdiff" and "median_ms" in r]
        base = [r for r in recs if r["role"] == "baseline" and "median_ms" in r]
        best = min(ours, key=lambda r: r["median_ms"]) if ours else None
        bb = min(base, key=lambda r: r["median_ms"]) if base else None
        # what a user gets by default: the auto row; in e2e, the patched model
        auto = next((r for r in recs if (r["role"] == "auto" or r["backend"] == "flashdiff patch")
                     and "median_ms" in r), None)
        # Speedups against the best baseline of the whole group (e2e's compile rows are
        # cases of their own, so the per-case ratios never saw them).
        speedup = bb["median_ms"] / best["median_ms"] if best and bb else None
        auto_speedup = bb["median_ms"] / auto["median_ms"] if auto and bb else None
        out.append({"op": key[0], "preset": key[1], "batch": key[2], "case": key[3], "dtype": key[4],
                    "shape": recs[0]["shape"], "metric": recs[0]["metric"],
                    "backend": best["backend"] if best else None,
                    "median_ms": best["median_ms"] if best else None,
                    "value": best["value"] if best else None,
                    "fraction_of_ceiling": best.get("fraction_of_ceiling") if best else None,
                    "baseline": bb["backend"] if bb else None,
                    "baseline_ms": bb["median_ms"] if bb else None,
                    "speedup": speedup,
                    "check": best.get("check") if best else None,
                    "auto_ms": auto["median_ms"] if auto else None,
                    "auto_speedup": auto_speedup,
                    "auto_note": auto.get("note") if auto else None})
    return out


def summary_markdown(result: Dict[str, Any]) -> str:
    """A short Markdown table: per case, the fastest flashdiff backend vs the best baseline, and
    the auto row (what a user gets by default) vs the same baseline."""
    meta = result.get("meta", {})
    c = result.get("ceilings", {})
    lines = [f"**{meta.get('card') or meta.get('cpu')}**, {meta.get('date')}, commit "
             f"`{str(meta.get('git_commit'))[:10]}`, torch {meta.get('torch')}, triton {meta.get('triton')}",
             "",
             f"Ceilings: copy {c.get('copy_gbps', 0):.1f} GB/s; {c.get('matmul_dtype')} matmul "
             f"{c.get('matmul_tflops', 0):.3f} TFLOP/s.",
             "",
             "| op | preset | shape | dtype | flashdiff | median ms | rate | % ceiling | best baseline | its ms | speedup "
             "| auto ms | auto speedup |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for s in summary_rows(result):
        if s["median_ms"] is None and s["baseline_ms"] is None:
            continue
        frac = s["fraction_of_ceiling"]
        lines.append(
            f"| {s['op']} | {s['preset']} b{s['batch']} | {s['shape']} | {s['dtype']} | {s['backend'] or '—'} | "
            f"{_fmt_ms(s['median_ms']) if s['median_ms'] is not None else '—'} | "
            f"{'%.4g %s' % (s['value'], s['metric']) if s['value'] is not None else '—'} | "
            f"{'%.0f%%' % (100 * frac) if frac is not None else '—'} | {s['baseline'] or '—'} | "
            f"{_fmt_ms(s['baseline_ms']) if s['baseline_ms'] is not None else '—'} | "
            f"{'%.2f×' % s['speedup'] if s['speedup'] is not None else '—'}"
            f"{' MISMATCH' if s['check'] == 'MISMATCH' else ''} | "
            f"{_fmt_ms(s['auto_ms']) if s['auto_ms'] is not None else '—'} | "
            f"{'%.2f×' % s['auto_speedup'] if s['auto_speedup'] is not None else '—'} |")
    return "\n".join(lines)
