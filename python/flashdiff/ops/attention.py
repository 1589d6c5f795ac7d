"""attention: softmax(q kᵀ·scale + mask) v without materializing the score matrix.

Semantics of torch.nn.functional.scaled_dot_product_attention without dropout and causal
masking. Forward FLOPs = 4·B·H·Sq·Skv·D (two matmuls); the fused kernels read q, k, v once
per query block and write o once, so they are compute-bound beyond a few hundred keys.

With return_lse=True every backend also returns lse = log Σ_j exp(scale·q·k_j + mask_j), fp32
[B, H, Sq], natural log, -inf on a row with no key (the convention `merge_attention` takes).
Where it comes from, per backend (docs/internals.md, "Attention log-sum-exp"):
  triton, cuda   the kernels write it anyway (4 B per row); their +inf on keyless rows (kept
                 internally for the Triton backward) becomes -inf at the API, a device-side select
  torch, cpu     torch's fused kernels that return it (CPU flash; CUDA flash / memory-efficient),
                 called through their aten ops; inputs they decline take the reference in fp32
                 one block of query rows at a time (scores materialized: 2 passes, 4·rows·Skv B)
  reference      logsumexp of the fp32 scores
lse is differentiable: its gradient g enters the backward as delta − g (dS = P∘(dP − delta + g)).
"""
from __future__ import annotations

import functools
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
    "triton": "native Triton kernels (dq, dk, dv from the forward's lse; an lse gradient shifts delta)",
    "*": "differentiates torch's SDPA on the saved inputs (one recompute of the forward; an lse "
         "gradient costs one more SDPA forward and backward)"})


# ------------------------------------------------------------------ validation
def _check_args(q, k, v, attn_mask, scale, return_lse=False):
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
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


def _resolve(q, k, v, attn_mask=None, scale=None, backend=None, return_lse=False):
    _check_args(q, k, v, attn_mask, scale, return_lse)  # every backend returns lse: no effect on the choice
    mask_kind = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))
    return _dispatch.choose(backend, q.device, {"q": q, "k": k, "v": v, "attn_mask": attn_mask},
                            key=(q.device, q.dtype, q.shape, k.shape[2], v.shape[-1], mask_kind))


# ------------------------------------------------------------------ backends
# Each forward is fwd(q, k, v, attn_mask, scale, need_lse=False) -> (o, lse); lse is fp32
# [B, H, Sq] where the backend produces it (triton and cuda always do, in the kernels'
# convention: +inf on a keyless row) or need_lse asks for it (then -inf there), else None (the
# eager path allocates nothing; the custom op returns an empty tensor and the backward then
# recomputes through torch).
def _no_lse(q):
    return q.new_empty((0,), dtype=torch.float32)


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _reference_fwd(q, k, v, attn_mask, scale, need_lse=False):
    dt = _compute_dtype(q)
    if need_lse:
        o, lse = reference.attention_lse(q, k, v, attn_mask, scale, upcast=dt)
        return o.to(q.dtype), lse.float()
    return reference.attention(q, k, v, attn_mask, scale, upcast=dt).to(q.dtype), None


def _row_has_key(attn_mask):
    """bool [..., Sq, 1] (broadcastable to [B, H, Sq, 1]): the row attends to some key."""
    if attn_mask.dtype == torch.bool:
        return attn_mask.any(dim=-1, keepdim=True)
    return ~torch.isneginf(attn_mask).all(dim=-1, keepdim=True)  # additive: a row of -inf has none


def _zero_rows_without_keys(o, attn_mask):
    """flashdiff's semantics: a query row whose every key is masked out outputs zeros (SDPA
    gives NaN there on some torch versions and backends). A device-side select, no host read."""
    if attn_mask is None:
        return o
    return torch.where(_row_has_key(attn_mask), o, torch.zeros((), dtype=o.dtype, device=o.device))


def _public_lse(lse):
    """The API's lse: -inf on a keyless row where the fused kernels write +inf (their backward
    needs exp(s − lse) = 0 there). A device-side select over 4 B per row, no host read."""
    return torch.where(torch.isposinf(lse), torch.full((), float("-inf"), device=lse.device), lse)


def _additive(attn_mask, dtype):
    """A bool mask as an additive one (0 / -inf, exact in any float dtype): the aten kernels
    that return lse take only additive masks. Same shape as the mask (a broadcast view stays one)."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros((), dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))


def _lse_kernels(q, attn_mask):
    """torch's fused kernels that return lse, in the order tried: each (o, lse-like) or raises
    for inputs it declines. lse-like: [B, H, Sq], [B, H, ⌈Sq/32⌉·32] (memory-efficient) or
    [B, H, Sq, 1]; the caller trims it."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        yield lambda q, k, v, m, s: aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_additive(m, q.dtype), scale=s)
    elif q.device.type == "cuda":
        if attn_mask is None:
            yield lambda q, k, v, m, s: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                                 scale=s)[:2]
        yield lambda q, k, v, m, s: aten._scaled_dot_product_efficient_attention(
            q, k, v, None if m is None else _additive(m, q.dtype).expand(*q.shape[:3], k.shape[2]),
            True, 0.0, False, scale=s)[:2]


_LSE_BLOCK_SCORES = 1 << 24  # scores per block of the fallback: 64 MB in fp32


def _sdpa_with_lse(q, k, v, attn_mask, scale):
    """(o, lse) from torch's own fused kernels where one takes the inputs (checks are on the
    host, before a launch), else the reference in fp32, one block of query rows at a time (≤ 2^24
    scores ≈ 64 MB per block; it makes two passes over the scores: for rare inputs only)."""
    B, H, Sq, _ = q.shape
    for kernel in _lse_kernels(q, attn_mask):
        try:
            o, lse = kernel(q, k, v, attn_mask, scale)
            break
        except (RuntimeError, NotImplementedError):  # this kernel declines the inputs: next one
            continue
    else:
        rows = max(1, _LSE_BLOCK_SCORES // max(1, B * H * k.shape[2]))
        mask = None if attn_mask is None else attn_mask.expand(B, H, Sq, k.shape[2])
        parts = [_reference_fwd(q[:, :, i:i + rows], k, v, None if mask is None else mask[:, :, i:i + rows],
                                scale, need_lse=True) for i in range(0, Sq, rows)]
        o, lse = torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
    lse = lse.reshape(B, H, -1)[..., :Sq].float()
    if attn_mask is not None:  # the kernels give lse 0 (CPU) or +inf on a keyless row
        lse = torch.where(_row_has_key(attn_mask)[..., 0], lse, torch.full((), float("-inf"), device=lse.device))
    return _zero_rows_without_keys(o, attn_mask), lse


def _torch_fwd(q, k, v, attn_mask, scale, need_lse=False):
    """torch's own SDPA with torch's backend selection (flash / cuDNN / efficient on GPUs, a
    flash-style kernel on CPUs). Also the `cpu` backend: on a CPU, torch's SDPA is the fastest
    attention measured there (benchmarks/results/*-cpu-*)."""
    if need_lse:
        return _sdpa_with_lse(q, k, v, attn_mask, scale)
    return _zero_rows_without_keys(_torch_sdpa(q, k, v, attn_mask=attn_mask, scale=scale), attn_mask), None


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

    def fwd(q, k, v, attn_mask, scale, need_lse=False):
        if need_lse:  # the kernels that return lse, in their own order (see _lse_kernels)
            return _sdpa_with_lse(q, k, v, attn_mask, scale)
        with context():
            o = _torch_sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        return _zero_rows_without_keys(o, attn_mask), None

    return fwd


SDPA_VARIANTS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _triton_fwd(q, k, v, attn_mask, scale, need_lse=False):
    kpm = key_padding_mask(attn_mask, q.shape[0], k.shape[2])
    return _ext.load_triton()[0].attention.attention_fwd(q, k, v, kpm, scale)


def _triton_v2_fwd(q, k, v, attn_mask, scale, need_lse=False, tma=False):
    """The v2 Triton forward (head-dim pieces, peeled tail; triton_kernels/attention_v2.py). A
    dispatch-table variant only: same supports() and backward as "triton" (lse convention equal).
    tma=True is the variant "triton:tma": Q/K/V/O through tensor descriptors (TMA on sm_90+);
    inputs TMA cannot address (16-byte alignment, a GPU before sm_90) run the pointer path in the
    same call."""
    B, H, Sq, _ = q.shape
    kpm = key_padding_mask(attn_mask, B, k.shape[2])
    out = (new_empty(q, (B, H, Sq, v.shape[-1])), new_empty(q, (B, H, Sq), torch.float32))
    module = importlib.import_module(_ext.load_triton()[0].__name__ + ".attention_v2")
    return module.attention_fwd_v2(q, k, v, kpm, scale, out=out, tma=tma)


def _cuda_launch_args(q, k, v, attn_mask, scale):
    """(o, lse, args, keep): the outputs allocated, the attention_fwd binding arguments
    (docs/internals.md) shared by the cuda kernels, and the tensors their raw pointers point
    into (contiguous copies, the uint8 mask): the caller holds `keep` across the launch."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    o = new_empty(q, (B, H, Sq, D))
    lse = new_empty(q, (B, H, Sq), torch.float32)
    kpm = key_padding_mask(attn_mask, B, Skv)
    if kpm is not None:
        kpm = kpm.to(torch.uint8).contiguous()
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), ptr(kpm), B, H, Sq, Skv, D,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            0 if kpm is None else kpm.stride(0), float(scale), dtype_code(q), stream_of(q))
    return o, lse, args, (q, k, v, kpm)


def _cuda_fwd(q, k, v, attn_mask, scale, need_lse=False, block_rows=64):
    """The FA2 CUDA kernel, 64 query rows per CTA. block_rows=128 is the variant "cuda:m128":
    8 warps of 16 rows, so each K/V tile is copied into shared memory once per 128 query rows
    (half the K/V traffic from L2; the same registers per thread). Written without a GPU at hand:
    a table choice only, as "cuda:cross"."""
    module = _ext.load_cuda()[0]
    rows = {}  # the default is the binding's own: builds from before block_rows still serve it
    if block_rows != 64:
        if "block_rows" not in (module.attention_fwd.__doc__ or ""):
            raise RuntimeError("this build of flashdiff._cuda has no attention_fwd(block_rows=): rebuild it")
        rows = {"block_rows": block_rows}
    o, lse, args, keep = _cuda_launch_args(q, k, v, attn_mask, scale)
    with torch.cuda.device(q.device):
        module.attention_fwd(*args, **rows)
    del keep  # queued on the stream: the caching allocator reuses the memory in stream order
    return o, lse


def _cuda_cross_fwd(q, k, v, attn_mask, scale, need_lse=False):
    """Variant "cuda:cross" (csrc/cuda/attention_cross.cu): cross-attention over a short key set
    (text context, e.g. SD's 77 tokens). Each CTA of 64 or 128 query rows holds the whole K and V
    of its (batch, head) in shared memory (Skv <= 256, head_dim <= 160) and runs one softmax pass:
    all scores of a row in registers, max and sum once, then P·V, no online rescaling.

    Roofline: DRAM bytes ≈ 4·B·H·Sq·D (q in, o out, 16-bit) + 4·B·H·Skv·D (k, v) + 4·B·H·Sq
    (lse); FLOPs 4·B·H·Sq·Skv·D, so ~Skv FLOP per byte: memory-bound below Skv ≈ 200 on an H200
    (bf16 ridge ~200 FLOP/B). SD 1.5 at 64² (B·H = 16, Sq 4096, Skv 77, D 40): ~11 MB, ~2.3 µs at
    4.8 TB/s. Inputs it does not take (more keys, wider heads, B·H > 65535, K/V over the device's
    shared memory per block) run the regular cuda kernel on the same arguments, in the same call.
    A variant, not the cuda backend: written without a GPU at hand, auto picks it only where
    `flashdiff tune` measured it correct and fastest; explicit backend="cuda" keeps the FA2 kernel."""
    module = _ext.load_cuda()[0]
    cross = getattr(module, "attention_fwd_cross", None)
    if cross is None:
        raise RuntimeError("this build of flashdiff._cuda has no attention_fwd_cross: rebuild it")
    o, lse, args, keep = _cuda_launch_args(q, k, v, attn_mask, scale)
    with torch.cuda.device(q.device):
        if not cross(*args):
            module.attention_fwd(*args)
    return o, lse


_dispatch.register("reference", _reference_fwd)
_dispatch.register("torch", _torch_fwd)
_dispatch.register("cpu", _torch_fwd)
for _variant, _sdpa_name in SDPA_VARIANTS.items():
    _dispatch.register_variant("torch", _variant, _sdpa_variant(_sdpa_name))
_dispatch.register("triton", _triton_fwd, _triton_supports)
_dispatch.register_variant("triton", "v2", _triton_v2_fwd)
_dispatch.register_variant("triton", "tma", functools.partial(_triton_v2_fwd, tma=True))
_dispatch.register("cuda", _cuda_fwd, _cuda_supports)
_dispatch.register_variant("cuda", "cross", _cuda_cross_fwd)
_dispatch.register_variant("cuda", "m128", functools.partial(_cuda_fwd, block_rows=128))
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  scale: float, backend: str, return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse). With return_lse, lse is the API's (fp32 [B, H, Sq], -inf on keyless rows);
    without, whatever the backend's backward needs ([B, H, Sq] from triton/cuda, else empty)."""
    o, lse = _dispatch.impls[backend](q, k, v, attn_mask, scale, return_lse)
    if lse is None:  # a backend without one (the eager path never allocates this)
        lse = _no_lse(q)
    # the fake promises a contiguous output (SDPA may return views) and a contiguous lse
    return o.contiguous(), (_public_lse(lse) if return_lse else lse).contiguous()


@_attention_op.register_fake
def _(q, k, v, attn_mask, scale, backend, return_lse=False):
    o = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    # variants ("triton:v2") return what their backend returns
    lse_shape = q.shape[:-1] if return_lse or backend.split(":")[0] in ("triton", "cuda") else (0,)
    return o, q.new_empty(lse_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, backend, *rest = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, o, lse)
    ctx.config = (scale, backend, bool(rest and rest[0]))
    ctx.set_materialize_grads(False)  # a None lse gradient stays None: no zero-filled delta shift


def _sdpa_grads(q, k, v, attn_mask, scale, do, dlse):
    """dq, dk, dv by differentiating torch's SDPA (memory-efficient on GPUs). An lse gradient
    g adds d lse_i/d s_ij = P_ij: dq += scale·g·(P k), dk += scale·Pᵀ(g·q). Both are one more
    SDPA, P (·) with k as the values: its output is P k, its vjp w.r.t. those values is Pᵀ(·)."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    outs, cotangents = [], []
    with torch.enable_grad():
        if do is not None:
            outs.append(_torch_sdpa(*leaves, attn_mask=attn_mask, scale=scale))
            cotangents.append(do)
        if dlse is not None:
            k_as_v = k.detach().requires_grad_(True)
            pk = _zero_rows_without_keys(_torch_sdpa(q.detach(), k.detach(), k_as_v, attn_mask=attn_mask,
                                                     scale=scale), attn_mask)
            g = (dlse * scale).unsqueeze(-1).to(q.dtype)
            outs.append(pk)
            cotangents.append(g * q)
        grads = torch.autograd.grad(outs, leaves + ([k_as_v] if dlse is not None else []), cotangents,
                                    allow_unused=True)
    dq, dk, dv = (torch.zeros_like(t) if d is None else d for t, d in zip((q, k, v), grads[:3]))
    if dlse is not None:
        dq = dq + (g * pk.detach()).to(dq.dtype)
        dk = dk + grads[3]
    return dq, dk, dv


def _backward(ctx, do, dlse):
    q, k, v, attn_mask, o, lse = ctx.saved_tensors
    scale, backend, return_lse = ctx.config
    if not return_lse:
        dlse = None  # the op's second output is internal then (never reaches a user)
    elif dlse is not None:  # keyless rows: P = 0, so g never matters; keep a -inf·0 NaN out
        dlse = torch.where(torch.isneginf(lse), torch.zeros((), device=lse.device), dlse.float())
    if do is None and dlse is None:
        return None, None, None, None, None, None, None
    if backend.split(":")[0] == "triton":  # "triton:v2" writes v1's lse (same convention)
        if return_lse:  # back to the kernels' +inf on keyless rows (exp(s − lse) = 0 there)
            lse = torch.where(torch.isneginf(lse), torch.full((), float("inf"), device=lse.device), lse)
        kpm = key_padding_mask(attn_mask, q.shape[0], k.shape[2])
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = _ext.load_triton()[0].attention.attention_bwd(do, q, k, v, o, lse, kpm, scale, dlse=dlse)
    else:
        dq, dk, dv = _sdpa_grads(q, k, v, attn_mask, scale, do, dlse)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("flashdiff::attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, backend: Optional[str] = None, return_lse: bool = False):
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
        return_lse: also return lse = log Σ_j exp(scale·q·k_j + mask_j), fp32 [B, H, Sq],
            natural log, -inf on a row with no key: what `flashdiff.merge_attention` takes to
            combine attention over disjoint key sets. Differentiable.
    Returns: [B, H, Sq, D] in q's dtype, or (out, lse) with return_lse.
    """
    key = _eager_key(q, k, v, attn_mask, scale, backend, return_lse)
    impl = _EAGER.get(key) if key is not None else None
    if impl is not None:  # this signature passed every check before: run it
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return _finish(impl(q, k, v, attn_mask, scale, return_lse), return_lse)
    choice = _resolve(q, k, v, attn_mask, scale, backend, return_lse)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0 or k.shape[2] == 0:
        o = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        if not return_lse:
            return o
        # no launch: lse is -inf without keys, log(#keys) at D = 0, empty without rows
        return o, reference.attention_lse(q, k, v, attn_mask, scale, upcast=_compute_dtype(q))[1].float()
    if use_custom_op(q, k, v):
        o, lse = _attention_op(q, k, v, attn_mask, scale, choice.impl, return_lse)
        return (o, lse) if return_lse else o
    impl = _dispatch.impls[choice.impl]
    if key is not None:
        if len(_EAGER) >= 4096:
            _EAGER.clear()
        _EAGER[key] = impl
    return _finish(impl(q, k, v, attn_mask, scale, return_lse), return_lse)


def _finish(o_lse, return_lse):
    """The eager result: out, or (out, lse) with the API's lse convention."""
    return (o_lse[0], _public_lse(o_lse[1])) if return_lse else o_lse[0]


# Eager calls whose signature (everything the checks and the backend choice read, never
# values) already passed every check -> the implementation chosen for them. A model calls
# attention with a handful of signatures, and the checks plus the choice cost several µs per
# call where torch's SDPA itself costs a few: the same idea as the sampler update's fast path
# (docs/internals.md). Cleared with the dispatch choices (a new table or override).
_EAGER: dict = {}
_dispatch.on_clear.append(_EAGER.clear)
_Tensor = torch.Tensor


def _eager_key(q, k, v, attn_mask, scale, backend, return_lse=False):
    """The signature of a plain eager call, or None when the call needs the full path (tensor
    subclasses, tracing, autograd, a non-float scale, a non-bool return_lse, empty inputs).
    return_lse is part of it: the backend then computes and returns lse."""
    if (type(return_lse) is not bool or type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor
            or (attn_mask is not None and type(attn_mask) is not _Tensor)
            or (scale is not None and (type(scale) is not float or not math.isfinite(scale)))):
        return None
    if use_custom_op(q, k, v) or q.numel() == 0 or k.numel() == 0:
        return None
    mask = None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, mask,
            backend, _backends._override, return_lse)
