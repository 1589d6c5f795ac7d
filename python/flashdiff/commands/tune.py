"""`flashdiff tune` (registered by flashdiff/cli.py): measure the backends per shape class on
this GPU and write the dispatch table that auto reads.

    flashdiff tune --quick                      # ~2-3 minutes on an H200
    flashdiff tune --op attention --out t.json  # one op; also copy the table to t.json
    flashdiff tune --show                       # the table auto uses here, and where it is from
"""
from __future__ import annotations

import argparse
import json
import sys


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    from ..bench.tune import TUNE_OPS
    from ..presets import MODEL_PRESETS

    p = subparsers.add_parser(
        "tune", help="measure every backend per shape class on this GPU and write the dispatch table auto uses",
        description="Time every backend that can serve each op (torch's own path included) over shape classes "
                    "from the model presets, check each against torch's output, and write the dispatch table "
                    "(JSON) to the user cache dir, where backend=None ('auto') reads it.")
    p.add_argument("--quick", action="store_true", help="fewer classes and repetitions (~2-3 minutes on an H200)")
    p.add_argument("--op", nargs="+", action="extend", metavar="OP", help=f"ops ({', '.join(TUNE_OPS)}; default all)")
    p.add_argument("--preset", nargs="+", action="extend", metavar="NAME",
                   help=f"shape presets (default on a GPU: {', '.join(MODEL_PRESETS)})")
    p.add_argument("--batch", nargs="+", action="extend", type=int, metavar="N",
                   help="batch sizes (default: each preset's, 1 and 8)")
    p.add_argument("--dtype", nargs="+", action="extend", metavar="DT", help="dtypes (default bf16)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default cuda; cpu only checks the machinery (auto reads no CPU table)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop measuring new classes after S seconds (they are listed as skipped)")
    p.add_argument("--out", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--precompile", type=int, default=None, metavar="N",
                   help="compile the Triton attention configs in N worker processes before timing "
                        "(default: one per core up to 16; 0: off)")
    p.add_argument("--no-install", action="store_true", help="do not write the table to the user cache dir")
    p.add_argument("--show", action="store_true", help="print which table auto uses on this GPU and exit")
    p.add_argument("--from-results", metavar="FILE",
                   help="no measuring: derive a table from a GPU `flashdiff bench --json` results file "
                        "(written to --out)")
    p.set_defaults(func=tune_main)
    return p


def _show() -> int:
    import torch

    from .. import dispatch_table

    if not torch.cuda.is_available():
        print("no CUDA device: auto uses the CPU rule (dispatch_table.FALLBACK_ORDER['cpu'])")
        return 0
    name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"{name} sm_{cap[0]}{cap[1]}; tables looked for, in order:")
    for path in dispatch_table.candidate_paths(name, cap):
        print(f"  {path}")
    table = dispatch_table.table_for(torch.device("cuda"))
    for path, err in dispatch_table.load_errors().items():
        print(f"  not used: {path}: {err}")
    if table is None:
        print("no table: auto follows the fallback rule (prefers torch); run `flashdiff tune`")
        return 0
    print(f"using {table.origin} (created {table.data.get('created')}, versions {json.dumps(table.data.get('versions'))})")
    from ..bench.tune import summary

    print(summary(table.data))
    return 0


def tune_main(args) -> int:
    from ..bench import tune
    from .bench_validate import _split

    if args.show:
        return _show()
    if args.from_results:
        if not args.out:
            print("flashdiff tune: --from-results needs --out FILE", file=sys.stderr)
            return 2
        with open(args.from_results) as f:
            table = tune.table_from_results(json.load(f), args.from_results)
        tune._write(table, args.out)
        print(tune.summary(table))
        print(f"wrote {args.out}")
        return 0
    ops = _split(args.op) or list(tune.TUNE_OPS)
    bad = [o for o in ops if o not in tune.TUNE_OPS]
    if bad:
        print(f"flashdiff tune: --op must be among {', '.join(tune.TUNE_OPS)}; got {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        table = tune.run_tune(quick=args.quick, device=args.device, ops=ops, dtypes=_split(args.dtype) or ["bf16"],
                              presets=_split(args.preset), batches=args.batch, time_budget_s=args.time_budget,
                              out=args.out, install=not args.no_install, precompile_workers=args.precompile)
    except (RuntimeError, ValueError) as err:
        print(f"flashdiff tune: {err}", file=sys.stderr)
        return 2
    print(tune.summary(table))
    return 0
