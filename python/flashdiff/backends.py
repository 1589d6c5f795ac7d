"""Backend registry and the "auto" choice, with reasons (DESIGN.md decision 3).

Backends: reference (the PyTorch definition, for tests), torch (torch's own fastest path:
SDPA, F.group_norm, the eager update expression), cpu (flashdiff._cpu, C++/OpenMP), triton
(flashdiff.triton_kernels), cuda (flashdiff._cuda). Each op registers, per backend, a
`supports(**inputs) -> reason or None` and an implementation. `backend=None`/"auto" takes the
fastest backend a dispatch table measured for the inputs' shape class on this GPU
(flashdiff.dispatch_table), else the documented fallback rule; an explicit backend that
cannot serve the inputs raises NotImplementedError carrying the reason.

    flashdiff.explain("group_norm", x, 32, activation="silu")   # which backend, and why
    FLASHDIFF_BACKEND=torch python ...                          # force one for every auto call
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _ext, dispatch_table

log = logging.getLogger("flashdiff")

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")

# How auto chooses (DESIGN.md decision 3): on a GPU with a dispatch table (written by
# `flashdiff tune`, or shipped for the cards we measured), the fastest measured backend of the
# nearest shape class that supports the inputs; otherwise the documented fallback rule
# `dispatch_table.FALLBACK_ORDER`, which prefers torch's own path unless a measurement says
# otherwise. The Triton interpreter (CPU) is never chosen automatically.

_override: Optional[str] = None


def set_override(backend: Optional[str]) -> None:
    """Force `backend` for every call made with backend=None (None restores auto).
    The FLASHDIFF_BACKEND environment variable sets this at import."""
    global _override
    if backend in (None, "", "auto"):
        _override = None
        return
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    _override = backend
    clear_choice_caches()


def get_override() -> Optional[str]:
    return _override


def backend_status() -> Dict[str, Optional[str]]:
    """{backend: None if usable on this machine, else the reason it is not}."""
    status: Dict[str, Optional[str]] = {"reference": None, "torch": None}
    status["cpu"] = _ext.load_cpu()[1]
    triton_mod, reason = _ext.load_triton()
    if triton_mod is not None and not torch.cuda.is_available() and not _ext.triton_interpreter_active():
        reason = "no CUDA device for triton (TRITON_INTERPRET=1 runs it on the CPU, slowly, for tests)"
    status["triton"] = reason
    if not torch.cuda.is_available():
        cuda_mod, cuda_reason = _ext.load_cuda_module_only()
        status["cuda"] = ("torch sees no CUDA device" if cuda_mod is not None
                          else f"flashdiff._cuda is not built ({cuda_reason})")
    else:
        status["cuda"] = _ext.load_cuda()[1]
    return status


def available_backends() -> List[str]:
    """Backends usable on this machine (for at least one device)."""
    return [name for name, reason in backend_status().items() if reason is None]


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` at all, regardless of the op (None = it can)."""
    if backend in ("reference", "torch"):
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, inputs are on {device}"
        return _ext.load_cpu()[1]
    if backend == "triton":
        if device.type == "cpu" and not _ext.triton_interpreter_active():
            return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device}"
        return _ext.load_triton()[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, inputs are on {device}"
        return _ext.load_cuda()[1]
    return f"unknown backend {backend!r}"


@dataclass
class Choice:
    """The result of dispatch: the backend used, the implementation (the backend, or
    "backend:variant" such as "torch:cudnn"), why each backend before it was skipped, and
    where the choice came from (a dispatch table with the measured ratio, or the rule)."""
    op: str
    backend: str
    skipped: Dict[str, str] = field(default_factory=dict)
    impl: str = ""
    source: str = ""
    backward: str = ""  # how gradients are computed on this backend

    def __post_init__(self):
        self.impl = self.impl or self.backend

    def __str__(self) -> str:
        head = f"{self.op}: {self.backend}" + (f" ({self.impl})" if self.impl != self.backend else "")
        lines = [head]
        if self.source:
            lines.append(f"  because: {self.source}")
        if self.backward:
            lines.append(f"  backward: {self.backward}")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


_CHOICE_CACHE_MAX = 4096


class OpDispatch:
    """Per-op table of backends: supports() says why not, impls[name]() does the work.
    `features(**inputs)` gives the shape class the dispatch table is looked up with."""

    def __init__(self, name: str, features: Optional[Callable[..., dict]] = None,
                 backward: Optional[Dict[str, str]] = None):
        self.name = name
        self.features = features
        # backend -> how its gradients are computed ("*": every other backend); explain says it
        self.backward = backward or {}
        self.supports: Dict[str, Callable[..., Optional[str]]] = {}
        self.impls: Dict[str, Callable] = {}
        self._cache: Dict[tuple, Choice] = {}
        self.on_clear: List[Callable[[], None]] = []  # other memos keyed on choices

    def register(self, backend: str, impl: Callable, supports: Callable[..., Optional[str]] = lambda **_: None):
        self.supports[backend] = supports
        self.impls[backend] = impl

    def register_variant(self, backend: str, variant: str, impl: Callable) -> None:
        """An alternative implementation of `backend` a dispatch table may pick (same
        supports); explicit `backend=` calls use the plain one."""
        self.impls[f"{backend}:{variant}"] = impl

    def reason(self, backend: str, device: torch.device, inputs: dict) -> Optional[str]:
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation"
        return _device_reason(backend, device) or self.supports[backend](**inputs)

    def clear(self) -> None:
        self._cache.clear()
        for hook in self.on_clear:
            hook()

    def backward_note(self, backend: str) -> str:
        return self.backward.get(backend, self.backward.get("*", ""))

    def choose(self, backend: Optional[str], device: torch.device, inputs: dict, key=None) -> Choice:
        """Pick the backend. `key` (a hashable of everything supports() and the shape class
        read, e.g. device, dtype and sizes) memoizes the choice: the hot path at small sizes
        is Python overhead."""
        if key is None or torch.compiler.is_compiling():
            return self._choose(backend, device, inputs)
        cache_key = (backend, _override, key)
        choice = self._cache.get(cache_key)
        if choice is None:
            if len(self._cache) >= _CHOICE_CACHE_MAX:
                self._cache.clear()
            choice = self._cache[cache_key] = self._choose(backend, device, inputs)
        return choice

    def _choose(self, backend: Optional[str], device: torch.device, inputs: dict) -> Choice:
        if backend in (None, "auto"):
            backend = _override
        if backend is not None:
            # "name" or "name:variant" (a variant is addressable for validation and tests)
            base, _, variant = backend.partition(":")
            if base not in BACKENDS:
                raise ValueError(f"backend must be one of {('auto',) + BACKENDS} (or 'backend:variant'), "
                                 f"got {backend!r}")
            if variant and backend not in self.impls:
                raise NotImplementedError(f"flashdiff.{self.name}: no implementation {backend!r} (variants: "
                                          f"{sorted(k for k in self.impls if ':' in k) or 'none'})")
            why = self.reason(base, device, inputs)
            if why is not None:
                raise NotImplementedError(f"flashdiff.{self.name}: backend {backend!r} cannot serve "
                                          f"these inputs: {why}")
            return Choice(self.name, base, impl=backend, source="asked for explicitly")
        skipped: Dict[str, str] = {}
        if torch.compiler.is_compiling():
            # Tracing runs this Python once per graph: no table files, locks or device queries
            # inside it (they would break fullgraph=True). A compiled model gets the rule.
            measured, why_rule = None, "under torch.compile: the fallback rule (no table lookups while tracing)"
        else:
            measured = self._choose_measured(device, inputs, skipped)
            why_rule = None
        if measured is not None:
            return measured
        order = dispatch_table.fallback_order(self.name, device.type)
        why_rule = why_rule or self._rule_reason(device)
        for name in order:
            if name in skipped:
                continue
            why = self.reason(name, device, inputs)
            if why is None:
                if skipped and not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
                    log.debug("flashdiff.%s fell back to %s: %s", self.name, name, skipped)
                return Choice(self.name, name, skipped, source=why_rule)
            skipped[name] = why
        raise NotImplementedError(f"flashdiff.{self.name}: no backend can serve these inputs: {skipped}")

    def _choose_measured(self, device, inputs, skipped) -> Optional[Choice]:
        """The fastest implementation the dispatch table measured for the nearest class."""
        if self.features is None:
            return None
        table = dispatch_table.table_for(device)  # None off GPUs
        if table is None:
            return None
        found = table.lookup(self.name, self.features(**inputs))
        if found is None:
            return None
        for impl, _ms in found.ranked():
            name = impl.split(":")[0]
            if name in skipped or impl not in self.impls:
                continue
            why = self.reason(name, device, inputs)
            if why is None:
                return Choice(self.name, name, skipped, impl=impl, source=found.describe(impl))
            skipped[name] = why
        return None

    def _rule_reason(self, device: torch.device) -> str:
        table = dispatch_table.table_for(device)
        if device.type != "cuda" and table is None:
            return f"the {device.type} rule (dispatch_table.FALLBACK_ORDER; measured on 2-core EPYCs)"
        if table is None:
            return ("no dispatch table for this GPU (run `flashdiff tune`): the fallback rule, "
                    "which prefers torch unless a measurement says otherwise")
        return f"table {table.origin} has no class for these inputs: the fallback rule"


def variant_names() -> List[str]:
    """Every "backend:variant" implementation registered on any op (sorted)."""
    return sorted({name for dispatch, _ in REGISTRY.values() for name in dispatch.impls if ":" in name})


def clear_choice_caches() -> None:
    """Forget memoized choices (after a new dispatch table or override)."""
    for dispatch, _ in REGISTRY.values():
        dispatch.clear()


REGISTRY: Dict[str, Tuple[OpDispatch, Callable]] = {}


def register_op(dispatch: OpDispatch, resolve: Callable) -> None:
    """`resolve(*args, **kwargs) -> Choice` validates the public call and picks a backend."""
    REGISTRY[dispatch.name] = (dispatch, resolve)


def explain(op: str, *args, **kwargs) -> Choice:
    """Which backend `flashdiff.<op>(*args, **kwargs)` would use, and why the others were
    skipped, without running it. Example: print(flashdiff.explain("attention", q, k, v))."""
    if op not in REGISTRY:
        raise ValueError(f"op must be one of {sorted(REGISTRY)}, got {op!r}")
    choice = REGISTRY[op][1](*args, **kwargs)
    note = REGISTRY[op][0].backward_note(choice.backend)
    return choice if not note else Choice(choice.op, choice.backend, choice.skipped, choice.impl, choice.source, note)


set_override(os.environ.get("FLASHDIFF_BACKEND"))
_ext.preload(include_triton=torch.cuda.is_available() or _ext.triton_interpreter_active())
