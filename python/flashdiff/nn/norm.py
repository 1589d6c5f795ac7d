"""GroupNormAct (GroupNorm + per-sample scale/shift (AdaGN) + activation) and AdaLayerNorm
(LayerNorm + adaLN scale/shift), each one fused op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.group_norm import group_norm
from ..ops.layer_norm import layer_norm


class GroupNormAct(nn.Module):
    """y = act(GroupNorm(x)·(1 + scale) + shift) with `flashdiff.group_norm` (one pass over x).

    x: [N, C, *spatial]; scale, shift: [N, C] or None (AdaGN modulation from an embedding).
    `backend` is passed to the op (None = auto, "reference" = the PyTorch reference).
    """

    def __init__(self, num_groups: int, channels: int, activation: Optional[str] = "silu", eps: float = 1e-5,
                 affine: bool = True, backend: Optional[str] = None):
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide channels ({channels})")
        self.num_groups, self.channels, self.activation, self.eps = num_groups, channels, activation, eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                          scale, shift, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.channels}, activation={self.activation!r}, eps={self.eps}, "
                f"backend={self.backend!r}")


class AdaLayerNorm(nn.Module):
    """LayerNorm over the last dim (no affine) with adaLN modulation, one fused op:
    y = LN(x)·(1 + scale) + shift, x [N, T, D], scale/shift [N, D] or None.

    `flashdiff.layer_norm` takes the per-sample [N, D] modulation as it is and broadcasts it
    over the T tokens inside the kernel: no per-token copy of scale/shift per call.
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend

    def forward(self, x: torch.Tensor, shift: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return layer_norm(x, (self.dim,), eps=self.eps, scale=scale, shift=shift, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"
