"""Measured dispatch: which backend is fastest for a shape class on this GPU.

`flashdiff tune` times every backend that can serve an op (the `torch` backend included) over
shape classes that cover diffusion models and writes a table (JSON) to the user cache dir.
`backend=None` ("auto") reads it: the fastest measured backend of the nearest class. Tables
from committed GPU runs ship in the package (`flashdiff/dispatch_tables/`). Without a table
the documented fallback rule applies (`fallback_order`).

A shape class is a small dict of features. Categorical features (dtype, mask, layout, ...)
must match exactly; numeric features are log2 of a size, and the nearest class is the one
with the smallest sum of |log2 differences|. Example for attention:

    {"dtype": "bf16", "mask": False, "log2_d": 6.0, "log2_sq": 12.0, "log2_skv": 12.0, "log2_bh": 3.3}

Table format (schema "flashdiff-dispatch/1"):

    {"schema": ..., "device": {"name": "NVIDIA H200", "capability": [9, 0]},
     "versions": {"torch": ..., "triton": ..., "flashdiff": ..., "cuda": ...},
     "created": "2026-12-01", "commit": "abc1234", "source": "flashdiff tune --quick",
     "entries": {"attention": [{"features": {...}, "shape": "B1 H8 S4096/4096 D40",
                                "times_ms": {"torch": 0.09, "triton": 0.2, ...},
                                "best": "torch", "variant": "cudnn"}, ...], ...},
     "triton_configs": {"attention": {...}}}

`times_ms` keys are implementation names: a backend ("triton") or a backend with a variant
("torch:cudnn" = torch's SDPA restricted to its cuDNN kernel first).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SCHEMA = "flashdiff-dispatch/1"
_SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "dispatch_tables")

# Without a table for this GPU: what auto tries, in order, per op. The rule prefers torch's
# own path (never slower than torch, by construction) except where a fused kernel removes
# whole passes over memory that no torch eager path can: the sampler update reads x, two model
# outputs and writes one tensor once, where torch eager runs ~12 elementwise kernels (on the
# H200, 2026-11-26, the fused update took ~5 µs at every latent size measured).
FALLBACK_ORDER = {
    "cuda": {
        "attention": ("torch", "reference"),
        "group_norm": ("torch", "reference"),
        "layer_norm": ("torch", "reference"),
        "rms_norm": ("torch", "reference"),
        "scheduler_update": ("cuda", "triton", "torch", "reference"),
    },
    # CPU: measured on 2-core EPYCs (benchmarks/results/*-cpu-*): the C++ group norm and update
    # beat torch eager 1.7-10x; the cpu attention backend is torch's own SDPA. The C++ layer norm
    # and rms norm beat the torch backend (F.layer_norm + modulation, F.rms_norm) in one process on
    # a 2-core EPYC (2026-12-01, min of interleaved blocks): adaLN 2.2-13x, plain LayerNorm
    # 1.3-3.3x (bf16 [8, 64, 64] even at 0.95x), q/k RMSNorm 1.1-26x.
    "cpu": {
        "attention": ("cpu", "torch", "reference"),
        "group_norm": ("cpu", "torch", "reference"),
        "layer_norm": ("cpu", "torch", "reference"),
        "rms_norm": ("cpu", "torch", "reference"),
        "scheduler_update": ("cpu", "torch", "reference"),
    },
}


def fallback_order(op: str, device_type: str) -> Tuple[str, ...]:
    return FALLBACK_ORDER.get(device_type, {}).get(op, ("torch", "reference"))


# ------------------------------------------------------------------ shape classes
def _log2(n: float) -> float:
    return round(math.log2(max(float(n), 1.0)), 2)


_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def attention_features(q, k, attn_mask) -> dict:
    B, H, Sq, D = q.shape
    return {"dtype": _DTYPE_NAME.get(q.dtype, str(q.dtype)), "mask": attn_mask is not None,
            "log2_d": _log2(D), "log2_sq": _log2(Sq), "log2_skv": _log2(k.shape[2]), "log2_bh": _log2(B * H)}


def group_norm_features(x, num_groups, scale, activation) -> dict:
    N, C = x.shape[:2]
    spatial = x.numel() // max(N * C, 1)
    channels_last = (not x.is_contiguous()) and x.dim() >= 3 and x.movedim(1, -1).is_contiguous()
    return {"dtype": _DTYPE_NAME.get(x.dtype, str(x.dtype)), "channels_last": bool(channels_last),
            "modulated": scale is not None,
            "log2_group": _log2(C // num_groups * spatial), "log2_ng": _log2(N * num_groups)}


def scheduler_features(sample, model_output_uncond) -> dict:
    return {"dtype": _DTYPE_NAME.get(sample.dtype, str(sample.dtype)), "cfg": model_output_uncond is not None,
            "log2_numel": _log2(sample.numel())}


# Summed |log2| steps beyond which the nearest class no longer stands for the inputs (e.g.
# three size doublings, or fp16 read from bf16 plus two doublings): the rule applies instead.
MAX_DISTANCE = 3.0
_HALF = ("fp16", "bf16")
HALF_DTYPE_PENALTY = 1.0  # a class measured in the other 16-bit float type counts as one size step away


def _distance(a: dict, b: dict) -> float:
    """inf unless the categorical features agree; else the summed |log2 difference|. fp16 and
    bf16 run the same kernels at the same speed, so where only the other one was measured its
    classes still count, one step further away."""
    d = 0.0
    for name, value in a.items():
        other = b.get(name)
        if name.startswith("log2_"):
            if other is None:
                return math.inf
            d += abs(float(value) - float(other))
        elif other != value:
            if name == "dtype" and value in _HALF and other in _HALF:
                d += HALF_DTYPE_PENALTY
                continue
            return math.inf
    return d


# ------------------------------------------------------------------ tables
@dataclass
class Lookup:
    """What the table says for one input: the class matched and the measured times."""
    table: "Table"
    entry: dict
    distance: float

    def ranked(self) -> List[Tuple[str, float]]:
        """(implementation, ms) fastest first; failed implementations (None) left out."""
        times = {k: v for k, v in self.entry.get("times_ms", {}).items() if v is not None}
        return sorted(times.items(), key=lambda kv: kv[1])

    def describe(self, chosen_impl: str) -> str:
        ranked = self.ranked()
        times = dict(ranked)
        t = times.get(chosen_impl)
        others = [(k, v) for k, v in ranked if k != chosen_impl]
        parts = [f"table {self.table.origin}", f"class {self.entry.get('shape', self.entry['features'])}"
                 + (f" (distance {self.distance:.2f})" if self.distance else " (exact)")]
        if t is not None and others:
            runner_up, t2 = others[0]
            parts.append(f"measured {chosen_impl} {t * 1e3:.1f} us vs {runner_up} {t2 * 1e3:.1f} us "
                         f"({t2 / t:.2f}x)")
            torch_t = min((v for k, v in ranked if k.split(":")[0] == "torch"), default=None)
            if torch_t is not None and not chosen_impl.startswith("torch"):
                parts.append(f"{torch_t / t:.2f}x torch")
        return "; ".join(parts)


class Table:
    def __init__(self, data: dict, origin: str):
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{origin}: not a flashdiff dispatch table (schema {data.get('schema')!r}, "
                             f"expected {SCHEMA!r})")
        self.data = data
        self.origin = origin
        self.entries: Dict[str, List[dict]] = data.get("entries", {})

    @property
    def device_name(self) -> str:
        return self.data.get("device", {}).get("name", "")

    @property
    def capability(self) -> Tuple[int, int]:
        return tuple(self.data.get("device", {}).get("capability", (0, 0)))  # type: ignore[return-value]

    def lookup(self, op: str, features: dict) -> Optional[Lookup]:
        """The nearest measured class, or None when even that is more than MAX_DISTANCE away
        (a shape unlike anything measured is not guessed from a far-off class)."""
        best, best_d = None, math.inf
        for entry in self.entries.get(op, ()):
            d = _distance(features, entry["features"])
            if d < best_d:
                best, best_d = entry, d
        return None if best is None or best_d > MAX_DISTANCE else Lookup(self, best, best_d)

    @classmethod
    def load(cls, path: str) -> "Table":
        with open(path) as f:
            return cls(json.load(f), path)


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file names of tables)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cache_dir() -> str:
    """Where `flashdiff tune` writes tables: $FLASHDIFF_CACHE_DIR, else $XDG_CACHE_HOME/flashdiff,
    else ~/.cache/flashdiff."""
    explicit = os.environ.get("FLASHDIFF_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flashdiff")


def table_filename(device_name: str, capability: Sequence[int]) -> str:
    return f"dispatch-{slug(device_name)}-sm{capability[0]}{capability[1]}.json"


def candidate_paths(device_name: str, capability: Sequence[int]) -> List[str]:
    """In order: $FLASHDIFF_DISPATCH_TABLE, the user cache, the tables shipped in the package."""
    name = table_filename(device_name, capability)
    paths = []
    if os.environ.get("FLASHDIFF_DISPATCH_TABLE"):
        paths.append(os.environ["FLASHDIFF_DISPATCH_TABLE"])
    paths += [os.path.join(cache_dir(), name), os.path.join(_SHIPPED_DIR, name)]
    return paths


_lock = threading.Lock()
_tables: Dict[Tuple[str, Tuple[int, int]], Optional[Table]] = {}
_load_errors: Dict[str, str] = {}


def _device_identity(device: torch.device) -> Optional[Tuple[str, Tuple[int, int]]]:
    """(GPU name, compute capability); None for devices that have no tables (CPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def table_for(device: torch.device) -> Optional[Table]:
    """The dispatch table for the GPU holding `device` (None: none, or not a GPU). A table
    whose device name or capability differs from the GPU is not used; a broken file is
    skipped with its error kept for `load_errors()`."""
    ident = _device_identity(device)
    if ident is None:
        return None
    with _lock:
        if ident in _tables:
            return _tables[ident]
        table = None
        for path in candidate_paths(*ident):
            if not os.path.exists(path):
                continue
            try:
                t = Table.load(path)
            except (OSError, ValueError) as err:
                _load_errors[path] = str(err)
                continue
            if t.device_name == ident[0] and t.capability == ident[1]:
                table = t
                break
            _load_errors[path] = (f"measured on {t.device_name} sm_{t.capability[0]}{t.capability[1]}, "
                                  f"not this {ident[0]}")
        _tables[ident] = table
        if table is not None:
            _seed_triton_configs(table)
        return table


def _seed_triton_configs(table: Table) -> None:
    """Give the Triton launchers the configs the tune chose, so a shape class seen there is
    never autotuned at run time."""
    configs = table.data.get("triton_configs", {}).get("attention")
    if not configs:
        return
    from . import _ext

    module = _ext.load_triton()[0]
    loader = getattr(getattr(module, "attention", None), "load_tuned_configs", None)
    if loader is not None:
        loader(configs)


def set_table(device_name: str, capability: Sequence[int], table: Optional[Table]) -> None:
    """Install `table` for a GPU (tests; `flashdiff tune` after writing one). Clears the
    backend choices memoized from the previous table."""
    from . import backends

    with _lock:
        _tables[(device_name, tuple(capability))] = table
    backends.clear_choice_caches()


def reload() -> None:
    """Forget loaded tables (they are read again on the next auto choice)."""
    from . import backends

    with _lock:
        _tables.clear()
        _load_errors.clear()
    backends.clear_choice_caches()


def load_errors() -> Dict[str, str]:
    return dict(_load_errors)
