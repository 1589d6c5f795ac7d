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


def _import_error(err: BaseException) -> str:
    """An import failure in one line: a module that exists but fails to load (a corrupt or
    truncated .so, a missing shared library, an exception in its init) is reported like a
    missing one, so flashdiff still imports and serves the other backends."""
    return f"{type(err).__name__}: {err}" if not isinstance(err, ImportError) else str(err)


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
    except Exception as err:  # not only ImportError: see _import_error
        return None, f"flashdiff._cpu is not built or failed to load ({_import_error(err)}){_build_note('_cpu')}"


@_cached
def load_cuda():
    """Return (module, None) when the CUDA module is built AND a CUDA device is usable."""
    mod, reason = load_cuda_module_only()
    if mod is None:
        note = "" if "build failed" in reason else " (nvcc was not found at install time, or FLASHDIFF_CUDA=0)"
        return None, f"flashdiff._cuda is not built or failed to load ({reason}){note}"
    try:
        if mod.device_count() == 0:
            return None, f"flashdiff._cuda is built but {mod.device_status()}"
    except Exception as err:  # a broken driver must not take the import down with it
        return None, f"flashdiff._cuda is built but its device query failed ({_import_error(err)})"
    return mod, None


@_cached
def load_cuda_module_only():
    """The CUDA module even without a device (for `flashdiff info` and import tests)."""
    try:
        return importlib.import_module("flashdiff._cuda"), None
    except Exception as err:
        return None, f"{_import_error(err)}{_build_note('_cuda')}"


@_cached
def load_triton():
    """Return (flashdiff.triton_kernels, None) or (None, reason)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f"triton is not installed ({err}); pip install 'flashdiff[triton]'"
    except Exception as err:  # installed but broken (e.g. a mismatched build): say so, go on
        return None, f"triton failed to import ({_import_error(err)})"
    try:
        return importlib.import_module("flashdiff.triton_kernels"), None
    except Exception as err:
        return None, f"flashdiff.triton_kernels failed to import ({_import_error(err)})"


def triton_interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def preload(include_triton: bool) -> None:
    """Fill the cache outside any trace (triton's import takes a second: only when useful)."""
    load_cpu()
    load_cuda_module_only()
    if include_triton:
        load_triton()
