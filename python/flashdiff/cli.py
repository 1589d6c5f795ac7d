"""`flashdiff info | validate | bench | tune | sample | demo | train`."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

# Sub-commands living in their own modules: (module, function that adds the parser).
_COMMANDS = [
    ("flashdiff.commands.bench_validate", "add_validate_parser"),
    ("flashdiff.commands.bench_validate", "add_bench_parser"),
    ("flashdiff.commands.tune", "add_tune_parser"),
    ("flashdiff.commands.sample_demo", "add_sample_parser"),
    ("flashdiff.commands.sample_demo", "add_demo_parser"),
    ("flashdiff.commands.sample_demo", "add_train_parser"),
]


def info(args=None) -> int:
    """Versions, compiled modules, backends and why each missing one is missing.

    Never fails on a broken install: a part that cannot be queried prints its error (a missing
    or unloadable module, triton that fails to import, a driver error) and the rest still
    prints; that is what the command is for."""
    import torch

    import flashdiff
    from flashdiff import _ext

    print(f"flashdiff {flashdiff.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    for section in (_triton_line, _gpu_lines, _module_lines, _backend_lines):
        try:
            section(torch, flashdiff, _ext)
        except Exception as err:  # report, keep going
            print(f"{section.__name__.strip('_').replace('_', ' ')}: error: {type(err).__name__}: {err}")
    return 0


def _triton_line(torch, flashdiff, _ext):
    mod, reason = _ext.load_triton()
    if mod is None:
        print(f"triton: unavailable: {reason}")
        return
    import triton

    print(f"triton {triton.__version__}" + ("  (interpreter: TRITON_INTERPRET=1)"
                                           if _ext.triton_interpreter_active() else ""))


def _gpu_lines(torch, flashdiff, _ext):
    if not torch.cuda.is_available():
        print("GPU: none visible to torch")
        return
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")


def _module_lines(torch, flashdiff, _ext):
    cpu_mod, cpu_reason = _ext.load_cpu()
    print("module flashdiff._cpu: " + ("built" if cpu_mod else f"missing: {cpu_reason}"))
    cuda_mod, cuda_reason = _ext.load_cuda_module_only()
    if cuda_mod is None:
        print(f"module flashdiff._cuda: missing: {cuda_reason}")
    else:
        archs = getattr(cuda_mod, "compiled_archs", lambda: [])()
        print(f"module flashdiff._cuda: built{' for ' + ', '.join(archs) if archs else ''}; "
              f"{cuda_mod.device_status()}")


def _backend_lines(torch, flashdiff, _ext):
    print("backends:")
    for name, reason in flashdiff.backend_status().items():
        print(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    override = flashdiff.backends.get_override()
    if override:
        print(f"FLASHDIFF_BACKEND override: {override}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, compiled modules, backends and why one is missing").set_defaults(func=info)
    for module_name, adder in _COMMANDS:
        try:
            getattr(importlib.import_module(module_name), adder)(sub)
        except Exception as err:  # a broken dependency (e.g. triton raising on import inside
            # torch._dynamo) disables that command only: `flashdiff info` must still run
            name = adder[len("add_"):-len("_parser")]
            p = sub.add_parser(name, help=f"(unavailable: {err})")
            p.set_defaults(func=lambda args, err=err, name=name: _unavailable(name, err))
    return parser


def _unavailable(name, err) -> int:
    print(f"flashdiff {name} is unavailable in this install: {err}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
