"""The opt-in global override of torch.nn.functional.scaled_dot_product_attention."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..ops.attention import attention as _fd_attention
from .attention import _TORCH_SDPA, _auto_backend, _is_fusable_sdpa


_sdpa_saved = None  # the function F.scaled_dot_product_attention held before enable


def _sdpa_override(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, with the calls for which auto chose
    something other than torch's default (a fused kernel, or an SDPA kernel the dispatch table
    measured faster, e.g. "torch:cudnn") done by flashdiff.attention; everything else,
    including every CPU call (flashdiff's cpu backend IS torch's SDPA), goes to the saved
    torch function."""
    fallback = _sdpa_saved or _TORCH_SDPA
    if _is_fusable_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) and \
            (scale is None or (isinstance(scale, (int, float)) and math.isfinite(scale))):
        name = _auto_backend(query, key, value, attn_mask, None)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        # cuda's backward differentiates torch SDPA itself: only its forward is routed.
        if name == "triton" or (name is not None and name.startswith("torch:")) or (name == "cuda" and not needs_grad):
            return _fd_attention(query, key, value, attn_mask, scale, backend=None)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, **kwargs)


def enable_sdpa_override() -> None:
    """Route torch.nn.functional.scaled_dot_product_attention through flashdiff process-wide
    (opt in; idempotent). Code that imported the function by name before this call keeps
    torch's."""
    global _sdpa_saved
    if F.scaled_dot_product_attention is _sdpa_override:
        return
    _sdpa_saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_override


def disable_sdpa_override() -> None:
    """Put back the function enable_sdpa_override() found (a no-op when not enabled)."""
    global _sdpa_saved
    if F.scaled_dot_product_attention is _sdpa_override:
        F.scaled_dot_product_attention = _sdpa_saved or _TORCH_SDPA
    _sdpa_saved = None


def sdpa_override_enabled() -> bool:
    return F.scaled_dot_product_attention is _sdpa_override


@contextlib.contextmanager
def sdpa_override():
    """`with flashdiff.sdpa_override(): ...`: enable_sdpa_override() for the block only."""
    was = sdpa_override_enabled()
    enable_sdpa_override()
    try:
        yield
    finally:
        if not was:
            disable_sdpa_override()
