"""Load the optional compiled modules and Triton once, remembering why one is missing."""
from __future__ import annotations

import functools
import importlib
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


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


@functools.lru_cache(maxsize=None)
def load_cpu():
    """Return (module, None) or (None, reason)."""
    try:
        return importlib.import_module("flashdiff._cpu"), None
    except ImportError as err:
        return None, f"flashdiff._cpu is not built ({err}){_build_note('_cpu')}"


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def load_cuda_module_only():
    """The CUDA module even without a device (for `flashdiff info` and import tests)."""
    try:
        return importlib.import_module("flashdiff._cuda"), None
    except ImportError as err:
        return None, f"{err}{_build_note('_cuda')}"


@functools.lru_cache(maxsize=None)
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
