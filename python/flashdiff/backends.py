"""Backend registry and the "auto" choice, with reasons (DESIGN.md decision 3).

Backends: reference (PyTorch), cpu (flashdiff._cpu, C++/OpenMP), triton
(flashdiff.triton_kernels), cuda (flashdiff._cuda). Each op registers, per backend, a
`supports(**inputs) -> reason or None` and an implementation. `backend=None`/"auto" tries the
op's preference list for the inputs' device and takes the first backend that supports them;
an explicit backend that cannot serve the inputs raises NotImplementedError carrying the reason.

    flashdiff.explain("group_norm", x, 32, activation="silu")   # which backend, and why
    FLASHDIFF_BACKEND=reference python ...                      # force one for every auto call
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _ext

log = logging.getLogger("flashdiff")

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Auto order per device type. The CUDA order is a first guess until GPU benchmarks in
# benchmarks/results/ say otherwise; on the CPU, Triton runs only in its (slow) interpreter
# and is never chosen automatically.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}
AUTO_ORDER_PER_OP = {
    ("scheduler_update", "cuda"): ("cuda", "triton", "reference"),
}

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


def get_override() -> Optional[str]:
    return _override


def backend_status() -> Dict[str, Optional[str]]:
    """{backend: None if usable on this machine, else the reason it is not}."""
    status: Dict[str, Optional[str]] = {"reference": None}
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
    if backend == "reference":
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
    """The result of dispatch: the backend used and why each one before it was skipped."""
    op: str
    backend: str
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.backend}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class OpDispatch:
    """Per-op table of backends: supports() says why not, impl() does the work."""

    def __init__(self, name: str):
        self.name = name
        self.supports: Dict[str, Callable[..., Optional[str]]] = {}
        self.impls: Dict[str, Callable] = {}
        self._cache: Dict[tuple, Choice] = {}

    def register(self, backend: str, impl: Callable, supports: Callable[..., Optional[str]] = lambda **_: None):
        self.supports[backend] = supports
        self.impls[backend] = impl

    def reason(self, backend: str, device: torch.device, inputs: dict) -> Optional[str]:
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation"
        return _device_reason(backend, device) or self.supports[backend](**inputs)

    def choose(self, backend: Optional[str], device: torch.device, inputs: dict, key=None) -> Choice:
        """Pick the backend. `key` (a hashable of everything the supports() checks read, e.g.
        device and dtype) memoizes the choice: the hot path at small sizes is Python overhead."""
        if key is None or torch.compiler.is_compiling():
            return self._choose(backend, device, inputs)
        cache_key = (backend, _override, key)
        choice = self._cache.get(cache_key)
        if choice is None:
            choice = self._cache[cache_key] = self._choose(backend, device, inputs)
        return choice

    def _choose(self, backend: Optional[str], device: torch.device, inputs: dict) -> Choice:
        if backend in (None, "auto"):
            backend = _override
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
            why = self.reason(backend, device, inputs)
            if why is not None:
                raise NotImplementedError(f"flashdiff.{self.name}: backend {backend!r} cannot serve "
                                          f"these inputs: {why}")
            return Choice(self.name, backend)
        order = AUTO_ORDER_PER_OP.get((self.name, device.type)) or AUTO_ORDER.get(device.type, ("reference",))
        skipped: Dict[str, str] = {}
        for name in order:
            why = self.reason(name, device, inputs)
            if why is None:
                if skipped and not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
                    log.debug("flashdiff.%s fell back to %s: %s", self.name, name, skipped)
                return Choice(self.name, name, skipped)
            skipped[name] = why
        raise NotImplementedError(f"flashdiff.{self.name}: no backend can serve these inputs: {skipped}")


REGISTRY: Dict[str, Tuple[OpDispatch, Callable]] = {}


def register_op(dispatch: OpDispatch, resolve: Callable) -> None:
    """`resolve(*args, **kwargs) -> Choice` validates the public call and picks a backend."""
    REGISTRY[dispatch.name] = (dispatch, resolve)


def explain(op: str, *args, **kwargs) -> Choice:
    """Which backend `flashdiff.<op>(*args, **kwargs)` would use, and why the others were
    skipped, without running it. Example: print(flashdiff.explain("attention", q, k, v))."""
    if op not in REGISTRY:
        raise ValueError(f"op must be one of {sorted(REGISTRY)}, got {op!r}")
    return REGISTRY[op][1](*args, **kwargs)


set_override(os.environ.get("FLASHDIFF_BACKEND"))
_ext.preload(include_triton=torch.cuda.is_available() or _ext.triton_interpreter_active())
