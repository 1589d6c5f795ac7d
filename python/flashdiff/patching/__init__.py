"""Drop-in: route an existing model or diffusers pipeline through flashdiff, and back.

    report = flashdiff.patch(pipe)          # GroupNorm(+SiLU), diffusers attention, scheduler
    flashdiff.patch(pipe, norms=True)       # also LayerNorm (+ adaLN modulation) and RMSNorm
    print(report)                           # what was replaced, what was left alone and why
    flashdiff.unpatch(pipe)                 # the original module objects, processors, scheduler
    with flashdiff.patched(pipe): ...       # the same, scoped
    with flashdiff.sdpa_override(): ...     # F.scaled_dot_product_attention -> flashdiff where it can

What `patch` changes, and only where the structure makes the change certain:

- group norm: every `torch.nn.GroupNorm` (exact type, no hooks) becomes a `FlashGroupNorm`
  holding the *same* weight and bias Parameters (state_dict keys and values unchanged).
  A SiLU/GELU that directly follows it is fused into the same pass when
    * the block is a diffusers `ResnetBlock2D` whose `forward` is one flashdiff knows
      (an AST fingerprint, resnet.py; a changed diffusers forward disables the fusion, not the patch):
      the instance's class is swapped for `FusedResnetBlock2D`, whose forward is diffusers'
      with `norm → act` (and scale-shift `norm → modulate → act`) as one flashdiff.group_norm;
    * or the parent's source shows `h = self.norm(h)` immediately followed by
      `h = self.act(h)`, `self.act` appears nowhere else in the class, and neither module is
      shared or hooked: the norm becomes a fused FlashGroupNorm and the act an `nn.Identity`.
- norms (opt in, norms=True): diffusers modules whose forward does adaLN,
  `norm(x) * (1 + scale) + shift` (the AdaLayerNormZero family, AdaLayerNormContinuous, the
  Flux/SD3/PixArt/DiT blocks' and output layers' modulation), get that statement rewritten
  into one flashdiff.layer_norm call in a subclass (the rest of the forward is diffusers'
  code); every other `nn.LayerNorm` / `FP32LayerNorm` over the last dim and diffusers' /
  torch's RMSNorm without a bias becomes a Flash* subclass holding the same Parameters
  (norms.py).
- attention: modules with a diffusers `processor` whose type is exactly `AttnProcessor2_0`
  get a `FlashdiffAttnProcessor` (same math, calling flashdiff.attention). Other diffusers
  processors that call `dispatch_attention_fn` or `F.scaled_dot_product_attention` themselves
  (Flux, SD3/SD3.5 joint attention, Sana, ...) keep diffusers' own code with only that call
  routed to flashdiff.attention, scoped to the patched model (transformers.py). Custom,
  nn.Module (LoRA, IP-adapter) and attention-less processors are left alone and listed.
- scheduler (pipelines): the flashdiff scheduler of the same class name, `from_config` of
  the pipeline's scheduler config.
- cuda_graph=True (opt in): the denoiser's forward (`pipe.unet` / `pipe.transformer`, or the
  module) is captured as a CUDA graph per input signature and replayed; anything a graph
  cannot serve runs eagerly, with the reason in `report.graph_fallbacks` (cuda_graph.py).

Per call, an input the fused kernels cannot serve falls back (flashdiff's auto dispatch, or
torch) and never raises. One difference is intended: a query row whose keys are all masked
out gives zeros in flashdiff (torch SDPA gives NaN), see docs/internals.md.

Layout: report.py (PatchReport, the undo record), group_norm.py (FlashGroupNorm),
resnet.py (FusedResnetBlock2D), norm_act.py (GroupNorm replacement and norm→act fusion),
norms.py (LayerNorm / RMSNorm and the adaLN modulation),
attention.py (FlashdiffAttnProcessor), transformers.py (diffusers' transformer processors with
their attention call rerouted), scheduler.py (scheduler swap), sdpa.py (the global
SDPA override), cuda_graph.py (GraphedForward); this file: patch / unpatch / patched.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Optional

import torch.nn as nn

from ..backends import BACKENDS
from .attention import FlashdiffAttnProcessor, _patch_attention
from .cuda_graph import _graph_denoisers
from .group_norm import FlashGroupNorm
from .norm_act import _patch_group_norms
from .norms import _patch_norms
from .report import PatchReport, _State
from .scheduler import _patch_scheduler
from .sdpa import disable_sdpa_override, enable_sdpa_override, sdpa_override, sdpa_override_enabled

__all__ = [
    "patch", "unpatch", "patched", "PatchReport", "FlashGroupNorm", "FlashdiffAttnProcessor",
    "enable_sdpa_override", "disable_sdpa_override", "sdpa_override",
]


_STATES: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def patch(obj, attention: bool = True, group_norm: bool = True, scheduler: bool = True,
          backend: Optional[str] = None, cuda_graph: bool = False, norms: bool = False) -> PatchReport:
    """Route `obj` (a torch nn.Module or a diffusers pipeline) through flashdiff, in place.

    Args:
        obj: an nn.Module (any model, diffusers or not) or a diffusers pipeline (every
            nn.Module component is patched, and its scheduler).
        attention: replace diffusers AttnProcessor2_0 processors by FlashdiffAttnProcessor, and
            route the attention call of diffusers' transformer processors to flashdiff.
        group_norm: replace torch.nn.GroupNorm, fusing a directly following SiLU/GELU where
            the module structure shows it.
        scheduler: replace a pipeline's scheduler by flashdiff's of the same class.
        norms: route LayerNorm (with the adaLN modulation of diffusers' transformer blocks
            fused where their forward shows it) and RMSNorm to flashdiff.layer_norm / rms_norm
            (opt in for now: norms=True; docs/patch.md).
        backend: None/"auto" or a backend name for every op; an input that backend cannot
            serve falls back to auto, per call.
        cuda_graph: capture the denoiser's forward (a pipeline's unet/transformer, else `obj`)
            as CUDA graphs, one per input signature, and replay them; calls a graph cannot
            serve run eagerly, with the reason in `report.graph_fallbacks` (docs/patch.md).
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
        if norms:
            _patch_norms(root, prefix, backend, state, report)
        if attention:
            _patch_attention(root, prefix, backend, state, report)
    if scheduler and _is_pipeline(obj):
        _patch_scheduler(obj, state, report)
    if cuda_graph:
        _graph_denoisers(obj, state, report)
    state.report = report
    _STATES[obj] = state
    return report


def unpatch(obj) -> None:
    """Undo `patch(obj)`: the original module objects, processors and scheduler are put back,
    and captured CUDA graphs released, so the model computes bit-identically to before.
    A no-op on an object not patched."""
    state = _STATES.pop(obj, None)
    if state is None:
        return
    for graphed in reversed(state.graphs):
        graphed.remove()
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


@contextlib.contextmanager
def patched(obj, **kwargs):
    """`with flashdiff.patched(pipe) as report: ...`; unpatched on exit, even on error."""
    report = patch(obj, **kwargs)
    try:
        yield report
    finally:
        unpatch(obj)
