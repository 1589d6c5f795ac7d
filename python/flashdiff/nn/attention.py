"""Attention: fused qkv projection → `flashdiff.attention` on [B, H, S, D] views → projection."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.attention import attention


class Attention(nn.Module):
    """Multi-head self-attention, or cross-attention when `context_dim` is given.

    x: [B, S, dim]; context: [B, Skv, context_dim] (cross) or None (self). q, k and v are
    strided views of one projection's output (no copies): the fused kernels take any strides.
    key_padding_mask: bool [B, Skv], True = attend (runs fused).
    """

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, qkv_bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.is_cross = context_dim is not None
        self.backend = backend
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S, _ = x.shape
        H, D = self.heads, self.head_dim
        if self.is_cross:
            if context is None:
                raise ValueError("this is a cross-attention layer: pass context [B, Skv, context_dim]")
            q = self.to_q(x).view(B, S, H, D).transpose(1, 2)                         # (B, H, S, D)
            kv = self.to_kv(context).view(B, context.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]                                                         # (B, H, Skv, D)
        else:
            qkv = self.to_qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)            # (3, B, H, S, D)
            q, k, v = qkv[0], qkv[1], qkv[2]
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        o = attention(q, k, v, attn_mask=mask, backend=self.backend)                    # (B, H, S, D)
        return self.proj(o.transpose(1, 2).reshape(B, S, H * D))                        # (B, S, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, cross={self.is_cross}, backend={self.backend!r}"
