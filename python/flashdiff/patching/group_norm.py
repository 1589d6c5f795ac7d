"""FlashGroupNorm: torch.nn.GroupNorm (+ an optional fused SiLU/GELU) computed by
flashdiff.group_norm, with a per-call fallback to torch for inputs outside its contract."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _validate as check
from ..ops.group_norm import group_norm as _fd_group_norm


def _activation_name(module) -> Optional[str]:
    """'silu' or 'gelu' when `module` is exactly a fusable activation, else None."""
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    return None


def _torch_act(y, activation):
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def _group_norm_call(x, num_groups, weight, bias, eps, activation, scale=None, shift=None, backend=None):
    """flashdiff.group_norm where its contract covers x, else torch; never raises for an input
    torch.nn.GroupNorm would accept. An explicit backend that cannot serve x falls back to auto."""
    if not (x.dim() in (3, 4, 5) and x.dtype in check.FLOAT_DTYPES and x.shape[1] % num_groups == 0):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        if scale is not None:
            y = y * (1 + scale.reshape(scale.shape + (1,) * (x.dim() - 2))) + \
                shift.reshape(shift.shape + (1,) * (x.dim() - 2))
        return _torch_act(y, activation)
    if backend is not None:
        try:
            return _fd_group_norm(x, num_groups, weight, bias, eps, activation, scale, shift, backend=backend)
        except NotImplementedError:
            pass
    return _fd_group_norm(x, num_groups, weight, bias, eps, activation, scale, shift)


class FlashGroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm (+ an optional fused SiLU/GELU) computed by flashdiff.group_norm.

    Built from an existing GroupNorm with `from_group_norm`, sharing its weight and bias
    Parameters, so parameter names, values and optimizer state are untouched."""

    activation: Optional[str]
    backend: Optional[str]

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, activation: Optional[str] = None,
                        backend: Optional[str] = None) -> "FlashGroupNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_groups, new.num_channels, new.eps, new.affine = gn.num_groups, gn.num_channels, gn.eps, gn.affine
        new.weight, new.bias = gn.weight, gn.bias  # the same Parameter objects (or None)
        new.activation, new.backend = activation, backend
        new.train(gn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _group_norm_call(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}, backend={self.backend or 'auto'}"


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)
