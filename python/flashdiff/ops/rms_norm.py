"""rms_norm: y = x·rsqrt(mean(x²) + eps)·weight over the last dim (the q/k norm of SD3/Flux).

Vertical slice like ops/layer_norm.py, whose row-norm helpers (validation, features, kernel
layout, the triton module, the fp32-reference backward) it shares. Statistics and the scaling
in fp32, output in x's dtype; a contiguous tensor of x's shape (the fake's layout).
Memory traffic of the fused forward: read x once, write y once (q/k norm runs on [B, S, H, 64..128]
rows: D small, many rows, so one program / one loop iteration covers many rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, _validate as check, reference
from ..backends import OpDispatch, register_op
from ._common import dtype_code, f32, new_empty, ptr, use_custom_op
from .layer_norm import (
    NO_CUDA_KERNEL, check_rows_input, check_weight, empty_to_none, kernel_rows, kernel_supports,
    no_cuda_kernel, none_to_empty, reference_grads, rows_features, triton_module, triton_supports,
)


def rms_norm_features(x, **_) -> dict:
    """dtype, modulated (always False: no modulation), log2_d, log2_rows."""
    return rows_features(x, False)


_dispatch = OpDispatch("rms_norm", features=rms_norm_features)


def _resolve(x, weight=None, eps=1e-6, backend=None):
    check_rows_input(x)
    check_weight("weight", weight, x)
    check.same_device("x", x, weight=weight)
    check.finite_number("eps", eps, minimum=0.0)
    return _dispatch.choose(backend, x.device, {"x": x}, key=(x.device, x.dtype, x.shape))


# ------------------------------------------------------------------ backends: (x, weight, eps) -> y
def _reference_fwd(x, weight, eps):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return reference.rms_norm(x, weight, eps, upcast=dt).to(x.dtype)


def _torch_fwd(x, weight, eps):
    """F.rms_norm (torch >= 2.4), else the eager expression in fp32."""
    w = None if weight is None else weight.to(x.dtype)
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps).contiguous()
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y * w if w is not None else y).contiguous()


def _cpu_fwd(x, weight, eps):
    xk, R, D = kernel_rows(x)
    y = new_empty(xk)
    w = f32(weight)
    _ext.load_cpu()[0].rms_norm_fwd(xk.data_ptr(), y.data_ptr(), ptr(w), R, D, float(eps), dtype_code(xk))
    return y


def _triton_fwd(x, weight, eps):
    return triton_module().rms_norm_fwd(x, weight, eps, out=new_empty(x, x.shape))


_dispatch.register("reference", _reference_fwd)
_dispatch.register("torch", _torch_fwd)
_dispatch.register("cpu", _cpu_fwd, kernel_supports)
_dispatch.register("triton", _triton_fwd, triton_supports)
_dispatch.register("cuda", no_cuda_kernel, lambda **_: NO_CUDA_KERNEL)
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, backend: str) -> torch.Tensor:
    return _dispatch.impls[backend](x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape)  # contiguous, x's dtype: the documented layout


def _setup_context(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.config = (eps, backend)


@torch.library.custom_op("flashdiff::rms_norm_backward_triton", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return none_to_empty(x, *triton_module().rms_norm_bwd(dy, x, weight, eps))


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, eps):
    return none_to_empty(x, x.new_empty(x.shape), None if weight is None else torch.empty_like(weight))


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    eps, backend = ctx.config
    if backend == "triton":  # its own op, as layer_norm's (torch.compile traces the backward)
        dx, dw = empty_to_none(_rms_norm_bwd_op(dy, x, weight, eps), [x, weight])
    else:
        dx, dw = reference_grads(dy, lambda x_, w_: reference.rms_norm(x_, w_, eps, upcast=torch.float32),
                                 [x, weight], [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
    return dx, dw, None, None


torch.library.register_autograd("flashdiff::rms_norm", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
             backend: Optional[str] = None) -> torch.Tensor:
    """RMSNorm over the last dim: y = x·rsqrt(mean(x²) + eps)·weight, computed in fp32.

    Args:
        x: [..., D] of any rank ≥ 1 (q/k norm: [B, H, S, head_dim] or [B, S, H, head_dim]),
            float32/float16/bfloat16 (float64 on the reference and torch backends), any
            strides. The output is contiguous, with x's shape and dtype.
        weight: [D] or None.
        backend: None/"auto", "reference", "torch", "cpu", "triton" or "cuda" (no CUDA kernel
            yet: the triton backend serves CUDA tensors). See flashdiff.explain.
    """
    choice = _resolve(x, weight, eps, backend)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    if use_custom_op(x, weight):
        return _rms_norm_op(x, weight, float(eps), choice.impl)
    return _dispatch.impls[choice.impl](x, weight, eps)
