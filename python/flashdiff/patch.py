"""Drop-in: route an existing model or diffusers pipeline through flashdiff, and back.

    report = flashdiff.patch(pipe)          # GroupNorm(+SiLU), diffusers attention, scheduler
    print(report)                           # what was replaced, what was left alone and why
    flashdiff.unpatch(pipe)                 # the original module objects, processors, scheduler
    with flashdiff.patched(pipe): ...       # the same, scoped
    with flashdiff.sdpa_override(): ...     # F.scaled_dot_product_attention -> flashdiff where it can

What `patch` changes, and only where the structure makes the change certain:

- group norm: every `torch.nn.GroupNorm` (exact type, no hooks) becomes a `FlashGroupNorm`
  holding the *same* weight and bias Parameters (state_dict keys and values unchanged).
  A SiLU/GELU that directly follows it is fused into the same pass when
    * the block is a diffusers `ResnetBlock2D` whose `forward` is the one this file knows
      (an AST fingerprint; a changed diffusers forward disables the fusion, not the patch):
      the instance's class is swapped for `FusedResnetBlock2D`, whose forward is diffusers'
      with `norm → act` (and scale-shift `norm → modulate → act`) as one flashdiff.group_norm;
    * or the parent's source shows `h = self.norm(h)` immediately followed by
      `h = self.act(h)`, `self.act` appears nowhere else in the class, and neither module is
      shared or hooked: the norm becomes a fused FlashGroupNorm and the act an `nn.Identity`.
- attention: modules with a diffusers `processor` whose type is exactly `AttnProcessor2_0`
  get a `FlashdiffAttnProcessor` (same math, calling flashdiff.attention). Other processors
  (custom, LoRA, IP-adapter, fused-QKV, attention-dispatch ones) are left alone and listed;
  the dispatch-based ones call torch SDPA through diffusers' "native" backend, which
  `sdpa_override()` routes.
- scheduler (pipelines): the flashdiff scheduler of the same class name, `from_config` of
  the pipeline's scheduler config.

Per call, an input the fused kernels cannot serve falls back (flashdiff's auto dispatch, or
torch) and never raises. One difference is intended: a query row whose keys are all masked
out gives zeros in flashdiff (torch SDPA gives NaN), see docs/internals.md.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import inspect
import math
import textwrap
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate as check
from .backends import BACKENDS, explain, get_override
from .ops.attention import attention as _fd_attention, key_padding_mask
from .ops.group_norm import group_norm as _fd_group_norm

__all__ = [
    "patch", "unpatch", "patched", "PatchReport", "FlashGroupNorm", "FlashdiffAttnProcessor",
    "enable_sdpa_override", "disable_sdpa_override", "sdpa_override",
]

_TORCH_SDPA = F.scaled_dot_product_attention  # captured at import, before any override
_SCHEDULER_NAMES = ("DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler",
                    "DPMSolverMultistepScheduler")


# ================================================================== report
@dataclass
class PatchReport:
    """What `patch` replaced and what it left alone, each with the module path and a reason."""
    target: str
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)    # (kind, where, what)
    left_alone: List[Tuple[str, str, str]] = field(default_factory=list)  # (kind, where, why)

    def counts(self) -> Dict[str, int]:
        """{kind: number replaced}, e.g. {"group_norm": 12, "group_norm+silu": 9, "attention": 4}."""
        out: Dict[str, int] = {}
        for kind, _, _ in self.replaced:
            out[kind] = out.get(kind, 0) + 1
        return out

    def __str__(self) -> str:
        summary = ", ".join(f"{n} {k}" for k, n in self.counts().items()) or "nothing"
        lines = [f"flashdiff.patch({self.target}): replaced {summary}; left alone {len(self.left_alone)}"]
        if self.replaced:
            lines.append("replaced:")
            lines += [f"  {kind:<16} {where or '<root>'}: {what}" for kind, where, what in self.replaced]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {kind:<16} {where or '<root>'}: {why}" for kind, where, why in self.left_alone]
        return "\n".join(lines)


# ================================================================== group norm
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


# ------------------------------------------------------------------ ResnetBlock2D fusion
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


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


# ------------------------------------------------------------------ generic norm -> act pairs
def _self_attr(node) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _assign_call(stmt) -> Optional[Tuple[str, str]]:
    """(var, attr) for a statement `var = self.attr(var)`, else None."""
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Call) and len(stmt.value.args) == 1 and not stmt.value.keywords
            and isinstance(stmt.value.args[0], ast.Name) and stmt.value.args[0].id == stmt.targets[0].id):
        attr = _self_attr(stmt.value.func)
        if attr is not None:
            return stmt.targets[0].id, attr
    return None


@functools.lru_cache(maxsize=None)
def _norm_act_pairs(cls) -> Tuple[Tuple[str, str], ...]:
    """(norm_attr, act_attr) pairs where cls.forward does `h = self.norm(h)` then, as the very
    next statement, `h = self.act(h)`, and `self.act` is read nowhere else in the class
    (all its non-torch bases included). Empty when the source is unavailable."""
    try:
        sources = [textwrap.dedent(inspect.getsource(c)) for c in cls.__mro__
                   if c.__module__.split(".")[0] not in ("torch", "builtins")]
        fwd = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return ()
    uses: Dict[str, int] = {}
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            attr = _self_attr(node)
            if attr is not None and isinstance(node.ctx, ast.Load):  # reads; __init__'s stores do not count
                uses[attr] = uses.get(attr, 0) + 1
    pairs = []
    for node in ast.walk(ast.parse(fwd)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for a, b in zip(body, body[1:]):
            first, second = _assign_call(a), _assign_call(b)
            if first and second and first[0] == second[0] and uses.get(second[1]) == 1:
                pairs.append((first[1], second[1]))
    return tuple(pairs)


# ================================================================== attention
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
    """The backend flashdiff.attention would use for these (structurally fusable) inputs,
    or None when an explicit backend cannot serve them. Cached per (device, dtype, head dims)
    outside tracing: that is all the backends' support checks look at."""
    key = (q.device, q.dtype, q.shape[-1], v.shape[-1], attn_mask is None, backend, get_override())
    if not torch.compiler.is_compiling() and key in _choice_cache:
        return _choice_cache[key]
    try:
        name = explain("attention", q, k, v, attn_mask, None, backend).backend
    except NotImplementedError:
        name = None
    if not torch.compiler.is_compiling():
        _choice_cache[key] = name
    return name


def _attention_call(q, k, v, attn_mask=None, scale=None, backend=None):
    """flashdiff.attention where it runs well for these inputs, else torch's SDPA."""
    if _is_fusable_sdpa(q, k, v, attn_mask):
        name = _auto_backend(q, k, v, attn_mask, backend)
        # The reference backend materializes the scores; torch's SDPA is the better fallback.
        if name is not None and name != "reference":
            return _fd_attention(q, k, v, attn_mask, scale, backend=name)
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


# ================================================================== patch / unpatch
@dataclass
class _State:
    """Everything needed to undo one patch() call, in the order it was done."""
    modules: List[Tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, original)
    classes: List[Tuple[nn.Module, type]] = field(default_factory=list)            # (module, original class)
    processors: List[Tuple[nn.Module, Any]] = field(default_factory=list)          # (attn module, original)
    scheduler: Optional[Tuple[Any, str, Any]] = None                               # (pipe, attr, original)
    report: Optional[PatchReport] = None


_STATES: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def _occurrences(root: nn.Module) -> Dict[int, List[Tuple[nn.Module, str, str]]]:
    """id(module) -> every (parent, attribute name, dotted path) registering it under root."""
    out: Dict[int, List[Tuple[nn.Module, str, str]]] = {}
    for path, parent in root.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, name, f"{path}.{name}" if path else name))
    return out


def _swap(state: _State, root_occ, old: nn.Module, new: nn.Module) -> None:
    for parent, name, _ in root_occ[id(old)]:
        state.modules.append((parent, name, old))
        setattr(parent, name, new)


def _patch_group_norms(root: nn.Module, prefix: str, backend, state: _State, report: PatchReport) -> None:
    occ = _occurrences(root)
    modules = list(root.named_modules())
    done = set()  # ids of GroupNorms a fused pass already took over

    # 1. diffusers ResnetBlock2D: class swap to the fused forward.
    resnet_cls = None
    try:
        from diffusers.models.resnet import ResnetBlock2D as resnet_cls
    except ImportError:
        pass
    for path, m in modules:
        if resnet_cls is None or type(m) is not resnet_cls:
            continue
        why = _resnet_fusion_reason(m)
        where = prefix + path
        if why is not None:
            report.left_alone.append(("group_norm+act", where, why))
            continue
        fused_cls = _fused_resnet_class()[0]
        act = _activation_name(m.nonlinearity)
        state.classes.append((m, type(m)))
        m.__dict__["_flashdiff_act"], m.__dict__["_flashdiff_backend"] = act, backend
        m.__class__ = fused_cls
        done.update((id(m.norm1), id(m.norm2)))
        report.replaced.append((f"group_norm+{act}", where, f"ResnetBlock2D norm1+{act}, norm2+{act} fused"))

    # 2. `h = self.norm(h); h = self.act(h)` pairs in a parent's forward.
    for path, parent in modules:
        if not any(type(c) is nn.GroupNorm for c in parent._modules.values()):
            continue
        for norm_name, act_name in _norm_act_pairs(type(parent)):
            norm, act_mod = parent._modules.get(norm_name), parent._modules.get(act_name)
            act = _activation_name(act_mod) if act_mod is not None else None
            if type(norm) is not nn.GroupNorm or act is None or id(norm) in done:
                continue
            where = prefix + (f"{path}.{norm_name}" if path else norm_name)
            if len(occ[id(norm)]) > 1 or len(occ[id(act_mod)]) > 1 or _has_hooks(norm) or _has_hooks(act_mod):
                report.left_alone.append(("group_norm+act", where, f"{norm_name} or {act_name} is shared or hooked"))
                continue
            _swap(state, occ, norm, FlashGroupNorm.from_group_norm(norm, act, backend))
            _swap(state, occ, act_mod, nn.Identity())
            done.add(id(norm))
            report.replaced.append((f"group_norm+{act}", where,
                                    f"GroupNorm + {act_name} ({type(act_mod).__name__}) fused"))

    # 3. every other GroupNorm.
    for path, m in modules:
        if isinstance(m, nn.GroupNorm) and id(m) not in done:
            where = prefix + path
            done.add(id(m))
            if type(m) is not nn.GroupNorm:
                why = "already flashdiff" if isinstance(m, FlashGroupNorm) else f"subclass {type(m).__name__}"
                report.left_alone.append(("group_norm", where, why))
            elif _has_hooks(m):
                report.left_alone.append(("group_norm", where, "has forward hooks"))
            else:
                _swap(state, occ, m, FlashGroupNorm.from_group_norm(m, None, backend))
                report.replaced.append(("group_norm", where, f"GroupNorm({m.num_groups}, {m.num_channels})"))


def _patch_attention(root: nn.Module, prefix: str, backend, state: _State, report: PatchReport) -> None:
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
        elif hasattr(proc, "_attention_backend"):
            report.left_alone.append(("attention", where, f"{type(proc).__name__} uses diffusers' attention "
                                      "dispatch; flashdiff.sdpa_override() routes its native backend"))
        else:
            report.left_alone.append(("attention", where, f"processor {type(proc).__name__} has no flashdiff "
                                      "equivalent (only AttnProcessor2_0 is replaced)"))


def _patch_scheduler(pipe, state: _State, report: PatchReport) -> None:
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        return
    name = type(sched).__name__
    if type(sched).__module__.split(".")[0] == "flashdiff":
        report.left_alone.append(("scheduler", "scheduler", f"{name} is already flashdiff's"))
        return
    try:
        mod = importlib.import_module("flashdiff.schedulers")
    except ImportError as err:
        report.left_alone.append(("scheduler", "scheduler", f"flashdiff.schedulers is unavailable ({err})"))
        return
    cls = getattr(mod, name, None) if name in _SCHEDULER_NAMES else None
    if cls is None:
        report.left_alone.append(("scheduler", "scheduler", f"flashdiff.schedulers has no {name}"))
        return
    try:
        new = cls.from_config(sched.config)
    except Exception as err:  # any config the flashdiff scheduler rejects leaves the original in place
        report.left_alone.append(("scheduler", "scheduler", f"{cls.__name__}.from_config failed: "
                                  f"{type(err).__name__}: {err}"))
        return
    state.scheduler = (pipe, "scheduler", sched)
    setattr(pipe, "scheduler", new)
    report.replaced.append(("scheduler", "scheduler", f"{name} -> flashdiff.schedulers.{cls.__name__}"))


def patch(obj, attention: bool = True, group_norm: bool = True, scheduler: bool = True,
          backend: Optional[str] = None) -> PatchReport:
    """Route `obj` (a torch nn.Module or a diffusers pipeline) through flashdiff, in place.

    Args:
        obj: an nn.Module (any model, diffusers or not) or a diffusers pipeline (every
            nn.Module component is patched, and its scheduler).
        attention: replace diffusers AttnProcessor2_0 processors by FlashdiffAttnProcessor.
        group_norm: replace torch.nn.GroupNorm, fusing a directly following SiLU/GELU where
            the module structure shows it.
        scheduler: replace a pipeline's scheduler by flashdiff's of the same class.
        backend: None/"auto" or a backend name for every op; an input that backend cannot
            serve falls back to auto, per call.
    Returns: a PatchReport (print it). Undo with `flashdiff.unpatch(obj)`.
    """
    if backend == "auto":
        backend = None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}, got {backend!r}")
    if not (isinstance(obj, nn.Module) or _is_pipeline(obj)):
        raise TypeError(f"obj must be a torch.nn.Module or a diffusers pipeline, got {type(obj).__name__}")
    if obj in _STATES:
        raise ValueError(f"this {type(obj).__name__} is already patched; call flashdiff.unpatch first")

    state, report = _State(), PatchReport(type(obj).__name__)
    if _is_pipeline(obj):
        roots = [(f"{name}.", comp) for name, comp in obj.components.items() if isinstance(comp, nn.Module)]
    else:
        roots = [("", obj)]
    for prefix, root in roots:
        if group_norm:
            _patch_group_norms(root, prefix, backend, state, report)
        if attention:
            _patch_attention(root, prefix, backend, state, report)
    if scheduler and _is_pipeline(obj):
        _patch_scheduler(obj, state, report)
    state.report = report
    _STATES[obj] = state
    return report


def unpatch(obj) -> None:
    """Undo `patch(obj)`: the original module objects, processors and scheduler are put back,
    so the model computes bit-identically to before. A no-op on an object not patched."""
    state = _STATES.pop(obj, None)
    if state is None:
        return
    if state.scheduler is not None:
        pipe, attr, original = state.scheduler
        setattr(pipe, attr, original)
    for m, proc in reversed(state.processors):
        m.set_processor(proc)
    for m, cls in reversed(state.classes):
        m.__class__ = cls
        m.__dict__.pop("_flashdiff_act", None)
        m.__dict__.pop("_flashdiff_backend", None)
    for parent, name, original in reversed(state.modules):
        setattr(parent, name, original)


def is_patched(obj) -> bool:
    return obj in _STATES


@contextlib.contextmanager
def patched(obj, **kwargs):
    """`with flashdiff.patched(pipe) as report: ...`; unpatched on exit, even on error."""
    report = patch(obj, **kwargs)
    try:
        yield report
    finally:
        unpatch(obj)


# ================================================================== global SDPA override
_sdpa_saved = None  # the function F.scaled_dot_product_attention held before enable


def _sdpa_override(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, with calls the fused kernels serve
    (triton or cuda backend) done by flashdiff.attention; everything else, including every
    CPU call (flashdiff's cpu backend IS torch's SDPA), goes to the saved torch function."""
    fallback = _sdpa_saved or _TORCH_SDPA
    if _is_fusable_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) and \
            (scale is None or (isinstance(scale, (int, float)) and math.isfinite(scale))):
        name = _auto_backend(query, key, value, attn_mask, None)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        # cuda's backward differentiates torch SDPA itself: only its forward is routed.
        if name == "triton" or (name == "cuda" and not needs_grad):
            return _fd_attention(query, key, value, attn_mask, scale, backend=name)
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
