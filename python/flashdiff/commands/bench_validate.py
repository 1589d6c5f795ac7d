"""`flashdiff bench` and `flashdiff validate` (registered by flashdiff/cli.py).

    flashdiff validate [--backend cpu ...] [--op attention ...] [--cases N] [--seed S] [--json FILE]
    flashdiff bench [--quick] [--op attention|group_norm|scheduler|e2e ...] [--preset sd15 ...]
                    [--batch 1 8] [--dtype bf16 ...] [--backend triton ...] [--json FILE]
    flashdiff bench --e2e [--time-budget S] [--json FILE]     # whole sampling runs only
    flashdiff bench --op distributed [--ranks 2] [--quick] [--json FILE]   # Ulysses / ring scaling

Also runnable alone: python -m flashdiff.commands.bench_validate bench --quick
"""
from __future__ import annotations

import argparse
import os
import sys


def _split(values):
    """Accept both `--op a b` and `--op a,b` (and repeated flags)."""
    if not values:
        return None
    out = []
    for v in values:
        out += [p for p in v.split(",") if p]
    return out


# ------------------------------------------------------------------ validate
def add_validate_parser(subparsers) -> argparse.ArgumentParser:
    from ..validate import DTYPES, OPS

    p = subparsers.add_parser(
        "validate", help="check every usable backend against flashdiff.reference on fresh random hostile shapes",
        description="Run every usable backend of every op against flashdiff.reference on fresh random "
                    "hostile shapes and print pass/fail with the error ratio against the tolerance rule "
                    "(error / (2·torch-in-dtype error + atol); below 1 passes). Exit status 1 on any failure.")
    p.add_argument("--backend", nargs="+", action="extend", metavar="NAME",
                   help="backends to validate (reference torch cpu triton cuda, or backend:variant such as "
                        "cuda:onepass; default: every usable one, and on a GPU every variant)")
    p.add_argument("--op", nargs="+", action="extend", metavar="OP", help=f"ops ({', '.join(OPS)}; default all)")
    p.add_argument("--dtype", nargs="+", action="extend", metavar="DT",
                   help=f"dtypes ({', '.join(DTYPES)}; default all)")
    p.add_argument("--cases", type=int, default=4, help="random cases per (op, backend, dtype) (default 4)")
    p.add_argument("--seed", type=int, default=None, help="reproduce an earlier run (printed at the start)")
    p.add_argument("--triton-interpret", action="store_true",
                   help="on a machine without a GPU, run the triton backend in its interpreter (slow)")
    p.add_argument("--json", metavar="FILE", help="also write every check to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")
    p.set_defaults(func=validate_main)
    return p


def validate_main(args) -> int:
    if getattr(args, "triton_interpret", False) and "triton" not in sys.modules:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    from .. import validate
    from ..validate import DTYPES, OPS

    ops = _split(args.op) or list(OPS)
    dtypes = _split(args.dtype) or list(DTYPES)
    for name, given, allowed in (("--op", ops, OPS), ("--dtype", dtypes, DTYPES)):
        bad = [v for v in given if v not in allowed]
        if bad:
            print(f"flashdiff validate: {name} must be among {', '.join(allowed)}; got {', '.join(bad)}",
                  file=sys.stderr)
            return 2
    status, _ = validate.run(ops=ops, backends=_split(args.backend), dtypes=dtypes, cases=args.cases,
                             seed=args.seed, verbose=not args.quiet, json_path=args.json)
    return status


# ------------------------------------------------------------------ bench
def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from ..presets import OPS, PRESETS

    p = subparsers.add_parser(
        "bench", help="time the kernels against torch baselines (GB/s, TFLOP/s, fraction of ceiling)",
        description="Time flashdiff's backends next to the strongest baselines in the same process "
                    "(torch eager, SDPA under each of its backends, torch.compile, diffusers' scheduler "
                    "step) on shape presets named after real models. On a CPU it runs the CPU preset.")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes on 2 CPU cores)")
    p.add_argument("--op", nargs="+", action="extend", metavar="OP",
                   help=f"op families ({', '.join(OPS)}; default all), or distributed alone: sequence-parallel "
                        "attention on --ranks processes (gloo on a CPU, NCCL with enough GPUs), communication vs "
                        "attention time as the sequence grows")
    p.add_argument("--ranks", type=int, default=2, help="with --op distributed: processes to start (default 2)")
    p.add_argument("--e2e", action="store_true",
                   help="whole sampling runs only: --op e2e with the device's e2e preset (GPU: e2e-gpu, "
                        "DiT-XL/2 256 px and the SD 1.5 U-Net 512 px, batch 1 and 8, ~150 s on an H200 with "
                        "--compile-budget 75; CPU: the digit models of the cpu preset)")
    p.add_argument("--preset", nargs="+", action="extend", metavar="NAME",
                   help=f"shape presets ({', '.join(PRESETS)}; default: the device's)")
    p.add_argument("--batch", nargs="+", action="extend", type=int, metavar="N",
                   help="batch sizes of the model presets (default: each preset's, 1 and 8)")
    p.add_argument("--dtype", nargs="+", action="extend", metavar="DT",
                   help="dtypes (fp32 fp16 bf16; default bf16 on a GPU, fp32 and bf16 on a CPU)")
    p.add_argument("--backend", nargs="+", action="extend", metavar="NAME",
                   help="flashdiff backends to time (default: every usable one native to the device); "
                        "the baselines always run")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="torch.compile baselines (default on a GPU; on a CPU each compile takes ~30 s)")
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", help="torch.compile mode (default max-autotune-no-cudagraphs on a GPU, "
                                          "default on a CPU)")
    p.add_argument("--compile-budget", type=float, default=60.0, metavar="S",
                   help="per op family: stop compiling new baselines after S seconds of compiling (default 60)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="the whole run's time: each op family gets a fair share of what is left; cases past "
                        "it are recorded as skipped")
    p.add_argument("--no-check", action="store_true", help="skip the output sanity check against a baseline")
    p.add_argument("--json", metavar="FILE", help="write every number, with machine and versions, to FILE")
    p.add_argument("--summary-md", metavar="FILE", help="write the short Markdown summary table to FILE")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.set_defaults(func=bench_main)
    return p


def bench_main(args) -> int:
    from .. import bench, presets

    if args.list_presets:
        print(presets.describe())
        return 0
    ops = _split(args.op) or list(presets.OPS)
    if "distributed" in ops:
        return _bench_distributed(args, ops)
    preset_names = _split(args.preset)
    if args.e2e:
        if args.op and ops != ["e2e"]:
            print(f"flashdiff bench: --e2e runs the e2e op alone; drop --op {' '.join(ops)}", file=sys.stderr)
            return 2
        ops = ["e2e"]
        if not preset_names:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            preset_names = [presets.E2E_PRESET[device]]
    bad = [o for o in ops if o not in presets.OPS]
    bad_presets = [n for n in (preset_names or []) if n not in presets.PRESETS]
    if bad or bad_presets:
        print(f"flashdiff bench: unknown --op {bad} (choose from {', '.join(presets.OPS)})" if bad else
              f"flashdiff bench: unknown --preset {bad_presets} (choose from {', '.join(presets.PRESETS)})",
              file=sys.stderr)
        return 2
    opts = bench.BenchOptions(
        ops=ops, presets=preset_names, batches=args.batch, dtypes=_split(args.dtype),
        device=args.device, backends=_split(args.backend), quick=args.quick, compile=args.compile,
        compile_mode=args.compile_mode, compile_budget_s=args.compile_budget,
        time_budget_s=args.time_budget, check=not args.no_check, json_path=args.json)
    try:
        result = bench.run(opts)
    except (RuntimeError, ValueError) as err:
        print(f"flashdiff bench: {err}", file=sys.stderr)
        return 2
    print(bench.format_tables(result))
    if args.summary_md:
        with open(args.summary_md, "w") as f:
            f.write(bench.summary_markdown(result) + "\n")
    if args.json:
        print(f"\nwrote {args.json}")
    mismatches = [r for r in result["results"] if r.get("check") == "MISMATCH"]
    if mismatches:
        print(f"\n{len(mismatches)} flashdiff rows disagree with their baseline's output "
              "(run `flashdiff validate`)", file=sys.stderr)
        return 1
    return 0


def _bench_distributed(args, ops) -> int:
    """--op distributed: bench/distributed_bench.py's scaling case (it starts its own ranks)."""
    from ..bench import distributed_bench as db

    if ops != ["distributed"]:
        print("flashdiff bench: --op distributed runs alone (it starts its own processes); drop the other ops",
              file=sys.stderr)
        return 2
    dtypes = _split(args.dtype)
    opts = db.ScalingOptions(ranks=args.ranks, device=args.device, dtype=dtypes[0] if dtypes else None,
                             quick=args.quick, json_path=args.json)
    try:
        result = db.run_scaling(opts)
    except (RuntimeError, ValueError) as err:
        print(f"flashdiff bench: {err}", file=sys.stderr)
        return 2
    print(db.format_scaling(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 1 if any(r.get("check") == "MISMATCH" for r in result["results"]) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashdiff.commands.bench_validate")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_validate_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
