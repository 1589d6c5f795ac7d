"""Step 6 of device_run.sh: merge what the run produced into $OUT/results.json and
$OUT/summary.md (and print nothing else; the script prints the summary last).

    python benchmarks/device_report.py --work WORKDIR --out OUT --status 0 --elapsed 412

WORKDIR holds bench.json and e2e.json (flashdiff bench --json), validate.json (flashdiff
validate --json) and steps.tsv (name, exit status, seconds, log); OUT holds the logs and
dispatch-table.json (flashdiff tune --out). Any of them may be missing (a step that timed
out): the report says so instead of failing.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def card_slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100'; other names → a lowercase slug."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", card or "")
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", (card or "unknown").lower()).strip("-")


def results_name(meta: dict) -> str:
    """<date>-<card>-<short sha>, the name DEVICE.md asks the committed files to have."""
    date = (meta.get("date") or "unknown")[:10]
    card = card_slug(meta.get("card") or meta.get("cpu") or "unknown")
    sha = (meta.get("git_commit") or "unknown")[:7]
    return f"{date}-{card}-{sha}"


def _test_counts(log_path):
    """The final line of each pytest run in tests.log ('12 passed, 3 skipped in 30.1s')."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pat = re.compile(r"^=*\s*\d+ (passed|failed|skipped|deselected|error)|no tests ran")
    return [ln.strip("= ").strip() for ln in lines if pat.search(ln.strip("= "))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--status", type=int, default=0)
    ap.add_argument("--elapsed", type=float, default=None)
    args = ap.parse_args(argv)

    from flashdiff import bench

    steps = []
    try:
        with open(os.path.join(args.work, "steps.tsv")) as f:
            for line in f:
                name, rc, secs, log = line.rstrip("\n").split("\t")
                steps.append({"step": name, "exit_status": int(rc), "seconds": int(secs), "log": log})
    except OSError:
        pass
    result = _load(os.path.join(args.work, "bench.json")) or {"schema": bench.SCHEMA, "meta": {}, "results": []}
    e2e = _load(os.path.join(args.work, "e2e.json"))
    if e2e is not None:  # its own bench run: rows join the op rows, meta fills in if bench died
        result["results"] = list(e2e.get("results", [])) + list(result.get("results", []))
        result["e2e_compile_times_s"] = e2e.get("compile_times_s")
        for key in ("meta", "ceilings"):
            if not result.get(key):
                result[key] = e2e.get(key, {})
    table = _load(os.path.join(args.out, "dispatch-table.json"))
    if table is not None:
        from flashdiff.bench.tune import summary as tune_summary

        result["tune"] = {"summary": tune_summary(table), "wall_s": table.get("wall_s"),
                          "skipped": table.get("skipped", []), "device": table.get("device"),
                          "versions": table.get("versions")}
    validate = _load(os.path.join(args.work, "validate.json"))
    tests = _test_counts(os.path.join(args.out, "tests.log"))
    result["device_run"] = {"status": args.status, "elapsed_s": args.elapsed, "steps": steps, "tests": tests,
                            "validate": None if validate is None else
                            {k: validate.get(k) for k in ("status", "seed", "torch", "summary")},
                            "suggested_name": results_name(result.get("meta", {}))}
    if validate is not None:
        result["validate_checks"] = validate.get("checks", [])
    bench.write_json(result, os.path.join(args.out, "results.json"))

    md = [f"# flashdiff device run {result['device_run']['suggested_name']}", ""]
    md += [f"Status {args.status} after {args.elapsed} s. Commit these files unedited as "
           f"`benchmarks/results/{result['device_run']['suggested_name']}.{{json,md}}`.", ""]
    md += ["| step | exit | seconds |", "|---|---:|---:|"]
    md += [f"| {s['step']} | {s['exit_status']}{' (timed out)' if s['exit_status'] == 124 else ''} | "
           f"{s['seconds']} |" for s in steps]
    md.append("")
    if tests:
        md += ["Tests: " + "; ".join(tests), ""]
    if table is not None:
        md += [f"Tune ({table.get('wall_s')} s; dispatch-table.json):", "", "```",
               result["tune"]["summary"], "```", ""]
    else:
        md += ["Tune: no table (the step failed or timed out).", ""]
    if validate is not None:
        md += [f"Validate (seed {validate.get('seed')}): status {validate.get('status')}", "",
               "| op/backend/device | pass | fail | declined | worst ratio |", "|---|---:|---:|---:|---:|"]
        for key, s in (validate.get("summary") or {}).items():
            md.append(f"| {key} | {s['pass']} | {s['fail']} | {s['declined']} | {s['worst_ratio']:.3f} |")
        md.append("")
    else:
        md += ["Validate: no results (the step failed or timed out).", ""]
    if result.get("results"):
        md.append(bench.summary_markdown(result))
        skipped = sum("skipped" in r for r in result["results"])
        if skipped:
            md += ["", f"{skipped} rows skipped (reasons in results.json)."]
    else:
        md.append("Bench: no results (the step failed or timed out).")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
