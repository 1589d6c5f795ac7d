"""Modules built on the fused ops; every one takes `backend=` (None = auto, "reference" =
the PyTorch reference), so a model's fused and reference paths are one flag apart:

    model = flashdiff.models.DiT_models["DiT-S/2"](backend=None)
    flashdiff.nn.set_backend(model, "reference")     # the same weights, the reference path
"""
from typing import Optional

from torch import nn

from .attention import Attention
from .embeddings import LabelEmbedder, TimestepEmbedder, timestep_embedding
from .norm import AdaLayerNorm, GroupNormAct


def normalization(channels: int, num_groups: int = 32, activation: Optional[str] = "silu",
                  backend: Optional[str] = None) -> GroupNormAct:
    """The one norm factory of the models: GroupNorm(min(num_groups, channels)) + activation."""
    groups = min(num_groups, channels)
    while channels % groups:
        groups -= 1
    return GroupNormAct(groups, channels, activation=activation, backend=backend)


def set_backend(module: nn.Module, backend: Optional[str]) -> nn.Module:
    """Switch every flashdiff layer inside `module` to `backend` (None = auto). Returns module."""
    for m in module.modules():
        if isinstance(m, (GroupNormAct, AdaLayerNorm, Attention)) or getattr(m, "_flashdiff_backend_owner", False):
            m.backend = backend
    return module


__all__ = ["AdaLayerNorm", "Attention", "GroupNormAct", "LabelEmbedder", "TimestepEmbedder", "timestep_embedding",
           "normalization", "set_backend"]
