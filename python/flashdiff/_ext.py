"""Load the optional compiled modules and Triton once, remembering why one is missing.

Results live in a plain dict, not functools.lru_cache: torch.compile traces through the
callers and would re-run an lru_cache-wrapped import inside the graph (an unsupported call).
flashdiff/__init__ fills the cache eagerly, so a traced dispatch only reads it.
"""
from __future__ import annotations

import importlib
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


_CACHE: dict = {}


def _cached(loader):
    def wrapper():
        if loader.__name__ not in _CACHE:
            _CACHE[loader.__name__] = loader()
        return _CACHE[loader.__name__]

    wrapper.__name__ = loader.__name__
    wrapper.__doc__ = loader.__doc__
    return wrapper


def _build_note(name: str) -> str:
    """What setup.py recorded about building `name` (see setup.py BuildExt), if anything."""
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            info = json.load(f).get(name)
    except (OSError, ValueError):
        return ""
    if info and not info.get("built", True):
        return f"; the build failed: {info.get('reason', '?')[:300]}"
    return ""


@_cached
def load_cpu():
    """Return (module, None) or (None, reason)."""
    # flashdiff._cpu needs libgomp.so.1; torch's own is loaded first and satisfies it, so the
    # kernels share torch's OpenMP thread pool (torch.set_num_threads applies to both).
    try:
        return importlib.import_module("flashdiff._cpu"), None
    except ImportError as err:
        return None, f"flashdiff._cpu is not built ({err}){_build_note('_cpu')}"


@_cached
def load_cuda():
    """Return (module, None) when the CUDA module is built AND a CUDA device is usable."""
    try:
        mod = importlib.import_module("flashdiff._cuda")
    except ImportError as err:
        note = _build_note("_cuda") or " (nvcc was not found at install time, or FLASHDIFF_CUDA=0)"
        return None, f"flashdiff._cuda is not built ({err}){note}"
    if mod.device_count() == 0:
        return None, f"flashdiff._cuda is built but {mod.device_status()}"
    return mod, None


@_cached
def load_cuda_module_only():
    """The CUDA module even without a device (for `flashdiff info` and import tests)."""
    try:
        return importlib.import_module("flashdiff._cuda"), None
    except ImportError as err:
        return None, f"{err}{_build_note('_cuda')}"


@_cached
def load_triton():
    """Return (flashdiff.triton_kernels, None) or (None, reason)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f"triton is not installed ({err}); pip install 'flashdiff[triton]'"
    try:
        return importlib.import_module("flashdiff.triton_kernels"), None
    except ImportError as err:
        return None, f"flashdiff.triton_kernels failed to import ({err})"


def triton_interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def preload(include_triton: bool) -> None:
    """Fill the cache outside any trace (triton's import takes a second: only when useful)."""
    load_cpu()
    load_cuda_module_only()
    if include_triton:
        load_triton()
