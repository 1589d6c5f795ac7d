"""attention: softmax(q kᵀ·scale + mask) v without materializing the score matrix.

Semantics of torch.nn.functional.scaled_dot_product_attention without dropout and causal
masking. Forward FLOPs = 4·B·H·Sq·Skv·D (two matmuls); the fused kernels read q, k, v once
per query block and write o once, so they are compute-bound beyond a few hundred keys.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, _validate as check, dispatch_table, reference
from .. import backends as _backends
from ..backends import OpDispatch, register_op
from ._common import dtype_code, new_empty, ptr, stream_of, use_custom_op

# torch's own SDPA, captured at import: flashdiff.enable_sdpa_override() replaces the public
# name, and the cpu backend and the fallback backward must not re-enter that override.
_torch_sdpa = F.scaled_dot_product_attention

MAX_HEAD_DIM = 256  # largest head-dim bucket of the fused kernels (triton, cuda)

def _features(q, k, v, attn_mask):
    return dispatch_table.attention_features(q, k, attn_mask)


_dispatch = OpDispatch("attention", features=_features, backward={
    "triton": "native Triton kernels (dq, dk, dv from the forward's lse)",
    "*": "differentiates torch's SDPA on the saved inputs (one recompute of the forward)"})


# ------------------------------------------------------------------ validation
def _check_args(q, k, v, attn_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dim=4)
    check.same_device("q", q, k=k, v=v)
    check.same_dtype("q", q, k=k, v=v)
    B, H, Sq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q, k and v must share batch and heads [B, H, ., .]: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head_dim {D} like q, got shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many keys as k ({k.shape[2]}), got shape {tuple(v.shape)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
        check.same_device("q", q, attn_mask=attn_mask)
        target = (B, H, Sq, k.shape[2])
        try:
            if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, target) != target:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask must broadcast to [B, H, Sq, Skv] = {list(target)}, "
                             f"got shape {tuple(attn_mask.shape)}") from None
    if scale is not None:
        check.finite_number("scale", scale)


def key_padding_mask(attn_mask, B, Skv):
    """The mask as bool [B, Skv] when it only varies along batch and keys (a key-padding
    mask, e.g. [B, 1, 1, Skv]), else None. The fused kernels take this form natively."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return None
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[1] != 1 or m.shape[2] != 1:
        return None
    return m[:, 0, 0, :].expand(B, Skv)


def _fused_supports(q, k, v, attn_mask, *, dtypes, min_head_dim):
    D = q.shape[-1]
    if q.dtype not in dtypes:
        return f"dtype {q.dtype} is not supported (supported: {', '.join(map(str, dtypes))})"
    if v.shape[-1] != D:
        return f"v's head_dim {v.shape[-1]} differs from q's {D}"
    if not (min_head_dim <= D <= MAX_HEAD_DIM):
        return f"head_dim {D} is outside the supported range [{min_head_dim}, {MAX_HEAD_DIM}]"
    if attn_mask is not None and key_padding_mask(attn_mask, q.shape[0], k.shape[2]) is None:
        return ("only boolean key-padding masks (broadcastable from [B, 1, 1, Skv]) run fused; "
                f"got {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)}")
    return None


def _triton_supports(q, k, v, attn_mask):
    return _fused_supports(q, k, v, attn_mask, dtypes=check.KERNEL_DTYPES, min_head_dim=16)


def _cuda_supports(q, k, v, attn_mask):
    # mma.sync has no fp32 operand path; fp32 attention goes to triton or torch.
    return _fused_supports(q, k, v, attn_mask, dtypes=(torch.float16, torch.bfloat16), min_head_dim=1)


def _resolve(q, k, v, attn_mask=None, scale=None, backend=None):
    _check_args(q, k, v, attn_mask, scale)
    mask_kind = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))
    return _dispatch.choose(backend, q.device, {"q": q, "k": k, "v": v, "attn_mask": attn_mask},
                            key=(q.device, q.dtype, q.shape, k.shape[2], v.shape[-1], mask_kind))


# ------------------------------------------------------------------ backends
# Each forward returns (o, lse); lse is fp32 [B, H, Sq] where the backend produces it, else
# an empty tensor (the backward then recomputes through torch).
def _no_lse(q):
    return q.new_empty((0,), dtype=torch.float32)


def _reference_fwd(q, k, v, attn_mask, scale):
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return reference.attention(q, k, v, attn_mask, scale, upcast=dt).to(q.dtype), _no_lse(q)


def _zero_rows_without_keys(o, attn_mask):
    """flashdiff's semantics: a query row whose every key is masked out outputs zeros (SDPA
    gives NaN there on some torch versions and backends). A device-side select, no host read."""
    if attn_mask is None:
        return o
    if attn_mask.dtype == torch.bool:
        row_has_key = attn_mask.any(dim=-1, keepdim=True)
    else:  # additive: a row of -inf has no key
        row_has_key = ~torch.isneginf(attn_mask).all(dim=-1, keepdim=True)
    return torch.where(row_has_key, o, torch.zeros((), dtype=o.dtype, device=o.device))


def _torch_fwd(q, k, v, attn_mask, scale):
    """torch's own SDPA with torch's backend selection (flash / cuDNN / efficient on GPUs, a
    flash-style kernel on CPUs). Also the `cpu` backend: on a CPU, torch's SDPA is the fastest
    attention measured there (benchmarks/results/*-cpu-*)."""
    return _zero_rows_without_keys(_torch_sdpa(q, k, v, attn_mask=attn_mask, scale=scale), attn_mask), _no_lse(q)


def _sdpa_variant(sdpa_backend_name: str):
    """torch's SDPA with one of its kernels tried first (a dispatch table picks it per shape
    class: torch's own default order is not always the fastest, e.g. cuDNN on Hopper). The
    rest stay behind it, so inputs the kernel cannot take still run."""
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, n) for n in (sdpa_backend_name, "FLASH_ATTENTION", "CUDNN_ATTENTION",
                                                 "EFFICIENT_ATTENTION", "MATH") if hasattr(SDPBackend, n)]
    order = list(dict.fromkeys(order))
    # set_priority (torch >= 2.6) makes the list an order; without it, only the kernel itself
    # is allowed (then inputs it cannot take raise, and tune records that as a failure).
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        context = lambda: sdpa_kernel(order, set_priority=True)  # noqa: E731
    else:
        context = lambda: sdpa_kernel(order[:1])  # noqa: E731

    def fwd(q, k, v, attn_mask, scale):
        with context():
            o = _torch_sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        return _zero_rows_without_keys(o, attn_mask), _no_lse(q)

    return fwd


SDPA_VARIANTS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _triton_fwd(q, k, v, attn_mask, scale):
    kpm = key_padding_mask(attn_mask, q.shape[0], k.shape[2])
    return _ext.load_triton()[0].attention.attention_fwd(q, k, v, kpm, scale)


def _triton_v2_fwd(q, k, v, attn_mask, scale):
    """The v2 Triton forward (head-dim pieces, peeled tail; triton_kernels/attention_v2.py). A
    dispatch-table variant only: same supports() and backward as "triton" (lse convention equal)."""
    B, H, Sq, _ = q.shape
    kpm = key_padding_mask(attn_mask, B, k.shape[2])
    out = (new_empty(q, (B, H, Sq, v.shape[-1])), new_empty(q, (B, H, Sq), torch.float32))
    module = importlib.import_module(_ext.load_triton()[0].__name__ + ".attention_v2")
    return module.attention_fwd_v2(q, k, v, kpm, scale, out=out)


def _cuda_fwd(q, k, v, attn_mask, scale):
    module = _ext.load_cuda()[0]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    o = new_empty(q, (B, H, Sq, D))
    lse = new_empty(q, (B, H, Sq), torch.float32)
    kpm = key_padding_mask(attn_mask, B, Skv)
    if kpm is not None:
        kpm = kpm.to(torch.uint8).contiguous()
    with torch.cuda.device(q.device):
        module.attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                             ptr(kpm), B, H, Sq, Skv, D,
                             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                             0 if kpm is None else kpm.stride(0), float(scale), dtype_code(q),
                             stream_of(q))
    return o, lse


_dispatch.register("reference", _reference_fwd)
_dispatch.register("torch", _torch_fwd)
_dispatch.register("cpu", _torch_fwd)
for _variant, _sdpa_name in SDPA_VARIANTS.items():
    _dispatch.register_variant("torch", _variant, _sdpa_variant(_sdpa_name))
_dispatch.register("triton", _triton_fwd, _triton_supports)
_dispatch.register_variant("triton", "v2", _triton_v2_fwd)
_dispatch.register("cuda", _cuda_fwd, _cuda_supports)
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _dispatch.impls[backend](q, k, v, attn_mask, scale)
    return o.contiguous(), lse  # the fake promises a contiguous output (SDPA may return views)


@_attention_op.register_fake
def _(q, k, v, attn_mask, scale, backend):
    o = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    # variants ("triton:v2") return what their backend returns
    lse_shape = q.shape[:-1] if backend.split(":")[0] in ("triton", "cuda") else (0,)
    return o, q.new_empty(lse_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, o, lse)
    ctx.config = (scale, backend)


def _backward(ctx, do, _dlse):
    q, k, v, attn_mask, o, lse = ctx.saved_tensors
    scale, backend = ctx.config
    if backend.split(":")[0] == "triton":  # "triton:v2" writes v1's lse (same convention)
        kpm = key_padding_mask(attn_mask, q.shape[0], k.shape[2])
        dq, dk, dv = _ext.load_triton()[0].attention.attention_bwd(do, q, k, v, o, lse, kpm, scale)
    else:
        # No native backward here: differentiate torch's SDPA (memory-efficient on GPUs).
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        with torch.enable_grad():
            out = _torch_sdpa(*leaves, attn_mask=attn_mask, scale=scale)
            dq, dk, dv = torch.autograd.grad(out, leaves, do)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("flashdiff::attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Scaled dot-product attention, fused (no dropout, not causal).

    Args:
        q: [B, H, Sq, D]; k, v: [B, H, Skv, D] (Skv may differ from Sq: cross-attention).
            Any strides (e.g. views of a fused qkv projection); float32/float16/bfloat16.
        attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Sq, Skv].
            Boolean key-padding masks ([B, 1, 1, Skv]) run in the fused kernels; other masks
            run on torch. A query with no key to attend outputs zeros.
        scale: defaults to 1/sqrt(D).
        backend: None/"auto", "reference", "torch", "cpu", "triton" or "cuda" (see
            flashdiff.explain). Auto takes the backend measured fastest for this shape class
            on this GPU (flashdiff.dispatch_table), torch's own SDPA included.
    Returns: [B, H, Sq, D] in q's dtype.
    """
    key = _eager_key(q, k, v, attn_mask, scale, backend)
    impl = _EAGER.get(key) if key is not None else None
    if impl is not None:  # this signature passed every check before: run it
        return impl(q, k, v, attn_mask, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))[0]
    choice = _resolve(q, k, v, attn_mask, scale, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    if use_custom_op(q, k, v):
        return _attention_op(q, k, v, attn_mask, scale, choice.impl)[0]
    impl = _dispatch.impls[choice.impl]
    if key is not None:
        if len(_EAGER) >= 4096:
            _EAGER.clear()
        _EAGER[key] = impl
    return impl(q, k, v, attn_mask, scale)[0]


# Eager calls whose signature (everything the checks and the backend choice read, never
# values) already passed every check -> the implementation chosen for them. A model calls
# attention with a handful of signatures, and the checks plus the choice cost several µs per
# call where torch's SDPA itself costs a few: the same idea as the sampler update's fast path
# (docs/internals.md). Cleared with the dispatch choices (a new table or override).
_EAGER: dict = {}
_dispatch.on_clear.append(_EAGER.clear)
_Tensor = torch.Tensor


def _eager_key(q, k, v, attn_mask, scale, backend):
    """The signature of a plain eager call, or None when the call needs the full path (tensor
    subclasses, tracing, autograd, a non-float scale, empty inputs)."""
    if (type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor
            or (attn_mask is not None and type(attn_mask) is not _Tensor)
            or (scale is not None and (type(scale) is not float or not math.isfinite(scale)))):
        return None
    if use_custom_op(q, k, v) or q.numel() == 0 or k.numel() == 0:
        return None
    mask = None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, mask,
            backend, _backends._override)
