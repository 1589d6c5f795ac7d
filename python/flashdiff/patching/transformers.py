"""Attention in diffusion-transformer processors (Flux, SD3/SD3.5, Sana, PixArt's fused QKV,
and any other diffusers processor that calls the attention directly), served by
diffusers' own processor code with only the attention call rerouted.

How: a processor's `__call__` finds `dispatch_attention_fn` (Flux and the other dispatch-based
models) or `F` (`F.scaled_dot_product_attention`: JointAttnProcessor2_0, SanaAttnProcessor2_0,
...) among its module's globals. `_rebind` makes a new function object from the *same code*
with one of those globals swapped for a router (`_route_dispatch`, or a copy of
torch.nn.functional whose `scaled_dot_product_attention` is `_route_sdpa`), and a subclass of
the processor's class carries it as `__call__`. Nothing of diffusers' processor is copied or
rewritten: norm_q/norm_k, RoPE (diffusers' apply_rotary_emb), the joint text+image concat, the
output projections all run as diffusers wrote them, and `inspect.signature(proc.__call__)`
(which diffusers uses to filter kwargs) is unchanged. The swap is scoped to the patched
model's processors: diffusers' module, its backend registry and every other model are
untouched, and `unpatch` puts the original processor objects back.

Each routed call goes to `flashdiff.attention` (its measured auto dispatch, or the backend
given to `patch`) when the inputs have a structure the fused kernels take (see
attention._attention_call); anything else, and any call for which diffusers would use a
backend other than "native" (set_attention_backend, DIFFUSERS_ATTN_BACKEND, context parallel,
extra attention_kwargs), runs the original function with the original arguments.

norm_q/norm_k + RoPE are left to diffusers, not routed through flashdiff.qk_norm_rope. The norms
are module-attribute calls, and Flux's double blocks concatenate text and image heads between
the norm and apply_rotary_emb, so no rebound global sees both halves (docs/patch.md).
"""
from __future__ import annotations

import functools
import math
import sys
import types
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as _tfn

from .attention import _attention_call

_SDPA = "scaled_dot_product_attention"


# ------------------------------------------------------------------ routers
def _route_sdpa(backend: Optional[str]) -> Callable:
    """F.scaled_dot_product_attention with the calls flashdiff can serve sent to it."""

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        def original():
            # Looked up per call, so an enabled flashdiff.sdpa_override (or a user's own
            # patch of torch) still sees the calls flashdiff leaves.
            extra = {"enable_gqa": True} if enable_gqa else {}
            return _tfn.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal, scale=scale, **extra)

        if dropout_p != 0.0 or is_causal or enable_gqa or not (
                scale is None or (isinstance(scale, (int, float)) and math.isfinite(scale))):
            return original()
        return _attention_call(query, key, value, attn_mask, scale, backend, fallback=original)

    return scaled_dot_product_attention


def _native_backend_name():
    from diffusers.models.attention_dispatch import AttentionBackendName
    return AttentionBackendName.NATIVE


def _route_dispatch(original: Callable, fd_backend: Optional[str]) -> Callable:
    """diffusers' dispatch_attention_fn with the calls its "native" backend would serve
    (torch SDPA on [B, S, H, D] inputs) sent to flashdiff; every other call to `original`."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    native = _native_backend_name()

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        def call_original():
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            attention_kwargs, backend=backend, parallel_config=parallel_config)

        chosen = backend if backend is not None else _AttentionBackendRegistry.get_active_backend()[0]
        if (chosen != native or parallel_config is not None or attention_kwargs or dropout_p != 0.0
                or is_causal or enable_gqa or query.dim() != 4):
            return call_original()
        mask = attn_mask
        # as diffusers' native backend: a [B, Skv] mask is a key-padding mask [B, 1, 1, Skv]
        if mask is not None and mask.dim() == 2 and mask.shape[0] == query.shape[0] and mask.shape[1] == key.shape[1]:
            mask = mask[:, None, None, :]
        q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # [B, S, H, D] -> [B, H, S, D]
        # the fallback's permutes are views both ways: its result is diffusers' own, bit for bit
        out = _attention_call(q, k, v, mask, scale, fd_backend, fallback=lambda: call_original().permute(0, 2, 1, 3))
        return out.permute(0, 2, 1, 3)

    return dispatch_attention_fn


# ------------------------------------------------------------------ rebinding diffusers' code
def _rebind(fn: types.FunctionType, name: str, value, module_name: str) -> types.FunctionType:
    """`fn`'s code, defaults and closure with the global `name` seen as `value`. The globals
    are a snapshot of fn's module taken at patch time (one per processor class), held by a
    module registered as `module_name`: torch.compile finds a function's globals through
    `sys.modules[globals["__name__"]]`, so they must be a real module's, not diffusers'."""
    mod = types.ModuleType(module_name)
    g = mod.__dict__
    g.update({k: v for k, v in fn.__globals__.items() if k not in ("__name__", "__spec__", "__loader__", "__file__", "__cached__")})
    g[name] = value
    sys.modules[module_name] = mod
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    functools.update_wrapper(new, fn, updated=())
    del new.__wrapped__  # inspect.signature must read the new function itself (same code)
    return new


def _functional_with(sdpa: Callable) -> types.ModuleType:
    """A module object with torch.nn.functional's names, `scaled_dot_product_attention` replaced."""
    mod = types.ModuleType("torch.nn.functional")
    mod.__dict__.update(_tfn.__dict__)
    setattr(mod, _SDPA, sdpa)
    return mod


def _attention_global(cls) -> Tuple[Optional[str], str]:
    """(global to swap, description) for a processor class, or (None, why not)."""
    fn = cls.__dict__.get("__call__") or getattr(cls, "__call__", None)
    if not isinstance(fn, types.FunctionType):
        return None, "its __call__ is not a Python function"
    names, g = fn.__code__.co_names, fn.__globals__
    try:
        from diffusers.models import attention_dispatch
        dispatch = attention_dispatch.dispatch_attention_fn
    except ImportError:
        dispatch = None
    if "dispatch_attention_fn" in names and dispatch is not None and g.get("dispatch_attention_fn") is dispatch:
        return "dispatch_attention_fn", "dispatch_attention_fn"
    if _SDPA in names:
        aliases = [n for n in names if g.get(n) is _tfn]
        if len(aliases) == 1:
            return aliases[0], f"{aliases[0]}.{_SDPA}"
    return None, ("calls neither diffusers' dispatch_attention_fn nor F.scaled_dot_product_attention "
                  "itself (e.g. linear attention, xformers, sliced or NPU/XLA kernels)")


@functools.lru_cache(maxsize=None)
def _routed_class(cls, backend: Optional[str]):
    """`cls` with `__call__` rebound to route its attention through flashdiff (cached per
    class and backend), or None when `cls` calls no attention function flashdiff can take."""
    name, _ = _attention_global(cls)
    if name is None:
        return None
    fn = getattr(cls, "__call__")
    module_name = f"{__name__}._rebound__{cls.__module__.replace('.', '_')}__{cls.__qualname__}__{backend or 'auto'}"
    if name == "dispatch_attention_fn":
        value = _route_dispatch(fn.__globals__[name], backend)
    else:
        value = _functional_with(_route_sdpa(backend))
    return type(f"Flashdiff{cls.__name__}", (cls,), {
        "__call__": _rebind(fn, name, value, module_name),
        "__module__": __name__,
        "__doc__": f"diffusers' {cls.__name__} with its attention call routed through flashdiff.attention.",
        "_flashdiff_original_class": cls,
    })


def _routed_processor(proc, backend: Optional[str]):
    """(a new processor of the routed subclass with `proc`'s attributes, what) or (None, why)."""
    cls = type(proc)
    if not cls.__module__.startswith("diffusers."):
        return None, f"processor {cls.__name__} is not one of diffusers' (custom processors are left alone)"
    if isinstance(proc, nn.Module):
        return None, f"processor {cls.__name__} is an nn.Module holding weights (IP-adapter, LoRA); not wrapped"
    attn_backend = getattr(proc, "_attention_backend", None)
    if attn_backend is not None and attn_backend != _native_backend_name():
        return None, f"{cls.__name__} uses diffusers' attention backend {getattr(attn_backend, 'value', attn_backend)!r}"
    name, what = _attention_global(cls)
    routed = _routed_class(cls, backend) if name is not None else None
    if routed is None:
        return None, f"processor {cls.__name__} has no flashdiff equivalent: it {what}"
    new = object.__new__(routed)
    new.__dict__.update(proc.__dict__)  # per-instance settings (_attention_backend, scale, ...) carry over
    return new, f"{cls.__name__}: diffusers' processor, its {what} -> flashdiff.attention"


def _is_routed(proc) -> bool:
    return "_flashdiff_original_class" in type(proc).__dict__
