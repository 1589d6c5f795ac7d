"""qk_norm_rope: the q/k RMS norm of SD3/Flux and the rotary embedding, for q and k in one pass.

    q_out = rope(rms_norm(q)·q_weight),  k_out = rope(rms_norm(k)·k_weight)
    rope(n) = n·cos + rotate(n)·sin      (diffusers' apply_rotary_emb, use_real=True)

Vertical slice like ops/rms_norm.py: validation → backend choice → per-backend forward →
torch.library op with a fake → autograd. Kernel: triton_kernels/qk_norm_rope.py. Memory traffic
of the fused forward: read q and k once, write them once (+ the [S, D] cos/sin rows, shared by
every head), against ~14 passes per tensor for diffusers' eager RMSNorm then apply_rotary_emb.

Layout: q [B, H, S, D] and k [B, Hk, Sk, D] (flashdiff.attention's layout), any strides: a
[B, S, H, D] projection (diffusers' `unflatten(-1, (-1, head_dim))`) is passed as
`.transpose(1, 2)`, a view the triton kernel reads in place. cos, sin: [S, D] with S = Sq = Sk.
Outputs (the fake's layout, every backend's): contiguous tensors of q's and k's shapes, both in
q's dtype. Math in fp32 (float64 inputs: float64 on reference and torch), no rounding between
the norm and the rotation.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from .. import _validate as check, reference
from ..backends import OpDispatch, register_op
from ..dispatch_table import _DTYPE_NAME, _log2
from ._common import new_empty, use_custom_op
from .layer_norm import empty_to_none, kernel_supports, none_to_empty, reference_grads
from .rms_norm import _torch_fwd as _rms_norm_torch

NO_CPU_KERNEL = "no CPU kernel yet: on CPU the torch backend serves"
NO_CUDA_KERNEL = "no kernel yet: the triton backend serves CUDA tensors"


def _triton():
    """flashdiff.triton_kernels.qk_norm_rope (imported on first use: triton's import is slow)."""
    return importlib.import_module("flashdiff.triton_kernels.qk_norm_rope")


# ------------------------------------------------------------------ features, validation
def qk_norm_rope_features(q, k, **_) -> dict:
    """Shape class for the dispatch table: dtype, log2 of the head dim, log2 of the rows of q
    and k together (one launch serves both)."""
    D = q.shape[-1]
    rows = (q.numel() + k.numel()) // max(D, 1)
    return {"dtype": _DTYPE_NAME.get(q.dtype, str(q.dtype)), "log2_d": _log2(D), "log2_rows": _log2(rows)}


_dispatch = OpDispatch("qk_norm_rope", features=qk_norm_rope_features,
                       backward={"triton": "its own backward kernel (rstd recomputed)",
                                 "*": "autograd of the fp32 reference"})


def _check_args(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    check.tensor("q", q, dim=4)
    check.tensor("k", k, dim=4)
    B, H, S, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, Hk, Sk, D] with q's B={B} and D={D} (q is [B, H, S, D] "
                         f"{tuple(q.shape)}), got {tuple(k.shape)}")
    check.same_dtype("q", q, k=k)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check.tensor(name, w, optional=True)
        check.shape(name, w, (D,), " ([D], D = the head dim of q)")
    if (cos is None) != (sin is None):
        raise ValueError(f"cos and sin must be given together (the rotary embedding) or both None, "
                         f"got cos={'None' if cos is None else 'a tensor'}, sin={'None' if sin is None else 'a tensor'}")
    if cos is not None:
        check.tensor("cos", cos)
        check.tensor("sin", sin)
        check.shape("cos", cos, (S, D), f" ([S, D] for q [B, H, S, D] = {tuple(q.shape)})")
        check.shape("sin", sin, (S, D), f" ([S, D] for q [B, H, S, D] = {tuple(q.shape)})")
        if k.shape[2] != S:
            raise ValueError(f"k must have q's sequence length S={S} when cos/sin are given (one "
                             f"rotary position per token), got k {tuple(k.shape)}")
        if D % 2:
            raise ValueError(f"the head dim D={D} (last dim of q) must be even for the rotary embedding "
                             "(it rotates pairs of columns)")
    check.same_device("q", q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    check.finite_number("eps", eps, minimum=0.0)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool (True: pairs (x[2i], x[2i+1]) as Flux; False: "
                        f"halves (x[:D/2], x[D/2:])), got {type(interleaved).__name__}")


def _resolve(q, k, q_weight=None, k_weight=None, cos=None, sin=None, eps=1e-6, interleaved=True,
             backend=None):
    _check_args(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    return _dispatch.choose(backend, q.device, {"q": q, "k": k},
                            key=(q.device, q.dtype, q.shape, k.shape))


def _triton_supports(q, k, **_):
    why = kernel_supports(q)
    if why is None and q.shape[-1] > _triton().MAX_D:
        why = (f"the head dim D={q.shape[-1]} is over the triton kernel's maximum of {_triton().MAX_D} "
               "(a whole row in one program's registers)")
    return why


# ------------------------------------------------------------------ backends
# Each forward: (q, k, q_weight, k_weight, cos, sin, eps, interleaved) -> (q_out, k_out).
def _math_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _reference_fwd(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    qo, ko = reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved, upcast=_math_dtype(q))
    return qo.to(q.dtype), ko.to(q.dtype)


def _torch_fwd(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    """What a diffusers model runs unfused: the RMS norm in the input's dtype (F.rms_norm), then
    apply_rotary_emb's fp32 rotation, rounded back to the dtype; per tensor, ~7 kernels each."""
    return tuple(reference.rotary_emb(_rms_norm_torch(x, w, eps), cos, sin, interleaved,
                                      upcast=_math_dtype(q)).to(q.dtype)
                 for x, w in ((q, q_weight), (k, k_weight)))


def _triton_fwd(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    # contiguous outputs, poisoned under flashdiff.testing.poisoned_outputs
    return _triton().qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps, interleaved,
                                      q_out=new_empty(q, q.shape), k_out=new_empty(q, k.shape))


def _declined(why):
    def impl(*_, **__):
        raise NotImplementedError(why)  # never chosen: supports() says why first
    return impl


_dispatch.register("reference", _reference_fwd)
_dispatch.register("torch", _torch_fwd)
_dispatch.register("cpu", _declined(NO_CPU_KERNEL), lambda **_: NO_CPU_KERNEL)
_dispatch.register("triton", _triton_fwd, _triton_supports)
_dispatch.register("cuda", _declined(NO_CUDA_KERNEL), lambda **_: NO_CUDA_KERNEL)
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                     k_weight: Optional[torch.Tensor], cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                     eps: float, interleaved: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _dispatch.impls[backend](q, k, q_weight, k_weight, cos, sin, eps, interleaved)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, interleaved, backend):
    # contiguous, of q's and k's shapes, both in q's dtype: the documented layout
    return q.new_empty(q.shape), q.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps, interleaved, backend = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.config = (eps, interleaved, backend)


# The triton backward is an op of its own, so that torch.compile traces a training step through
# it (its fake gives the gradients' shapes) instead of calling the launcher with fake tensors.
@torch.library.custom_op("flashdiff::qk_norm_rope_backward_triton", mutates_args=())
def _qk_norm_rope_bwd_op(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                         cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], eps: float,
                         interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return none_to_empty(q, *_triton().qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight, k_weight,
                                                        cos, sin, eps, interleaved))


@_qk_norm_rope_bwd_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    return none_to_empty(q, q.new_empty(q.shape), k.new_empty(k.shape),
                         *(None if w is None else torch.empty_like(w) for w in (q_weight, k_weight)))


def _backward(ctx, dq_out, dk_out):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    eps, interleaved, backend = ctx.config
    # autograd materializes an unused output's gradient as zeros; None only if that is turned off
    dq_out = torch.zeros_like(q, dtype=q.dtype) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k, dtype=q.dtype) if dk_out is None else dk_out
    needs = list(ctx.needs_input_grad[:6])
    if backend == "triton" and not (needs[4] or needs[5]):  # the kernel has no dcos/dsin
        grads = _qk_norm_rope_bwd_op(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps, interleaved)
        dq, dk, dqw, dkw = empty_to_none(grads, [q, k, q_weight, k_weight])
        dcos = dsin = None
    else:
        def fn(q_, k_, qw_, kw_, c_, s_):
            qo, ko = reference.qk_norm_rope(q_, k_, qw_, kw_, c_, s_, eps, interleaved, upcast=torch.float32)
            return torch.cat((qo.flatten(), ko.flatten()))  # one output: reference_grads takes one dy

        dy = torch.cat((dq_out.flatten(), dk_out.flatten()))
        dq, dk, dqw, dkw, dcos, dsin = reference_grads(dy, fn, [q, k, q_weight, k_weight, cos, sin], needs)
    return dq, dk, dqw, dkw, dcos, dsin, None, None, None


torch.library.register_autograd("flashdiff::qk_norm_rope", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], cos: Optional[torch.Tensor] = None,
                 sin: Optional[torch.Tensor] = None, eps: float = 1e-6, interleaved: bool = True,
                 backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMS norm of q and k over the head dim, times their weights, then the rotary embedding.

    Equals diffusers' `attn.norm_q(q)` / `attn.norm_k(k)` (RMSNorm) followed by
    `apply_rotary_emb(x, (cos, sin), use_real=True)`, in one pass over q and k, in fp32 with no
    rounding in between (diffusers rounds the norm's output to the weights' dtype first).

    Args:
        q: [B, H, S, D]; k: [B, Hk, Sk, D] (Sk = S when cos/sin are given). float32/float16/
            bfloat16 (float64 on the reference and torch backends), any strides: pass a
            [B, S, H, D] projection as `.transpose(1, 2)`. k must have q's dtype.
        q_weight, k_weight: [D] or None (RMSNorm without affine).
        cos, sin: [S, D] (diffusers' `image_rotary_emb` pair: FluxPosEmbed,
            get_1d_rotary_pos_embed(use_real=True)), or both None for the norm alone.
        interleaved: True rotates pairs (x[2i], x[2i+1]) (Flux, CogVideoX, HunyuanDiT:
            use_real_unbind_dim=-1); False the halves (x[:D/2], x[D/2:]) (use_real_unbind_dim=-2).
        backend: None/"auto", "reference", "torch", "triton"; "cpu" and "cuda" have no kernel
            yet (on CPU the torch backend serves, on CUDA triton). See flashdiff.explain.

    Returns:
        (q_out, k_out): contiguous, of q's and k's shapes, in q's dtype.
    """
    choice = _resolve(q, k, q_weight, k_weight, cos, sin, eps, interleaved, backend)
    if q.numel() == 0 and k.numel() == 0:
        return q.new_empty(q.shape), q.new_empty(k.shape)
    if use_custom_op(q, k, q_weight, k_weight, cos, sin):
        return _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, float(eps), interleaved, choice.impl)
    return _dispatch.impls[choice.impl](q, k, q_weight, k_weight, cos, sin, eps, interleaved)
