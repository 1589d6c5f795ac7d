"""Sampler updates: one fused elementwise pass per step, guidance included.

Every family lowers to the generic affine update `scheduler_update` (docs/internals.md):

    m    = u + g·(c − u)            (classifier-free guidance, when model_output_uncond is given)
    x0   = clamp(a_x·x + a_m·m, ±clip)
    eps  = e_x·x + e_m·m + e_0·x0
    prev = p_x·x + p_0·x0 + p_e·eps + p_n·noise + p_d·prev_x0

The `*_coefs` builders return its 12 coefficients (order: reference.SCHED_COEF_NAMES) from the
schedule values. They accept Python floats (fast host math, one small host→device copy) or
tensors of any shape on the data's device (no host read, so no sync; a [T]-shaped schedule
gives a [T, 12] table a scheduler can precompute once). The `*_step` functions build the
coefficients and run the update. Traffic: read x, c (+u, noise, prev_x0), write prev (+x0).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import numpy as np
import torch

from .. import _ext, _validate as check, backends as _backends, dispatch_table, reference
from ..backends import OpDispatch, register_op
from .._validate import DTYPE_CODE
from ._common import new_empty, ptr, stream_of, use_custom_op

Scalar = Union[float, torch.Tensor]
NUM_COEFS = len(reference.SCHED_COEF_NAMES)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

def _features(sample, model_output_uncond=None):
    return dispatch_table.scheduler_features(sample, model_output_uncond)


_dispatch = OpDispatch("scheduler_update", features=_features, backward={
    "*": "differentiates the fp32 reference (the update is affine; one recompute)"})


# ------------------------------------------------------------------ coefficient builders
def _sqrt(v):
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


def _log(v):
    return v.log() if isinstance(v, torch.Tensor) else math.log(v)


def _as64(v):
    return v.to(torch.float64) if isinstance(v, torch.Tensor) else float(v)


def _pack(device=None, **named) -> torch.Tensor:
    """Coefficients by name (missing = 0; clip missing = +inf) → fp32 tensor [..., 12]."""
    named.setdefault("clip", math.inf)
    values = [named.pop(name, 0.0) for name in reference.SCHED_COEF_NAMES]
    if named:
        raise ValueError(f"unknown coefficient names {sorted(named)}")
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:  # from_numpy: a third of torch.tensor(list)'s cost, which is µs here
        coefs = torch.from_numpy(np.array(values, dtype=np.float32))
        return coefs if device is None or torch.device(device).type == "cpu" else _to_device(coefs, device)
    ref = tensors[0]
    # Python numbers beside device tensors: filled on the device (torch.tensor(v, device=cuda)
    # would be a pageable host->device copy, which blocks the host)
    values = [v if isinstance(v, torch.Tensor) else torch.full((), v, dtype=torch.float64, device=ref.device)
              for v in values]
    return torch.stack(torch.broadcast_tensors(*values), dim=-1).to(torch.float32)


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without blocking the host: from pinned memory with a
    non-blocking copy on CUDA (a pageable copy waits for the stream, i.e. a sync inside a
    sampling loop); the caching host allocator keeps the pinned block until the copy is done.
    Builders with host-number schedules are memoized, so this runs once per distinct step."""
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# Exact types of the schedule values worth memoizing (tensors of any subclass, numpy scalars
# and the like run the builder every time). The key holds the values, and a hit must also
# match their types: True == 1 == 1.0 would otherwise return the result cached for 1 and skip
# the check that rejects a bool.
_HOST_TYPES = frozenset((float, int, bool, str, type(None)))
_HOST_COEFS_MAX = 4096


def _memoize_host_schedules(builder):
    """Cache a builder's result when every schedule value is a host number: a sampling loop
    with float schedules then pays a dict lookup per step after its first image, not the
    builder's Python and checks (the op is ~5 µs at SD latent sizes). Tensor inputs are never
    cached. The cached tensor is shared: treat a builder's result as read-only."""
    cache: dict = {}

    @functools.wraps(builder)
    def wrapper(*args, device=None, **kwargs):
        values = (*args, *kwargs.values()) if kwargs else args
        key = (args, tuple(kwargs.items()), device) if kwargs else (args, device)
        types = tuple(map(type, values))
        try:
            hit = cache.get(key)
        except TypeError:  # an unhashable argument: the builder's checks name it
            hit = None
        if hit is not None and hit[0] == types:  # only whitelisted types are ever stored
            return hit[1]
        coefs = builder(*args, device=device, **kwargs)
        if _HOST_TYPES.issuperset(types):
            if len(cache) >= _HOST_COEFS_MAX:
                cache.clear()
            cache[key] = (types, coefs)
        return coefs

    return wrapper


def _x0_eps_coefs(prediction_type, sqrt_a, sqrt_b):
    """diffusers' x0 and eps from a model output at ᾱ (sqrt_a = √ᾱ, sqrt_b = √(1−ᾱ))."""
    check.choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":  # x0 = (x − √(1−ᾱ)·m)/√ᾱ, eps = m
        return dict(x0_from_x=1 / sqrt_a, x0_from_m=-sqrt_b / sqrt_a, eps_from_m=1.0)
    if prediction_type == "sample":  # x0 = m, eps = (x − √ᾱ·m)/√(1−ᾱ)
        return dict(x0_from_m=1.0, eps_from_x=1 / sqrt_b, eps_from_m=-sqrt_a / sqrt_b)
    # v: x0 = √ᾱ·x − √(1−ᾱ)·v, eps = √ᾱ·v + √(1−ᾱ)·x
    return dict(x0_from_x=sqrt_a, x0_from_m=-sqrt_b, eps_from_x=sqrt_b, eps_from_m=sqrt_a)


def _clip(clip_sample_range):
    if clip_sample_range is None:
        return math.inf
    check.finite_number("clip_sample_range", clip_sample_range, minimum=0.0)
    return float(clip_sample_range)


def _guidance(guidance_scale):
    check.finite_number("guidance_scale", guidance_scale, allow_tensor=True)
    return _as64(guidance_scale)


def _device_of(*values):
    return next((v.device for v in values if isinstance(v, torch.Tensor)), None)


def _host_values(v):
    """v's values when reading them costs no device sync (a number, or a CPU tensor: schedulers
    build their tables from CPU tensors), else None (a device tensor is not read)."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.detach() if v.device.type == "cpu" else None


def _alpha(name, v, allow_one):
    """ᾱ must be in (0, 1) ((0, 1] for the previous step); checked on host numbers and CPU
    tensors (ᾱ = 0 would divide by zero into inf coefficients)."""
    check.finite_number(name, v, allow_tensor=True)
    h = _host_values(v)
    if h is not None:
        ok = (h > 0) & ((h < 1) | (h == 1) if allow_one else (h < 1))
        if not (bool(ok.all()) if isinstance(ok, torch.Tensor) else ok):
            bad = h[~ok].flatten()[0].item() if isinstance(h, torch.Tensor) else h
            raise ValueError(f"{name} must be in (0, {'1]' if allow_one else '1)'}, got {bad}")
    return _as64(v)


@_memoize_host_schedules
def ddim_coefs(alpha_prod_t: Scalar, alpha_prod_t_prev: Scalar, eta: Scalar = 0.0,
               prediction_type: str = "epsilon", clip_sample_range: Optional[float] = None,
               use_clipped_model_output: bool = False, guidance_scale: Scalar = 1.0,
               device=None) -> torch.Tensor:
    """DDIM (eq. 12 of Song et al.): prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−σ²)·eps + σ·noise,
    σ = eta·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))."""
    a_t, a_prev = _alpha("alpha_prod_t", alpha_prod_t, False), _alpha("alpha_prod_t_prev", alpha_prod_t_prev, True)
    check.finite_number("eta", eta, minimum=0.0, allow_tensor=True)
    eta = _as64(eta)
    sqrt_a, sqrt_b = _sqrt(a_t), _sqrt(1 - a_t)
    c = _x0_eps_coefs(prediction_type, sqrt_a, sqrt_b)
    if use_clipped_model_output:  # eps re-derived from the (clipped) x0
        c.update(eps_from_x=1 / sqrt_b, eps_from_m=0.0, eps_from_x0=-sqrt_a / sqrt_b)
    var = eta * eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    room = 1 - a_prev - var  # the coefficient of eps is √room
    h_room, h_eta = _host_values(room), _host_values(eta)
    if h_room is not None and not bool((torch.as_tensor(h_room) >= -1e-12).all()):
        raise ValueError(f"eta must keep the DDIM noise variance σ² within 1 − ᾱ_prev (eta <= 1 always does); "
                         f"got eta = {h_eta if not isinstance(h_eta, torch.Tensor) else 'a tensor'} with σ² > 1 − ᾱ_prev")
    std = _sqrt(var)
    room = room.clamp(min=0) if isinstance(room, torch.Tensor) else max(room, 0.0)
    return _pack(device or _device_of(a_t, a_prev, eta), guidance=_guidance(guidance_scale),
                 clip=_clip(clip_sample_range), prev_from_x0=_sqrt(a_prev),
                 prev_from_eps=_sqrt(room), prev_from_noise=std, **c)


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@_memoize_host_schedules
def ddpm_coefs(alpha_prod_t: Scalar, alpha_prod_t_prev: Scalar, variance_type: str = "fixed_small",
               prediction_type: str = "epsilon", clip_sample_range: Optional[float] = None,
               guidance_scale: Scalar = 1.0, device=None) -> torch.Tensor:
    """DDPM ancestral step (eq. 6-7 of Ho et al.): posterior mean from x0 and x_t, plus σ·noise."""
    check.choice("variance_type", variance_type, VARIANCE_TYPES)
    a_t, a_prev = _alpha("alpha_prod_t", alpha_prod_t, False), _alpha("alpha_prod_t_prev", alpha_prod_t_prev, True)
    c = _x0_eps_coefs(prediction_type, _sqrt(a_t), _sqrt(1 - a_t))
    c = {k: v for k, v in c.items() if k.startswith("x0_")}  # the DDPM mean needs no eps
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    if variance_type == "fixed_large":
        std = _sqrt(beta_t)
    else:
        var = (1 - a_prev) / (1 - a_t) * beta_t
        std = _sqrt(var.clamp(min=1e-20) if isinstance(var, torch.Tensor) else max(var, 1e-20))
    return _pack(device or _device_of(a_t, a_prev), guidance=_guidance(guidance_scale),
                 clip=_clip(clip_sample_range),
                 prev_from_x0=_sqrt(a_prev) * beta_t / (1 - a_t),
                 prev_from_x=_sqrt(alpha_t) * (1 - a_prev) / (1 - a_t),
                 prev_from_noise=std, **c)


@_memoize_host_schedules
def flow_euler_coefs(sigma: Scalar, sigma_next: Scalar, stochastic: bool = False,
                     guidance_scale: Scalar = 1.0, device=None) -> torch.Tensor:
    """Flow-matching Euler: prev = x + (σ_next − σ)·v; stochastic: (1−σ_next)·x0 + σ_next·noise."""
    check.finite_number("sigma", sigma, minimum=0.0, allow_tensor=True)
    check.finite_number("sigma_next", sigma_next, minimum=0.0, allow_tensor=True)
    s, s_next = _as64(sigma), _as64(sigma_next)
    c = dict(x0_from_x=1.0, x0_from_m=-s, eps_from_m=1.0)  # x0 = x − σ·v; "eps" slot holds v
    if stochastic:
        c.update(prev_from_x0=1 - s_next, prev_from_noise=s_next)
    else:
        c.update(prev_from_x=1.0, prev_from_eps=s_next - s)
    return _pack(device or _device_of(s, s_next), guidance=_guidance(guidance_scale), **c)


@_memoize_host_schedules
def dpmpp_2m_coefs(sigma_next: Scalar, sigma: Scalar, sigma_prev: Optional[Scalar] = None,
                   prediction_type: str = "epsilon", guidance_scale: Scalar = 1.0,
                   device=None) -> torch.Tensor:
    """DPM-Solver++(2M), midpoint form, with diffusers' σ = √((1−ᾱ)/ᾱ).

    With α = 1/√(σ²+1) and λ = −log σ: e^{−h} = σ_next/σ, so
    prev = (σ_next·α_next)/(σ·α)·x − α_next(e^{−h}−1)·(x0 + (x0 − x0_prev)/(2·r0)),
    r0 = (λ − λ_prev)/h. sigma_prev None = first order; σ_next = 0 is always first order.
    """
    for name, v in (("sigma_next", sigma_next), ("sigma", sigma), ("sigma_prev", sigma_prev)):
        if v is not None:
            check.finite_number(name, v, minimum=0.0, allow_tensor=True)
    if not isinstance(sigma, torch.Tensor) and sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    s_t, s_0 = _as64(sigma_next), _as64(sigma)
    alpha_t, alpha_0 = 1 / _sqrt(s_t * s_t + 1), 1 / _sqrt(s_0 * s_0 + 1)
    c = _x0_eps_coefs(prediction_type, alpha_0, s_0 * alpha_0)
    c = {k: v for k, v in c.items() if k.startswith("x0_")}
    phi = alpha_t * (s_t / s_0 - 1)  # α_t(e^{−h} − 1)
    c.update(prev_from_x=(s_t * alpha_t) / (s_0 * alpha_0), prev_from_x0=-phi)
    if sigma_prev is not None:
        h_1, h_0 = _host_values(sigma_prev), _host_values(sigma)
        if h_1 is not None:
            if not bool(torch.as_tensor(h_1 > 0).all()):
                raise ValueError(f"sigma_prev must be > 0 (the previous step's σ; pass None for a first-order "
                                 f"step), got {h_1 if not isinstance(h_1, torch.Tensor) else 'a tensor with σ <= 0'}")
            if h_0 is not None and bool(torch.as_tensor(h_1 == h_0).any()):
                raise ValueError("sigma_prev must differ from sigma (λ_prev = λ makes the second-order ratio "
                                 "r0 divide by zero)")
        s_1 = _as64(sigma_prev)
        if isinstance(s_t, torch.Tensor) or isinstance(s_0, torch.Tensor) or isinstance(s_1, torch.Tensor):
            s_t, s_0, s_1 = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64,
                                                                      device=_device_of(s_t, s_0, s_1))
                                                      for v in (s_t, s_0, s_1)))
            final = s_t <= 0
            h = _log(s_0) - _log(torch.where(final, torch.ones_like(s_t), s_t))
            half_inv_r0 = torch.where(final, torch.zeros_like(h), 0.5 * h / (_log(s_1) - _log(s_0)))
        else:
            half_inv_r0 = 0.0 if s_t <= 0 else 0.5 * (_log(s_0) - _log(s_t)) / (_log(s_1) - _log(s_0))
        c.update(prev_from_x0=-phi * (1 + half_inv_r0), prev_from_prev_x0=phi * half_inv_r0)
    return _pack(device or _device_of(s_t, s_0), guidance=_guidance(guidance_scale), **c)


# ------------------------------------------------------------------ validation
def _check_args(sample, model_output, coefs, model_output_uncond, noise, prev_x0):
    """Every check, each error naming the argument (the eager fast path, _fast_impl, covers
    the common case without coming here)."""
    check.tensor("sample", sample)
    if not isinstance(coefs, torch.Tensor) or coefs.shape != (NUM_COEFS,):
        got = tuple(coefs.shape) if isinstance(coefs, torch.Tensor) else type(coefs).__name__
        raise ValueError(f"coefs must be a tensor of shape ({NUM_COEFS},) (see flashdiff.ddim_coefs), got {got}")
    if not coefs.is_floating_point():
        raise TypeError(f"coefs must be floating, got {coefs.dtype}")
    others = dict(model_output=model_output, model_output_uncond=model_output_uncond,
                  noise=noise, prev_x0=prev_x0)
    for name, t in others.items():
        check.tensor(name, t, optional=name != "model_output")
        check.shape(name, t, sample.shape, " (the shape of sample)")
    check.same_device("sample", sample, coefs=coefs, **others)
    check.same_dtype("sample", sample, **others)


def _kernel_supports(sample, **_):
    if sample.dtype not in check.KERNEL_DTYPES:
        return f"dtype {sample.dtype} is not supported by the kernels (float32, float16, bfloat16)"
    return None


# (backend, override, device, dtype, shape, cfg) -> the implementation chosen for it, recorded
# by _resolve after a call with those passed every check. Its presence is what lets _fast_impl
# skip _check_args and the backend choice. Cleared with the dispatch choices (new table).
_CHOSEN: dict = {}
_dispatch.on_clear.append(_CHOSEN.clear)
_Tensor = torch.Tensor
_COEFS_SHAPE = (NUM_COEFS,)
_is_compiling = torch.compiler.is_compiling  # bound once: the attribute chain costs per call
_grad_enabled = torch.is_grad_enabled


def _resolve(sample, model_output, coefs, model_output_uncond=None, noise=None, prev_x0=None,
             return_x0=False, backend=None):
    _check_args(sample, model_output, coefs, model_output_uncond, noise, prev_x0)
    cfg = model_output_uncond is not None
    choice = _dispatch.choose(backend, sample.device, {"sample": sample, "model_output_uncond": model_output_uncond},
                              key=(sample.device, sample.dtype, sample.shape, cfg))
    if len(_CHOSEN) >= 4096:
        _CHOSEN.clear()
    _CHOSEN[(backend, _backends.get_override(), sample.device, sample.dtype, sample.shape, cfg)] = choice.impl
    return choice


def _fast_impl(sample, model_output, coefs, uncond, noise, prev_x0, backend):
    """The backend impl for the common eager call, or None for the full path. This op runs
    every sampler step and the kernel is ~3 µs at latent sizes, so the common case is checked
    in one pass of metadata reads (never values): every operand a plain tensor shaped, typed,
    placed like sample and contiguous (so already flat), coefs a contiguous fp32 [12] beside
    them, not tracing, and _resolve already validated and chose a backend for (backend,
    device, dtype). Anything else takes the full path, which checks and says what is wrong."""
    if type(sample) is not _Tensor or type(coefs) is not _Tensor or model_output is None:
        return None
    shape, dtype, device = sample.shape, sample.dtype, sample.device
    # _override read directly: get_override() would add a call to every step
    chosen = _CHOSEN.get((backend, _backends._override, device, dtype, shape, uncond is not None))
    if (chosen is None or _is_compiling() or not sample.is_contiguous() or sample.numel() == 0
            or (_grad_enabled() and (sample.requires_grad or model_output.requires_grad
                                     or coefs.requires_grad or (uncond is not None and uncond.requires_grad)
                                     or (noise is not None and noise.requires_grad)
                                     or (prev_x0 is not None and prev_x0.requires_grad)))
            or coefs.dtype is not torch.float32 or coefs.shape != _COEFS_SHAPE
            or coefs.device != device or not coefs.is_contiguous()):
        return None
    for t in (model_output, uncond, noise, prev_x0):
        if t is not None and (type(t) is not _Tensor or t.shape != shape or t.dtype is not dtype
                              or t.device != device or not t.is_contiguous()):
            return None
    return _dispatch.impls[chosen]


# ------------------------------------------------------------------ backends
# Every impl takes operands that share one dense layout (flat arrays) and contiguous fp32
# coefs: the eager fast path passes them as they come, everything else goes through
# _normalized first.
def _reference_fwd(sample, model_output, coefs, uncond, noise, prev_x0, return_x0):
    dt = torch.float64 if sample.dtype == torch.float64 else torch.float32
    prev, x0 = reference.scheduler_update(sample, model_output, coefs, uncond, noise, prev_x0, upcast=dt)
    return prev.to(sample.dtype), x0.to(sample.dtype) if return_x0 else None


def _torch_fwd(sample, model_output, coefs, uncond, noise, prev_x0, return_x0):
    """The eager update expression in the data's dtype (what a pipeline without flashdiff
    runs: ~12 elementwise kernels; the coefficients stay on the device, no host read)."""
    prev, x0 = reference.scheduler_update(sample, model_output, coefs, uncond, noise, prev_x0, upcast=False)
    return prev, x0 if return_x0 else None


def _is_dense(t) -> bool:
    """Whether t's elements fill its storage span without gaps or overlaps, in any dim order
    (contiguous, channels_last, transposed or permuted tensors; not slices or expands)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def empty_output(sample):
    """An uninitialized prev (or x0) in the documented output layout (scheduler_update): the
    strides of sample when it is dense, else contiguous. Shared by the fake and _normalized's
    callers, whose kernels allocate torch.empty_like of the normalized sample (the same)."""
    return torch.empty_like(sample) if _is_dense(sample) else sample.new_empty(sample.shape)


def _normalized(sample, model_output, coefs, uncond, noise, prev_x0):
    """The impls' operands: one shared dense layout, sample's when it is dense (the others are
    copied to it where they differ), else all contiguous copies (latents almost always are
    already contiguous), and contiguous fp32 coefs. So the output layout depends on sample alone."""
    tensors = (sample, model_output, uncond, noise, prev_x0)
    if not all(t is None or t.is_contiguous() for t in tensors):
        if _is_dense(sample):
            strides = sample.stride()
            tensors = tuple(t if t is None or t.stride() == strides else torch.empty_like(sample).copy_(t)
                            for t in tensors)
        else:
            tensors = tuple(None if t is None else t.contiguous() for t in tensors)
    sample, model_output, uncond, noise, prev_x0 = tensors
    if coefs.dtype != torch.float32 or not coefs.is_contiguous():
        coefs = coefs.to(torch.float32).contiguous()
    return sample, model_output, coefs, uncond, noise, prev_x0


def _compiled_fwd(module, sample, model_output, coefs, uncond, noise, prev_x0, return_x0, stream=None):
    prev = new_empty(sample)
    x0 = new_empty(sample) if return_x0 else None
    args = (sample.data_ptr(), model_output.data_ptr(), ptr(uncond), ptr(noise), ptr(prev_x0),
            coefs.data_ptr(), prev.data_ptr(), ptr(x0), sample.numel(), DTYPE_CODE[sample.dtype])
    if stream is None:  # not `*stream`: re-packing every argument per call costs ~0.1 µs
        module.scheduler_update(*args)
    else:
        module.scheduler_update(*args, stream)
    return prev, x0


# Bound once: backends' import already loaded the module (_ext.preload). When it is not
# built this holds None, and the cpu backend is never chosen (backends._device_reason).
_cpu_fwd = functools.partial(_compiled_fwd, _ext.load_cpu()[0])


def _cuda_fwd(sample, *args):
    with torch.cuda.device(sample.device):
        return _compiled_fwd(_ext.load_cuda()[0], sample, *args, stream_of(sample))


def _triton_fwd(sample, model_output, coefs, uncond, noise, prev_x0, return_x0):
    return _ext.load_triton()[0].scheduler.scheduler_update(sample, model_output, coefs, uncond, noise,
                                                            prev_x0, return_x0)


_dispatch.register("reference", _reference_fwd)
_dispatch.register("torch", _torch_fwd)
_dispatch.register("cpu", _cpu_fwd, _kernel_supports)
_dispatch.register("cuda", _cuda_fwd, _kernel_supports)
_dispatch.register("triton", _triton_fwd, _kernel_supports)
register_op(_dispatch, _resolve)


@torch.library.custom_op("flashdiff::scheduler_update", mutates_args=())
def _scheduler_update_op(sample: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor,
                         model_output_uncond: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                         prev_x0: Optional[torch.Tensor], return_x0: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = _normalized(sample, model_output, coefs, model_output_uncond, noise, prev_x0)
    prev, x0 = _dispatch.impls[backend](*args, return_x0)
    return prev, (x0 if x0 is not None else sample.new_empty((0,)))


@_scheduler_update_op.register_fake
def _(sample, model_output, coefs, model_output_uncond, noise, prev_x0, return_x0, backend):
    return empty_output(sample), (empty_output(sample) if return_x0 else sample.new_empty((0,)))


_GRAD_INPUTS = ("sample", "model_output", "coefs", "model_output_uncond", "noise", "prev_x0")


def _setup_context(ctx, inputs, output):
    sample, model_output, coefs, uncond, noise, prev_x0, return_x0, backend = inputs
    ctx.save_for_backward(sample, model_output, coefs, uncond, noise, prev_x0)
    ctx.return_x0 = return_x0


def _backward(ctx, dprev, dx0):
    """The update is affine in every tensor operand (piecewise, through the clip): the
    gradient is that of the fp32 reference, recomputed here (no kernel of its own: training
    through a sampler step is rare, and the recompute costs one forward)."""
    saved = ctx.saved_tensors
    leaves = [None if t is None else t.detach().requires_grad_(ctx.needs_input_grad[i])
              for i, t in enumerate(saved)]
    with torch.enable_grad():
        prev, x0 = reference.scheduler_update(*leaves, upcast=torch.float32)
        outs, grads_out = [prev], [dprev.to(prev.dtype)]
        if ctx.return_x0 and dx0 is not None and dx0.numel():
            outs.append(x0)
            grads_out.append(dx0.to(x0.dtype))
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True)) if wanted else iter(())
    grads = []
    for t, orig in zip(leaves, saved):
        g = next(got) if t is not None and t.requires_grad else None
        grads.append(None if g is None else g.to(orig.dtype))
    return (*grads, None, None)


torch.library.register_autograd("flashdiff::scheduler_update", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def scheduler_update(sample: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor,
                     model_output_uncond: Optional[torch.Tensor] = None,
                     noise: Optional[torch.Tensor] = None, prev_x0: Optional[torch.Tensor] = None,
                     return_x0: bool = False, backend: Optional[str] = None):
    """The generic fused sampler update (module docstring). coefs: [12] tensor on the data's
    device, from one of the `*_coefs` builders (or a row of a precomputed [T, 12] table).
    Returns prev_sample, or (prev_sample, pred_x0) when return_x0. Differentiable in every
    tensor operand (coefs included): the backward is the fp32 reference's gradient.

    Output layout, a function of sample's strides alone, the same on every backend and in the
    fake (torch.compile): sample's strides when sample is dense (contiguous, channels_last,
    transposed or permuted; other operands laid out differently are copied to it first), else
    contiguous (a sliced or expanded sample; every operand is then copied to contiguous)."""
    impl = _fast_impl(sample, model_output, coefs, model_output_uncond, noise, prev_x0, backend)
    if impl is not None:
        prev, x0 = impl(sample, model_output, coefs, model_output_uncond, noise, prev_x0, return_x0)
        return (prev, x0) if return_x0 else prev
    choice = _resolve(sample, model_output, coefs, model_output_uncond, noise, prev_x0, return_x0, backend)
    if sample.numel() == 0:
        prev = empty_output(sample)
        return (prev, empty_output(sample)) if return_x0 else prev
    if use_custom_op(sample, model_output, coefs, model_output_uncond, noise, prev_x0):
        prev, x0 = _scheduler_update_op(sample, model_output, coefs, model_output_uncond, noise,
                                        prev_x0, return_x0, choice.impl)
    else:
        args = _normalized(sample, model_output, coefs, model_output_uncond, noise, prev_x0)
        prev, x0 = _dispatch.impls[choice.impl](*args, return_x0)
    return (prev, x0) if return_x0 else prev


def _needs_noise(name, value, noise):
    if noise is None and not isinstance(value, torch.Tensor) and value > 0:
        raise ValueError(f"{name} = {value} > 0 adds noise: pass noise (e.g. torch.randn_like(sample))")


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=0.0, noise=None,
              prediction_type="epsilon", clip_sample_range=None, use_clipped_model_output=False,
              model_output_uncond=None, guidance_scale=1.0, return_x0=False, backend=None):
    """One DDIM step, fused: x_{t−1} from x_t. See reference.ddim_step for the math.

    alpha_prod_t / alpha_prod_t_prev: ᾱ at this and the previous timestep (floats or 0-d
    tensors on the device). model_output_uncond + guidance_scale fuse classifier-free guidance
    (model_output is then the conditional output). eta > 0 needs noise.
    """
    coefs = ddim_coefs(alpha_prod_t, alpha_prod_t_prev, eta, prediction_type, clip_sample_range,
                       use_clipped_model_output, guidance_scale, device=sample.device)
    _needs_noise("eta", eta, noise)  # after ddim_coefs, whose (memoized) checks say what eta may be
    return scheduler_update(sample, model_output, coefs, model_output_uncond, noise, None, return_x0, backend)


def ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None,
              variance_type="fixed_small", prediction_type="epsilon", clip_sample_range=None,
              model_output_uncond=None, guidance_scale=1.0, return_x0=False, backend=None):
    """One DDPM ancestral step, fused. noise=None adds no noise (the last step, t = 0)."""
    coefs = ddpm_coefs(alpha_prod_t, alpha_prod_t_prev, variance_type, prediction_type,
                       clip_sample_range, guidance_scale, device=sample.device)
    return scheduler_update(sample, model_output, coefs, model_output_uncond, noise, None, return_x0, backend)


def flow_euler_step(model_output, sample, sigma, sigma_next, noise=None, model_output_uncond=None,
                    guidance_scale=1.0, return_x0=False, backend=None):
    """One flow-matching Euler step, fused (model_output = velocity). With noise: the
    stochastic variant (1 − σ_next)·x0 + σ_next·noise."""
    coefs = flow_euler_coefs(sigma, sigma_next, noise is not None, guidance_scale, device=sample.device)
    return scheduler_update(sample, model_output, coefs, model_output_uncond, noise, None, return_x0, backend)


def dpmpp_2m_step(model_output, sample, sigma_next, sigma, sigma_prev=None, prev_x0=None,
                  prediction_type="epsilon", model_output_uncond=None, guidance_scale=1.0,
                  return_x0=True, backend=None):
    """One DPM-Solver++(2M) step, fused. prev_x0: the x0 returned by the previous step (None
    for the first step → first order). Returns (prev_sample, x0) by default: x0 feeds the next step."""
    if (sigma_prev is None) != (prev_x0 is None):
        raise ValueError("sigma_prev and prev_x0 go together: pass both (second order) or neither (first order)")
    coefs = dpmpp_2m_coefs(sigma_next, sigma, sigma_prev, prediction_type, guidance_scale, device=sample.device)
    return scheduler_update(sample, model_output, coefs, model_output_uncond, None, prev_x0, return_x0, backend)
