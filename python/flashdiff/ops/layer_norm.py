"""layer_norm: LayerNorm over the last dim with adaLN modulation and an activation, in one pass.

    y = act((x̂·weight + bias)·(1 + scale) + shift),   x̂ = (x − mean)·rstd over the last dim

as DiT, PixArt, SD3 and Flux use it (their LayerNorm has no affine: weight = bias = None,
then `modulate(x, shift, scale)`; the activation is for fused norm → SiLU blocks).

Vertical slice: validation → backend choice → per-backend forward → torch.library op with a
fake implementation → autograd. Kernels: csrc/cpu/layer_norm.cpp, triton_kernels/layer_norm.py.
Memory traffic of the fused forward: read x once, write y once, against ~4 passes for
F.layer_norm, then `* (1 + scale) + shift`, then an activation in torch eager.

Output layout (the fake's, every backend's): a contiguous tensor of x's shape and dtype,
whatever x's strides (as F.layer_norm). The compiled kernels read rows of D with unit
stride: a non-contiguous x is copied first on the cpu backend; triton reads any x whose
leading dims collapse to one row stride in place.

rms_norm (the q/k norm) is the sibling slice in ops/rms_norm.py and shares the helpers here.
"""
from __future__ import annotations

import importlib
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _ext, _validate as check, reference
from ..backends import OpDispatch, register_op
from ..dispatch_table import _DTYPE_NAME, _log2
from ._common import dtype_code, f32, new_empty, ptr, use_custom_op

ACTIVATIONS = (None, "silu", "gelu")
_ACT_CODE = {"none": 0, "silu": 1, "gelu": 2}
NO_CUDA_KERNEL = "no CUDA kernel yet; the triton backend serves CUDA tensors"


# ------------------------------------------------------------------ helpers shared with rms_norm
def triton_module():
    """flashdiff.triton_kernels.layer_norm (imported on first use: triton's import is slow)."""
    return importlib.import_module("flashdiff.triton_kernels.layer_norm")


def rows_features(x, modulated: bool) -> dict:
    """Shape class of a row norm for the dispatch table: dtype, modulated, log2 of D and of the
    row count (the features docs/dispatch.md describes; categorical ones match exactly)."""
    D = x.shape[-1] if x.dim() else 1
    return {"dtype": _DTYPE_NAME.get(x.dtype, str(x.dtype)), "modulated": bool(modulated),
            "log2_d": _log2(D), "log2_rows": _log2(x.numel() // max(D, 1))}


def check_rows_input(x):
    """x: a floating tensor of at least one dimension (the normalized one)."""
    check.tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension ([..., D]: the last one is normalized), "
                         "got a 0-d tensor")


def check_weight(name, t, x):
    check.tensor(name, t, optional=True)
    check.shape(name, t, (x.shape[-1],), " ([D], D = the last dim of x)")


def kernel_supports(x, **_):
    if x.dtype not in check.KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported by the kernels (float32, float16, bfloat16)"
    return None


def triton_supports(x, **inputs):
    why = kernel_supports(x, **inputs)
    if why is None and x.shape[-1] > triton_module().MAX_D:
        why = (f"the last dim D={x.shape[-1]} is over the triton kernel's maximum of "
               f"{triton_module().MAX_D} (a whole row in one program's registers)")
    return why


def no_cuda_kernel(*_, **__):
    raise NotImplementedError(NO_CUDA_KERNEL)  # never chosen: supports() says why first


def kernel_rows(x):
    """(x as contiguous rows, R, D) for the compiled CPU kernels (a copy only when x is not
    contiguous)."""
    xk = x.contiguous()
    D = x.shape[-1]
    return xk, xk.numel() // D, D


# ------------------------------------------------------------------ features, validation
def layer_norm_features(x, scale=None, shift=None, **_) -> dict:
    """dtype, modulated (scale or shift present), log2_d, log2_rows."""
    return rows_features(x, scale is not None or shift is not None)


_dispatch = OpDispatch("layer_norm", features=layer_norm_features)


def _check_normalized_shape(normalized_shape, x):
    D = x.shape[-1]
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        given = (int(normalized_shape),)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in normalized_shape):
        given = tuple(int(v) for v in normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    if given != (D,):
        raise ValueError(f"normalized_shape must be ({D},): the norm runs over the last dim of x "
                         f"(shape {tuple(x.shape)}), got {given}")


def _check_modulation(name, t, x):
    """scale/shift: [N, D] with x [N, T, D] (one row per sample), or x's shape (per token)."""
    check.tensor(name, t, optional=True)
    if t is None:
        return
    shapes = [tuple(x.shape)]
    if x.dim() == 3:
        shapes.insert(0, (x.shape[0], x.shape[2]))
    if tuple(t.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        what = "([N, D] or [N, T, D] for x [N, T, D])" if x.dim() == 3 else "(x's shape)"
        raise ValueError(f"{name} must have shape {expected} {what}, got {tuple(t.shape)}")


def _check_args(x, normalized_shape, weight, bias, eps, scale, shift, activation):
    check_rows_input(x)
    _check_normalized_shape(normalized_shape, x)
    check_weight("weight", weight, x)
    check_weight("bias", bias, x)
    _check_modulation("scale", scale, x)
    _check_modulation("shift", shift, x)
    if scale is not None and shift is not None and scale.shape != shift.shape:
        raise ValueError(f"shift must have the shape of scale {tuple(scale.shape)}, got {tuple(shift.shape)}")
    check.same_device("x", x, weight=weight, bias=bias, scale=scale, shift=shift)
    check.finite_number("eps", eps, minimum=0.0)
    check.choice("activation", activation, ACTIVATIONS)


def _resolve(x, normalized_shape, weight=None, bias=None, eps=1e-6, scale=None, shift=None,
             activation=None, backend=None):
    _check_args(x, normalized_shape, weight, bias, eps, scale, shift, activation)
    inputs = {"x": x, "scale": scale, "shift": shift}
    return _dispatch.choose(backend, x.device, inputs,
                            key=(x.device, x.dtype, x.shape, scale is None and shift is None))


# ------------------------------------------------------------------ backends
# Each forward: (x, weight, bias, eps, scale, shift, activation "none"|"silu"|"gelu") -> y.
def _act(activation):
    return None if activation == "none" else activation


def _reference_fwd(x, weight, bias, eps, scale, shift, activation):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = reference.layer_norm(x, (x.shape[-1],), weight, bias, eps, scale, shift, _act(activation), upcast=dt)
    return y.to(x.dtype)


def _torch_fwd(x, weight, bias, eps, scale, shift, activation):
    """What a model without flashdiff runs: F.layer_norm, then the modulation and the
    activation in place (each a pass over y)."""
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = F.layer_norm(x, (x.shape[-1],), w, b, eps).contiguous()
    if scale is not None:
        y.mul_(1 + reference._per_token(scale.to(y.dtype), x))
    if shift is not None:
        y.add_(reference._per_token(shift.to(y.dtype), x))
    if activation == "silu":
        F.silu(y, inplace=True)
    elif activation == "gelu":
        y = F.gelu(y)
    return y


def _cpu_fwd(x, weight, bias, eps, scale, shift, activation):
    xk, R, D = kernel_rows(x)
    y = new_empty(xk)
    mod = scale if scale is not None else shift
    rows_per_mod = R // (mod.numel() // D) if mod is not None else 1
    w, b, s, t = f32(weight), f32(bias), f32(scale), f32(shift)
    _ext.load_cpu()[0].layer_norm_fwd(xk.data_ptr(), y.data_ptr(), ptr(w), ptr(b), ptr(s), ptr(t),
                                      R, D, rows_per_mod, float(eps), _ACT_CODE[activation],
                                      dtype_code(xk))
    return y


def _triton_fwd(x, weight, bias, eps, scale, shift, activation):
    out = new_empty(x, x.shape)  # contiguous (poisoned under flashdiff.testing.poisoned_outputs)
    return triton_module().layer_norm_fwd(x, weight, bias, eps, _act(activation), scale, shift, out=out)


_dispatch.register("reference", _reference_fwd)
_dispatch.register("torch", _torch_fwd)
_dispatch.register("cpu", _cpu_fwd, kernel_supports)
_dispatch.register("triton", _triton_fwd, triton_supports)
_dispatch.register("cuda", no_cuda_kernel, lambda **_: NO_CUDA_KERNEL)
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                   activation: str, backend: str) -> torch.Tensor:
    return _dispatch.impls[backend](x, weight, bias, eps, scale, shift, activation)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, scale, shift, activation, backend):
    return x.new_empty(x.shape)  # contiguous, x's dtype: the documented layout


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, scale, shift, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.config = (eps, activation, backend)


def reference_grads(dy, fn, inputs, needs):
    """Gradients of the fp32 reference `fn(*leaves)` for the inputs whose `needs` is set (the
    backward of every backend without a native one: one recompute of the forward)."""
    leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
    with torch.enable_grad():
        y = fn(*leaves)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)) if wanted else ())
    return [next(got).to(t.dtype) if t is not None and t.requires_grad else None for t in leaves]


def none_to_empty(like, *tensors):
    """Custom-op outputs cannot be None: an absent gradient travels as a 0-element tensor."""
    return tuple(like.new_empty(0) if t is None else t for t in tensors)


def empty_to_none(grads, inputs):
    return [None if t is None else g for g, t in zip(grads, inputs)]


# The triton backward is an op of its own, so that torch.compile traces a training step through
# it (its fake gives the gradients' shapes) instead of calling the launcher with fake tensors.
@torch.library.custom_op("flashdiff::layer_norm_backward_triton", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], activation: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = triton_module().layer_norm_bwd(dy, x, weight, bias, eps, _act(activation), scale, shift)
    return none_to_empty(x, *grads)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, eps, scale, shift, activation):
    return none_to_empty(x, x.new_empty(x.shape), *(None if t is None else torch.empty_like(t)
                                                    for t in (weight, bias, scale, shift)))


def _backward(ctx, dy):
    x, weight, bias, scale, shift = ctx.saved_tensors
    eps, activation, backend = ctx.config
    if backend == "triton":
        grads = _layer_norm_bwd_op(dy, x, weight, bias, eps, scale, shift, activation)
        dx, dw, db, ds, dt = empty_to_none(grads, [x, weight, bias, scale, shift])
    else:
        def fn(x_, w_, b_, s_, t_):
            return reference.layer_norm(x_, (x_.shape[-1],), w_, b_, eps, s_, t_, _act(activation),
                                        upcast=torch.float32)
        needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5)]
        dx, dw, db, ds, dt = reference_grads(dy, fn, [x, weight, bias, scale, shift], needs)
    return dx, dw, db, None, ds, dt, None, None


torch.library.register_autograd("flashdiff::layer_norm", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def layer_norm(x: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-6, scale: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None, activation: Optional[str] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the last dim with the adaLN modulation and an activation fused.

    y = act((x̂·weight + bias)·(1 + scale) + shift), x̂ = (x − mean)·rstd, statistics per row
    in fp32 (two-pass, biased variance, as torch.nn.LayerNorm).

    Args:
        x: [..., D], float32/float16/bfloat16 (float64 on the reference and torch backends),
            any strides. The output is contiguous, with x's shape and dtype.
        normalized_shape: (D,) or D: only the last dim is normalized.
        weight, bias: [D] or None (DiT/SD3/Flux: None, elementwise_affine=False).
        scale, shift: None, [N, D] with x [N, T, D] (one modulation per sample, broadcast over
            its tokens: DiT's `modulate`), or x's shape (per token). Both alike when both given.
        activation: None, "silu" or "gelu" (exact, erf), applied last.
        backend: None/"auto", "reference", "torch", "cpu", "triton" or "cuda" (no CUDA kernel
            yet: the triton backend serves CUDA tensors). See flashdiff.explain.
    """
    choice = _resolve(x, normalized_shape, weight, bias, eps, scale, shift, activation, backend)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    act = activation or "none"
    if use_custom_op(x, weight, bias, scale, shift):
        return _layer_norm_op(x, weight, bias, float(eps), scale, shift, act, choice.impl)
    return _dispatch.impls[choice.impl](x, weight, bias, eps, scale, shift, act)
