"""diffusers ResnetBlock2D fusion: FusedResnetBlock2D, diffusers' forward with each
`norm → (modulate →) act` as one flashdiff.group_norm pass, used only when the installed
ResnetBlock2D.forward has an AST fingerprint this file knows."""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from typing import Optional

import torch
import torch.nn as nn

from .group_norm import _activation_name, _group_norm_call, _has_hooks


def _ast_fingerprint(fn) -> str:
    """Hash of a function's syntax tree (node kinds, names, constants); comments, formatting
    and line numbers do not count, any change to what the code does does."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    toks = []
    for node in ast.walk(tree):
        tok = type(node).__name__
        for name in ("id", "attr", "arg"):
            v = getattr(node, name, None)
            if isinstance(v, str):
                tok += ":" + v
        if isinstance(node, ast.Constant):
            tok += ":" + repr(node.value)
        toks.append(tok)
    return hashlib.sha1("|".join(toks).encode()).hexdigest()[:16]


# The diffusers ResnetBlock2D.forward versions FusedResnetBlock2D.forward reproduces.
_KNOWN_RESNET_FORWARDS = {"37d2b864152153ec"}  # diffusers 0.3x .. 0.42


@functools.lru_cache(maxsize=None)
def _fused_resnet_class():
    """(FusedResnetBlock2D, None) or (None, why). Built on first use: diffusers is optional."""
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError as err:
        return None, f"diffusers is not importable ({err})"
    try:
        fp = _ast_fingerprint(ResnetBlock2D.forward)
    except (OSError, TypeError, SyntaxError) as err:
        return None, f"ResnetBlock2D.forward source is unavailable ({err})"
    if fp not in _KNOWN_RESNET_FORWARDS:
        return None, (f"this diffusers' ResnetBlock2D.forward (fingerprint {fp}) is not one flashdiff "
                      "knows; norm+act fusion skipped, GroupNorm replaced alone")

    class FusedResnetBlock2D(ResnetBlock2D):
        """diffusers' ResnetBlock2D.forward with each `norm → (modulate →) act` as one
        flashdiff.group_norm pass. Only ever assigned as `block.__class__` by flashdiff.patch."""

        def forward(self, input_tensor, temb, *args, **kwargs):
            act, backend = self._flashdiff_act, self._flashdiff_backend
            n1, n2 = self.norm1, self.norm2
            hidden_states = _group_norm_call(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, act,
                                             backend=backend)
            if self.upsample is not None:
                if hidden_states.shape[0] >= 64:
                    input_tensor = input_tensor.contiguous()
                    hidden_states = hidden_states.contiguous()
                input_tensor = self.upsample(input_tensor)
                hidden_states = self.upsample(hidden_states)
            elif self.downsample is not None:
                input_tensor = self.downsample(input_tensor)
                hidden_states = self.downsample(hidden_states)
            hidden_states = self.conv1(hidden_states)  # (N, C, H, W)

            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)[:, :, None, None]  # (N, C or 2C, 1, 1)

            scale = shift = None
            if self.time_embedding_norm == "default":
                if temb is not None:
                    hidden_states = hidden_states + temb
            elif self.time_embedding_norm == "scale_shift":
                if temb is None:
                    raise ValueError(f" `temb` should not be None when `time_embedding_norm` is "
                                     f"{self.time_embedding_norm}")
                time_scale, time_shift = torch.chunk(temb, 2, dim=1)
                n = hidden_states.shape[0]
                # (N, C, 1, 1) -> (N, C); a temb broadcast over the batch is expanded to N rows
                scale = time_scale.reshape(time_scale.shape[0], -1).expand(n, -1).contiguous()
                shift = time_shift.reshape(time_shift.shape[0], -1).expand(n, -1).contiguous()
            # any other time_embedding_norm: plain norm2, as diffusers' else-branch
            hidden_states = _group_norm_call(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, act,
                                             scale, shift, backend=backend)

            hidden_states = self.dropout(hidden_states)
            hidden_states = self.conv2(hidden_states)
            if self.conv_shortcut is not None:
                if self.training:
                    input_tensor = input_tensor.contiguous()
                input_tensor = self.conv_shortcut(input_tensor)
            return (input_tensor + hidden_states) / self.output_scale_factor

    return FusedResnetBlock2D, None


def _resnet_fusion_reason(block) -> Optional[str]:
    """None when `block` (exactly a diffusers ResnetBlock2D) can take FusedResnetBlock2D."""
    cls, why = _fused_resnet_class()
    if cls is None:
        return why
    for name in ("norm1", "norm2"):
        m = getattr(block, name)
        if type(m) is not nn.GroupNorm:
            return f"{name} is {type(m).__name__}, not torch.nn.GroupNorm"
    if _activation_name(block.nonlinearity) is None:
        return f"nonlinearity {block.nonlinearity!r} is not a fusable SiLU/GELU"
    for m in (block, block.norm1, block.norm2, block.nonlinearity):
        if _has_hooks(m):
            return f"{type(m).__name__} has forward hooks, which the fused pass would skip"
    return None
