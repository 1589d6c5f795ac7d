"""Charts and the README performance table, made from committed results files only.

    python benchmarks/plot.py                         # benchmarks/results/*.json → PNGs beside them
    python benchmarks/plot.py --out /tmp/charts a.json b.json
    python benchmarks/plot.py --table                 # README table (Markdown) on stdout

Per results file, two PNGs (matplotlib; skipped with a message when it is not installed):
  <name>-speedup.png   speedup of the fastest flashdiff backend over the best baseline, per case
  <name>-ceiling.png   fraction of the measured ceiling (copy bandwidth or matmul rate) reached by
                       the fastest flashdiff backend and by the best baseline, per case
The table names the card (or CPU), the date and the commit of each file; the README links or
pastes it as printed, so every number there traces back to a file in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from flashdiff.bench import summary_rows  # noqa: E402

OP_ORDER = ("attention", "group_norm", "scheduler", "e2e")


def load(paths: List[str]) -> List[tuple]:
    """[(path, result dict)] for files that hold flashdiff bench results, oldest first."""
    out = []
    for p in paths:
        try:
            with open(p) as f:
                r = json.load(f)
        except (OSError, ValueError) as err:
            print(f"plot.py: skipping {p}: {err}", file=sys.stderr)
            continue
        if not str(r.get("schema", "")).startswith("flashdiff-bench/") or not r.get("results"):
            print(f"plot.py: skipping {p}: not a flashdiff bench results file", file=sys.stderr)
            continue
        out.append((p, r))
    return sorted(out, key=lambda pr: pr[1].get("meta", {}).get("date") or "")


def _who(meta: dict) -> str:
    return meta.get("card") or f"CPU: {meta.get('cpu')}"


def _case_label(s: dict) -> str:
    return f"{s['op']} {s['preset']} b{s['batch']} {s['shape']} {s['dtype']}"


# ------------------------------------------------------------------ README table
def readme_table(results: List[tuple]) -> str:
    """Markdown: per results file, a heading naming card, date and commit, then per case the
    fastest flashdiff backend against the best baseline of the same run, and the auto row (what
    a user gets by default; "—" in files from before it existed) against the same baseline."""
    lines = []
    for path, r in results:
        meta = r.get("meta", {})
        c = r.get("ceilings", {})
        lines += [f"#### {_who(meta)} — {str(meta.get('date'))[:10]} — commit `{str(meta.get('git_commit'))[:7]}`",
                  "",
                  f"From [`{os.path.relpath(path, os.path.join(HERE, '..'))}`]"
                  f"({os.path.relpath(path, os.path.join(HERE, '..'))}); torch {meta.get('torch')}, "
                  f"triton {meta.get('triton')}. Ceilings measured in the same run: copy "
                  f"{c.get('copy_gbps', 0):.0f} GB/s, {c.get('matmul_dtype')} matmul "
                  f"{c.get('matmul_tflops', 0):.3g} TFLOP/s.",
                  "",
                  "| op | shape | dtype | flashdiff | median | rate | of ceiling | best baseline | speedup | auto |",
                  "|---|---|---|---|---:|---:|---:|---|---:|---:|"]
        rows = summary_rows(r)
        rows.sort(key=lambda s: (OP_ORDER.index(s["op"]) if s["op"] in OP_ORDER else 99))
        for s in rows:
            if s["median_ms"] is None:
                continue
            frac = s["fraction_of_ceiling"]
            lines.append(
                f"| {s['op']} | {s['shape']} ({s['preset']}) | {s['dtype']} | {s['backend']} | "
                f"{s['median_ms']:.4g} ms | {s['value']:.4g} {s['metric']} | "
                f"{'%.0f%%' % (100 * frac) if frac is not None else '—'} | "
                f"{s['baseline'] or '—'} | {'%.2f×' % s['speedup'] if s['speedup'] is not None else '—'} | "
                f"{'%.2f×' % s['auto_speedup'] if s.get('auto_speedup') is not None else '—'} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ charts
def plot(results: List[tuple], out_dir: str = None) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed; no charts (pip install matplotlib). "
              "The table (--table) needs nothing.", file=sys.stderr)
        return []
    written = []
    for path, r in results:
        stem = os.path.splitext(os.path.basename(path))[0]
        where = out_dir or os.path.dirname(os.path.abspath(path))
        os.makedirs(where, exist_ok=True)
        rows = [s for s in summary_rows(r) if s["median_ms"] is not None]
        rows.sort(key=lambda s: (OP_ORDER.index(s["op"]) if s["op"] in OP_ORDER else 99))
        title = f"flashdiff — {_who(r.get('meta', {}))} — {str(r['meta'].get('date'))[:10]}"
        colors = {"attention": "tab:blue", "group_norm": "tab:orange", "scheduler": "tab:green", "e2e": "tab:red"}

        sp = [s for s in rows if s["speedup"] is not None]
        if sp:
            fig, ax = plt.subplots(figsize=(10, 0.32 * len(sp) + 1.5))
            y = range(len(sp))
            ax.barh(list(y), [s["speedup"] for s in sp], color=[colors.get(s["op"], "gray") for s in sp])
            ax.set_yticks(list(y))
            ax.set_yticklabels([f"{_case_label(s)} [{s['backend']} vs {s['baseline']}]" for s in sp], fontsize=7)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            for i, s in enumerate(sp):
                ax.annotate(f"{s['speedup']:.2f}×", (s["speedup"], i), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("speedup over the best baseline of the same run (×, log scale)")
            ax.set_title(title, fontsize=9)
            fig.tight_layout()
            name = os.path.join(where, f"{stem}-speedup.png")
            fig.savefig(name, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(name)

        fr = [s for s in rows if s["fraction_of_ceiling"] is not None]
        if fr:
            base_frac = _baseline_fractions(r)
            fig, ax = plt.subplots(figsize=(10, 0.32 * len(fr) + 1.5))
            y = list(range(len(fr)))
            ax.barh([i - 0.2 for i in y], [100 * s["fraction_of_ceiling"] for s in fr], height=0.4,
                    label="fastest flashdiff backend", color="tab:blue")
            ax.barh([i + 0.2 for i in y], [100 * base_frac.get(_case_label(s), 0.0) for s in fr], height=0.4,
                    label="best baseline", color="tab:gray")
            ax.set_yticks(y)
            ax.set_yticklabels([_case_label(s) for s in fr], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("% of the measured ceiling (copy bandwidth: norm, step; matmul rate: attention)")
            ax.legend(fontsize=8)
            ax.set_title(title, fontsize=9)
            fig.tight_layout()
            name = os.path.join(where, f"{stem}-ceiling.png")
            fig.savefig(name, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


def _baseline_fractions(r: dict) -> dict:
    best = {}
    for rec in r.get("results", []):
        if rec.get("role") != "baseline" or rec.get("fraction_of_ceiling") is None:
            continue
        key = f"{rec['op']} {rec['preset']} b{rec['batch']} {rec['shape']} {rec['dtype']}"
        best[key] = max(best.get(key, 0.0), rec["fraction_of_ceiling"])
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    ap.add_argument("--out", help="folder for the PNGs (default: beside each results file)")
    ap.add_argument("--table", action="store_true", help="print the README performance table instead")
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    results = load(files)
    if not results:
        print("plot.py: no results files (benchmarks/results/*.json holds those committed from "
              "device_run.sh or `flashdiff bench --json`)", file=sys.stderr)
        return 1
    if args.table:
        print(readme_table(results))
        return 0
    for name in plot(results, args.out):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
