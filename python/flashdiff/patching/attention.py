"""Attention: FlashdiffAttnProcessor (diffusers' AttnProcessor2_0 with the attention done by
flashdiff.attention), the routing rule it shares with the SDPA override, and the walker that
swaps processors."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _validate as check
from ..backends import explain, get_override
from ..ops.attention import attention as _fd_attention, key_padding_mask
from .report import PatchReport, _State

_TORCH_SDPA = F.scaled_dot_product_attention  # captured at import, before any override


def _is_fusable_sdpa(q, k, v, attn_mask, dropout_p=0.0, is_causal=False, enable_gqa=False) -> bool:
    """Structure the fused kernels take: 4-D, no dropout, not causal, no GQA, one float dtype,
    and no mask or a boolean key-padding mask."""
    if dropout_p != 0.0 or is_causal or enable_gqa:
        return False
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if not (q.dtype == k.dtype == v.dtype and q.dtype in check.FLOAT_DTYPES):
        return False
    if not (q.device == k.device == v.device):
        return False
    B, H = q.shape[:2]
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != q.shape[3] or v.shape[2] != k.shape[2]:
        return False
    if attn_mask is None:
        return True
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != q.device or attn_mask.dim() > 4:
        return False
    try:
        return key_padding_mask(attn_mask, B, k.shape[2]) is not None
    except RuntimeError:  # a mask that does not broadcast to [B, Skv]
        return False


_choice_cache: Dict[tuple, Optional[str]] = {}


def _auto_backend(q, k, v, attn_mask, backend) -> Optional[str]:
    """The implementation flashdiff.attention would use for these (structurally fusable)
    inputs ("triton", "torch", "torch:cudnn", ...), or None when an explicit backend cannot
    serve them. Cached per everything the choice reads (device, dtype, shapes: the dispatch
    table's shape class) outside tracing."""
    key = (q.device, q.dtype, q.shape, k.shape[2], v.shape[-1], attn_mask is None, backend, get_override())
    if not torch.compiler.is_compiling() and key in _choice_cache:
        return _choice_cache[key]
    try:
        name = explain("attention", q, k, v, attn_mask, None, backend).impl
    except NotImplementedError:
        name = None
    if not torch.compiler.is_compiling():
        if len(_choice_cache) >= 4096:
            _choice_cache.clear()
        _choice_cache[key] = name
    return name


def _attention_call(q, k, v, attn_mask=None, scale=None, backend=None, fallback=None):
    """flashdiff.attention where it runs well for these inputs, else `fallback()` (the caller's
    original attention call, transformers.py) or torch's SDPA."""
    if _is_fusable_sdpa(q, k, v, attn_mask):
        name = _auto_backend(q, k, v, attn_mask, backend)
        # The reference backend materializes the scores; torch's SDPA is the better fallback.
        if name is not None and name != "reference":
            return _fd_attention(q, k, v, attn_mask, scale, backend=backend)
    if fallback is not None:
        return fallback()
    return _TORCH_SDPA(q, k, v, attn_mask=attn_mask, scale=scale)


class FlashdiffAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention itself done by flashdiff.attention
    (fused when the inputs allow it: no mask or a boolean key-padding mask; additive masks
    and anything else go to torch SDPA, per call)."""

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, S, C)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Sq, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)      # (B, H, Skv, D)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Skv, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # AttnProcessor2_0 uses SDPA's default scale (1/sqrt(D)), not attn.scale: so do we.
        hidden_states = _attention_call(query, key, value, attention_mask, None, self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attn_processor_2_0():
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
        return AttnProcessor2_0
    except ImportError:
        return None


def _patch_attention(root: nn.Module, prefix: str, backend, state: _State, report: PatchReport) -> None:
    from .transformers import _is_routed, _routed_processor  # imports this module

    proc_cls = _attn_processor_2_0()
    for path, m in root.named_modules():
        if not (hasattr(m, "processor") and callable(getattr(m, "set_processor", None))):
            continue
        proc, where = m.processor, prefix + path
        if isinstance(proc, FlashdiffAttnProcessor):
            report.left_alone.append(("attention", where, "already flashdiff"))
        elif proc_cls is not None and type(proc) is proc_cls:
            state.processors.append((m, proc))
            m.set_processor(FlashdiffAttnProcessor(backend))
            report.replaced.append(("attention", where, "AttnProcessor2_0 -> FlashdiffAttnProcessor"))
        elif _is_routed(proc):
            report.left_alone.append(("attention", where, "already flashdiff"))
        else:
            # transformer processors (Flux, SD3, Sana, ...): diffusers' own, attention call rerouted
            routed, what = _routed_processor(proc, backend)
            if routed is None:
                report.left_alone.append(("attention", where, what))
                continue
            state.processors.append((m, proc))
            m.set_processor(routed)
            report.replaced.append(("attention", where, what))
