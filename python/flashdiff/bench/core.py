"""Shared pieces of the benchmark engine: options, the Case/Row model of a benchmark case,
Skip, and the torch.compile budget keeper."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import presets as P

SCHEMA = "flashdiff-bench/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAME = {v: k for k, v in DTYPES.items()}
EPS = 1e-5


class Skip(Exception):
    """A row or case that cannot run here; the message says why and goes into the results."""


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}"


# ------------------------------------------------------------------ options
@dataclass
class BenchOptions:
    ops: Sequence[str] = P.OPS
    presets: Optional[Sequence[str]] = None      # None: presets.names(device)
    batches: Optional[Sequence[int]] = None      # None: each preset's batches
    dtypes: Optional[Sequence[str]] = None       # None: per-op defaults (see default_dtypes)
    device: Optional[str] = None                 # None: cuda if available, else cpu
    backends: Optional[Sequence[str]] = None     # flashdiff backends to time (None: all usable)
    quick: bool = False
    compile: Optional[bool] = None               # torch.compile baselines; None: on CUDA only
    compile_mode: Optional[str] = None           # None: max-autotune-no-cudagraphs (CUDA), default (CPU)
    compile_budget_s: float = 60.0               # per op: stop compiling new baselines past this
    time_budget_s: Optional[float] = None        # whole run; each op gets a fair share of what is left
    check: bool = True                           # sanity-compare flashdiff outputs to a baseline
    json_path: Optional[str] = None              # written after every case (partial runs survive)
    progress: Optional[Callable[[str], None]] = None


def default_dtypes(op: str, device: str) -> List[str]:
    if device == "cuda":
        return ["bf16"]
    return {"attention": ["fp32"], "e2e": ["fp32"]}.get(op, ["fp32", "bf16"])


# ------------------------------------------------------------------ cases
@dataclass
class Row:
    """One timed line of a case. make(inputs) returns the callable to time (it may compile or
    check that the row runs, and raise Skip)."""
    name: str
    role: str  # "flashdiff" (an explicit backend) | "auto" (what a user gets) | "baseline" | "copy"
    make: Callable[[dict], Callable[[], Any]]


@dataclass
class Case:
    op: str
    preset: str
    batch: int
    label: str
    shape: str
    dtype: str
    metric: str                 # "GB/s" (vs the copy ceiling) | "TFLOP/s" (vs matmul) | "images/s"
    work: float                 # bytes, FLOPs or images per call
    setup: Callable[[], dict]
    rows: List[Row]
    reps: Optional[int] = None  # fixed repetition count (long calls)
    tol: float = 0.0            # relative tolerance of the sanity check (0: no check)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.preset}/b{self.batch}/{self.label}/{self.dtype}"


def flashdiff_backends(device: str, wanted: Optional[Sequence[str]] = None) -> List[str]:
    """flashdiff backends worth timing on `device`: usable here, native to the device (the
    Triton interpreter on a CPU times nothing meaningful), restricted to `wanted`."""
    import flashdiff

    status = flashdiff.backend_status()
    native = ("cpu",) if device == "cpu" else ("triton", "cuda")
    names = list(wanted) if wanted else list(native)
    return [b for b in names if status.get(b) is None and (b in native or b == "reference")]


@contextlib.contextmanager
def triton_tuning(enabled: bool = True):
    """Inside, a Triton attention key without a tuned config is tuned on its first launch
    (flashdiff tune and the benchmarks time kernels at their best; a user's call never waits for
    timing: triton_kernels/attention.py). A no-op when disabled or Triton does not load."""
    ctx = None
    if enabled:
        from .. import _ext

        module = _ext.load_triton()[0]
        ctx = getattr(getattr(module, "attention", None), "tuning", None)
    with (ctx() if ctx is not None else contextlib.nullcontext()):
        yield


def with_variants(op: str, backends: Sequence[str]) -> List[str]:
    """backends, each followed by the op's registered variants of it ("triton:v2", "triton:tma",
    "cuda:cross", "cuda:onepass", ...): a GPU run times every kernel flashdiff ships, since auto
    may pick any of them and the bars judge the fastest. torch variants are not added: the cases
    time torch's own choices as baselines."""
    from ..backends import REGISTRY

    impls = REGISTRY[op][0].impls if op in REGISTRY else {}
    out = []
    for b in backends:
        out.append(b)
        if b != "torch" and ":" not in b:
            out += sorted(name for name in impls if name.split(":")[0] == b and ":" in name and name not in backends)
    return out


def _sanity_tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


def auto_row(op: str, call: Callable[[dict, Optional[str]], Callable[[], Any]],
             explain_args: Callable[[dict], tuple]) -> Row:
    """The `auto` row: backend=None, what a user gets by default. The implementation auto
    chose and why go into the record's note (inp["_row_note"])."""
    def make(inp):
        import flashdiff

        args, kwargs = explain_args(inp)
        choice = flashdiff.explain(op, *args, **kwargs)
        inp["_row_note"] = f"auto chose {choice.impl}: {choice.source}"
        return call(inp, None)

    return Row("auto", "auto", make)


def _explain_or_skip(op: str, *args, **kwargs) -> None:
    import flashdiff

    try:
        flashdiff.explain(op, *args, **kwargs)
    except NotImplementedError as err:
        raise Skip(str(err).split(": ", 1)[-1]) from None


class _Compiler:
    """torch.compile baselines, one compile budget per run (compile time reported apart)."""

    def __init__(self, enabled: bool, mode: str, budget_s: float):
        self.enabled, self.mode, self.budget_s = enabled, mode, budget_s
        self.spent_s = 0.0
        self.times: Dict[str, float] = {}

    def new_op(self) -> None:
        """Each op family gets the whole budget (so e2e is not starved by the norms)."""
        self.spent_s = 0.0

    def compile(self, key: str, fn: Callable, warm: Callable[[Callable], Any]) -> Callable:
        if not self.enabled:
            raise Skip("torch.compile baselines are off (--compile turns them on; on a CPU each "
                       "compile takes ~30 s)")
        if self.spent_s >= self.budget_s:
            raise Skip(f"compile budget of {self.budget_s:.0f} s spent")
        torch._dynamo.reset()  # lambdas share code objects: avoid the recompile limit
        compiled = torch.compile(fn, mode=None if self.mode == "default" else self.mode, dynamic=False)
        t0 = time.perf_counter()
        try:
            warm(compiled)
        except Exception as err:  # noqa: BLE001 - a baseline that fails to compile is reported
            raise Skip(f"torch.compile failed: {_first_line(err)}")
        finally:
            self.spent_s += time.perf_counter() - t0
        self.times[key] = round(time.perf_counter() - t0, 2)
        return compiled
