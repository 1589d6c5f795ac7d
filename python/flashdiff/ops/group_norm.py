"""group_norm: normalization + affine + per-sample scale/shift + activation, in one pass.

    y = act(((x − mean)·rstd·weight + bias)·(1 + scale) + shift)

Vertical slice: validation → backend choice → per-backend forward → torch.library op with a
fake implementation → autograd. Kernels live in csrc/ (cpu, cuda) and triton_kernels/.
Memory traffic of a fused forward: read x once (twice when a group does not fit in cache),
write y once — against ~6 passes for F.silu(F.group_norm(x)) plus a modulation.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, _validate as check, dispatch_table, reference
from .. import backends as _backends
from ..backends import OpDispatch, register_op
from ._common import dtype_code, f32, new_empty, ptr, stream_of, use_custom_op

ACTIVATIONS = (None, "silu", "gelu")
_ACT_CODE = {"none": 0, "silu": 1, "gelu": 2}

def _features(x, num_groups, scale, activation):
    return dispatch_table.group_norm_features(x, num_groups, scale, activation)


_dispatch = OpDispatch("group_norm", features=_features, backward={
    "triton": "native Triton kernels",
    "*": "differentiates the fp32 reference (one recompute of the forward)"})


# ------------------------------------------------------------------ validation
def _check_args(x, num_groups, weight, bias, eps, activation, scale, shift):
    check.tensor("x", x, dims=(3, 4, 5))
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    N, C = x.shape[:2]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of the channel count C={C}, got {num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        check.tensor(name, t, optional=True)
        check.shape(name, t, (C,), " ([C])")
    for name, t in (("scale", scale), ("shift", shift)):
        check.tensor(name, t, optional=True)
        check.shape(name, t, (N, C), " ([N, C])")
    check.same_device("x", x, weight=weight, bias=bias, scale=scale, shift=shift)
    check.finite_number("eps", eps, minimum=0.0)
    check.choice("activation", activation, ACTIVATIONS)


def _kernel_supports(x, **_):
    if x.dtype not in check.KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported by the kernels (float32, float16, bfloat16)"
    return None


# CUDA's grid dim x limit (triton_kernels.group_norm.MAX_GRID_X; kept here so that supports()
# does not import triton): the Triton kernels put one (n, group) per program along x.
_MAX_GRID_X = 2**31 - 1


def _triton_supports(x, num_groups, **inputs):
    why = _kernel_supports(x)
    if why is None and x.shape[0] * num_groups > _MAX_GRID_X:
        why = (f"N·num_groups = {x.shape[0] * num_groups} programs are over CUDA's grid limit of "
               f"{_MAX_GRID_X} along x (one program per (sample, group))")
    return why


def _resolve(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale=None,
             shift=None, backend=None):
    _check_args(x, num_groups, weight, bias, eps, activation, scale, shift)
    inputs = {"x": x, "num_groups": num_groups, "scale": scale, "activation": activation}
    return _dispatch.choose(backend, x.device, inputs,
                            key=(x.device, x.dtype, x.shape, x.stride(), num_groups, scale is None, activation))


# ------------------------------------------------------------------ backends
# Each forward returns (y, mean, rstd); mean/rstd are fp32 [N, G] and feed the backward.
# stats=False (the eager path, no autograd): mean/rstd may come back None, so the compiled
# kernels skip allocating and writing them (two allocations, ~1.5 µs of a call).
def _reference_fwd(x, num_groups, weight, bias, eps, activation, scale, shift, stats=True):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    act = None if activation == "none" else activation
    y = reference.group_norm(x, num_groups, weight, bias, eps, act, scale, shift, upcast=dt)
    mean, rstd = reference.group_norm_stats(x, num_groups, eps, upcast=torch.float32)
    return y.to(x.dtype), mean, rstd


def _kernel_layout(x):
    """(tensor, channels_last) in a layout every kernel reads and every backend's output takes
    (the documented output layout, see group_norm): dense NC* or N*C; other strides are copied
    to contiguous."""
    if x.is_contiguous():
        return x, False
    if check.is_dense_channels_last(x):
        return x, True
    return x.contiguous(), False


def empty_output(x):
    """An uninitialized y in group_norm's output layout for x, without reading x's values (the
    fake implementation and the empty-input path use it; kernels allocate like _kernel_layout's
    tensor, which has the same strides): [N, *spatial, C] in memory when x is stored densely so
    and is not contiguous, else contiguous. A transposed or batch-permuted dense x gets a
    contiguous y, not x's strides (torch.empty_like would keep them)."""
    if x.is_contiguous() or not check.is_dense_channels_last(x):
        return x.new_empty(x.shape)
    perm = (0, *range(2, x.dim()), 1)
    inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.new_empty([x.shape[i] for i in perm]).permute(inverse)


def _compiled_call(x, num_groups, weight, bias, eps, activation, scale, shift, stats):
    """(y, mean, rstd, args, keep): the outputs allocated, the group_norm_fwd binding arguments
    (docs/internals.md) for the compiled modules' entry points, and the tensors those raw
    pointers point into (a contiguous copy of x, fp32 copies of the parameters): the caller
    holds `keep` until the kernel has run, or the pointers dangle."""
    xk, channels_last = _kernel_layout(x)
    N, C = x.shape[:2]
    y = new_empty(xk)
    mean = new_empty(xk, (N, num_groups), torch.float32) if stats else None
    rstd = new_empty(mean) if stats else None
    w, b, s, t = f32(weight), f32(bias), f32(scale), f32(shift)
    args = (xk.data_ptr(), y.data_ptr(), ptr(w), ptr(b), ptr(s), ptr(t), ptr(mean), ptr(rstd),
            N, C, math.prod(x.shape[2:]), num_groups, float(eps), _ACT_CODE[activation], channels_last,
            dtype_code(xk))
    return y, mean, rstd, args, (xk, w, b, s, t)


def _compiled_fwd(module, x, num_groups, weight, bias, eps, activation, scale, shift, stream=(),
                  stats=True):
    y, mean, rstd, args, keep = _compiled_call(x, num_groups, weight, bias, eps, activation, scale, shift, stats)
    module.group_norm_fwd(*args, *stream)
    del keep  # the launch is queued on the stream; the caching allocator keeps the memory stream-ordered
    return y, mean, rstd


def _cpu_fwd(x, *args, stats=True):
    return _compiled_fwd(_ext.load_cpu()[0], x, *args, stats=stats)


def _cuda_fwd(x, *args, stats=True):
    with torch.cuda.device(x.device):
        return _compiled_fwd(_ext.load_cuda()[0], x, *args, stream=(stream_of(x),), stats=stats)


def _cuda_onepass_call(x, num_groups, weight, bias, eps, activation, scale, shift, stats=True):
    """(y, mean, rstd, ran_onepass): the one-kernel CUDA group norm where it can serve the call,
    else the multi-launch kernel on the same arguments. Tests read ran_onepass."""
    module = _ext.load_cuda()[0]
    onepass = getattr(module, "group_norm_fwd_onepass", None)
    if onepass is None:
        raise RuntimeError("this build of flashdiff._cuda has no group_norm_fwd_onepass: rebuild it")
    y, mean, rstd, args, keep = _compiled_call(x, num_groups, weight, bias, eps, activation, scale, shift, stats)
    stream = stream_of(x)
    # The device index comes from the tensor (a CUDA tensor always has one): the binding sets it
    # current without a pointer-attribute query, and no torch.cuda.device context is entered.
    if onepass(*args, x.device.index, stream):
        return y, mean, rstd, True
    module.group_norm_fwd(*args, stream)  # its own guard finds the device from x's pointer
    return y, mean, rstd, False


def _cuda_onepass_fwd(x, *args, stats=True):
    """Variant "cuda:onepass" (csrc/cuda/group_norm_onepass.cu): a thread-block cluster per
    (n, group) holds the group in shared memory, so x is read once and y written once, in one
    launch with no scratch memory. Groups too large for a cluster of 8 CTAs' shared memory, and
    devices older than sm_90, run the multi-launch kernel. A variant, not the "cuda" backend:
    `flashdiff tune` times it and checks it against torch, and auto picks it only where it was
    measured correct and fastest; explicit backend="cuda" keeps the multi-launch kernel."""
    return _cuda_onepass_call(x, *args, stats=stats)[:3]


def _torch_fwd(x, num_groups, weight, bias, eps, activation, scale, shift, stats=True):
    """What a model without flashdiff runs: F.group_norm, then the modulation and the
    activation in place (each a pass over y). Output laid out like the kernels' (x's memory
    format when x is dense, else contiguous)."""
    xk, _ = _kernel_layout(x)
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = reference._like_layout(F.group_norm(xk, num_groups, w, b, eps), xk)  # no copy when it already is
    if scale is not None or shift is not None:
        per_sample = x.shape[:2] + (1,) * (x.dim() - 2)
        if scale is not None:
            y.mul_(1 + scale.to(y.dtype).reshape(per_sample))
        if shift is not None:
            y.add_(shift.to(y.dtype).reshape(per_sample))
    if activation == "silu":
        F.silu(y, inplace=True)
    elif activation == "gelu":
        y = F.gelu(y)
    if not stats:
        return y, None, None
    mean, rstd = reference.group_norm_stats(xk, num_groups, eps, upcast=torch.float32)
    return y, mean, rstd


def _triton_fwd(x, num_groups, weight, bias, eps, activation, scale, shift, stats=True):
    # The launcher reads any x whose spatial dims collapse in place and allocates y like it;
    # handing it _kernel_layout's tensor keeps y in the documented layout (a batch-permuted or
    # sliced x would otherwise give y x's strides, where the other backends give contiguous).
    act = None if activation == "none" else activation
    return _ext.load_triton()[0].group_norm.group_norm_fwd(_kernel_layout(x)[0], num_groups, weight, bias,
                                                            eps, act, scale, shift)


_dispatch.register("reference", _reference_fwd)
def _torch_supports(x, num_groups, **_):
    # F.group_norm refuses a tensor with one value per (sample, group) over the whole batch
    # ("Expected more than 1 value per channel"); the reference serves it (y = shift)
    if x.shape[0] * (x.shape[1] // num_groups) * math.prod(x.shape[2:]) == 1:
        return "torch's F.group_norm refuses one value per group over the batch"
    return None


_dispatch.register("torch", _torch_fwd, _torch_supports)
_dispatch.register("cpu", _cpu_fwd, _kernel_supports)
_dispatch.register("cuda", _cuda_fwd, _kernel_supports)
_dispatch.register("triton", _triton_fwd, _triton_supports)
_dispatch.register_variant("cuda", "onepass", _cuda_onepass_fwd)


def _triton_onepass_fwd(x, num_groups, weight, bias, eps, activation, scale, shift, stats=True):
    """Variant "triton:onepass": one program per (n, group) holds the group in registers (x read
    once); groups over 16K padded elements run the split kernels (triton_kernels/group_norm.py)."""
    act = None if activation == "none" else activation
    return _ext.load_triton()[0].group_norm.group_norm_fwd_onepass(_kernel_layout(x)[0], num_groups, weight,
                                                                    bias, eps, act, scale, shift)


_dispatch.register_variant("triton", "onepass", _triton_onepass_fwd)
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float, activation: str,
                   scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _dispatch.impls[backend](x, num_groups, weight, bias, eps, activation, scale, shift)
    return y, mean, rstd


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, activation, scale, shift, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return empty_output(x), stats, torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, activation, scale, shift, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.config = (num_groups, eps, activation, backend)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    num_groups, eps, activation, backend = ctx.config
    act = None if activation == "none" else activation
    if backend.split(":")[0] == "triton":  # variants write the same mean/rstd
        grads = _ext.load_triton()[0].group_norm.group_norm_bwd(
            dy, x, num_groups, weight, bias, eps, act, scale, shift, mean, rstd)
    else:
        # No native backward: differentiate the fp32 reference (one recompute of the forward).
        inputs = [x, weight, bias, scale, shift]
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip(inputs, [ctx.needs_input_grad[i] for i in (0, 2, 3, 6, 7)])]
        with torch.enable_grad():
            y = reference.group_norm(leaves[0], num_groups, *leaves[1:3], eps, act, *leaves[3:5],
                                     upcast=torch.float32)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)))
        grads = [next(got).to(t.dtype) if t is not None and t.requires_grad else None for t in leaves]
    dx, dw, db, ds, dt = grads
    return dx, None, dw, db, None, None, ds, dt, None


torch.library.register_autograd("flashdiff::group_norm", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               activation: Optional[str] = None, scale: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Group normalization with the affine, a per-sample modulation and an activation fused.

    y = act(((x − mean)·rstd·weight + bias)·(1 + scale) + shift), statistics in fp32 per
    (sample, group), biased variance (as torch.nn.GroupNorm).

    Output layout, a function of x's strides alone, the same on every backend and in the fake
    (torch.compile): channels-last ([N, *spatial, C] in memory, e.g. torch.channels_last) when
    x is stored densely so and is not contiguous; contiguous otherwise, including transposed,
    batch-permuted and sliced x. Dtype and shape: x's.

    Args:
        x: [N, C, *spatial] with 1 to 3 spatial dims, float32/float16/bfloat16, any strides
            (contiguous and channels-last x are read in place, others copied to contiguous).
        num_groups: divides C.
        weight, bias: [C] or None. scale, shift: [N, C] or None (AdaGN / adaLN modulation).
        activation: None, "silu" or "gelu" (exact, erf).
        backend: None/"auto", "reference", "torch", "cpu", "triton" or "cuda" (see
            flashdiff.explain). Auto takes the backend measured fastest for this shape class.
    """
    act = activation or "none"
    key = _eager_key(x, num_groups, weight, bias, eps, activation, scale, shift, backend)
    impl = _EAGER.get(key) if key is not None else None
    if impl is not None:  # this signature passed every check before: run it
        return impl(x, num_groups, weight, bias, eps, act, scale, shift, stats=False)[0]
    choice = _resolve(x, num_groups, weight, bias, eps, activation, scale, shift, backend)
    if x.numel() == 0:
        return empty_output(x)
    if use_custom_op(x, weight, bias, scale, shift):
        return _group_norm_op(x, num_groups, weight, bias, float(eps), act, scale, shift, choice.impl)[0]
    impl = _dispatch.impls[choice.impl]
    if key is not None:
        if len(_EAGER) >= 4096:
            _EAGER.clear()
        _EAGER[key] = impl
    return impl(x, num_groups, weight, bias, eps, act, scale, shift, stats=False)[0]


# Eager calls whose signature (everything the checks and the choice read; values only for the
# scalars num_groups, eps and activation) already passed every check -> the implementation
# chosen for them: a model calls group norm with a few signatures, and the checks cost more
# than a small launch (docs/internals.md, "the eager hot path"). Cleared with the choices.
_EAGER: dict = {}
_dispatch.on_clear.append(_EAGER.clear)
_Tensor = torch.Tensor


def _param_sig(t):
    if t is None:
        return None
    if type(t) is not _Tensor:
        raise TypeError  # not a plain tensor: the full path says what is wrong
    return (t.shape, t.dtype, t.device)


def _eager_key(x, num_groups, weight, bias, eps, activation, scale, shift, backend):
    """The signature of a plain eager call, or None when it needs the full path."""
    if type(x) is not _Tensor or type(num_groups) is not int or type(eps) is not float:
        return None
    if use_custom_op(x, weight, bias, scale, shift) or x.numel() == 0:
        return None
    try:
        params = (_param_sig(weight), _param_sig(bias), _param_sig(scale), _param_sig(shift))
    except TypeError:
        return None
    return (x.shape, x.stride(), x.dtype, x.device, num_groups, eps, activation, params, backend,
            _backends._override)
