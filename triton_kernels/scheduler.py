"""The generic sampler update every family (DDIM, DDPM, flow Euler, DPM-Solver++ 2M) lowers to.

    m    = u + g·(c − u)   if an unconditional output u is given, else c
    x0   = clamp(a_x·x + a_m·m, −clip, clip)
    eps  = e_x·x + e_m·m + e_0·x0
    prev = p_x·x + p_0·x0 + p_e·eps + p_n·noise + p_d·prev_x0

Coefficients: a device tensor of 12 in the order of `flashdiff.reference.SCHED_COEF_NAMES`
(= `SchedCoef` in csrc/include/flashdiff/params.h), read by the kernel, so a step never
synchronizes with the host and a whole sampling loop can be captured in one CUDA graph.
Reference: `flashdiff.reference.scheduler_update`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdiff.reference import SCHED_COEF_NAMES

from ._utils import INTERPRET
from .group_norm import on_tensor_device

__all__ = ["scheduler_update"]

# Indices into the coefficient vector, taken from the one table (no copy to keep in sync).
_IDX = {name: i for i, name in enumerate(SCHED_COEF_NAMES)}
_G = tl.constexpr(_IDX["guidance"])
_AX = tl.constexpr(_IDX["x0_from_x"])
_AM = tl.constexpr(_IDX["x0_from_m"])
_CLIP = tl.constexpr(_IDX["clip"])
_EX = tl.constexpr(_IDX["eps_from_x"])
_EM = tl.constexpr(_IDX["eps_from_m"])
_E0 = tl.constexpr(_IDX["eps_from_x0"])
_PX = tl.constexpr(_IDX["prev_from_x"])
_P0 = tl.constexpr(_IDX["prev_from_x0"])
_PE = tl.constexpr(_IDX["prev_from_eps"])
_PN = tl.constexpr(_IDX["prev_from_noise"])
_PD = tl.constexpr(_IDX["prev_from_prev_x0"])


# ================================================================ kernel
@triton.jit
def _scheduler_update_kernel(
    X, C, U, NOISE, PREV_X0, COEFS, PREV, X0,
    numel,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_PREV_X0: tl.constexpr,
    WRITE_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    """One fused pass over flat, identically strided tensors; math in fp32.

    Traffic per element: reads x, c (+u, +noise, +prev_x0), writes prev (+x0); e.g. DDIM with
    CFG in bf16: 3 reads + 1 write = 8 B. Pure streaming, a few FMAs per element: the roofline
    is HBM bandwidth. The 48 B of coefficients are read once per program (L2 hits).
    """
    pid = tl.program_id(0).to(tl.int64)                 # numel can pass 2^31
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        m = u + tl.load(COEFS + _G) * (m - u)
    x0 = tl.load(COEFS + _AX) * x + tl.load(COEFS + _AM) * m
    clip = tl.load(COEFS + _CLIP)
    # clamp with comparisons, not min/max: a NaN must survive (NaN compares false)
    x0 = tl.where(x0 > clip, clip, tl.where(x0 < -clip, -clip, x0))
    eps = tl.load(COEFS + _EX) * x + tl.load(COEFS + _EM) * m + tl.load(COEFS + _E0) * x0
    prev = tl.load(COEFS + _PX) * x + tl.load(COEFS + _P0) * x0 + tl.load(COEFS + _PE) * eps
    if HAS_NOISE:
        prev += tl.load(COEFS + _PN) * tl.load(NOISE + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PREV_X0:
        prev += tl.load(COEFS + _PD) * tl.load(PREV_X0 + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(PREV + offs, prev.to(PREV.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=mask)


# ================================================================ launcher
_BLOCK = 1024 if INTERPRET else 2048
_NUM_WARPS = 8


@on_tensor_device
def scheduler_update(sample, model_output, coefs, model_output_uncond=None, noise=None,
                     prev_x0=None, return_x0=False):
    """→ (prev_sample, x0 or None), both in sample's dtype and layout.

    All data tensors must be dense with identical strides (validated by flashdiff.ops); they are
    read as flat arrays. coefs: 12 values on the data's device (cast to fp32 here if needed,
    a device-side op, no host synchronization).
    """
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if return_x0 else None
    numel = sample.numel()
    if numel == 0:
        return prev, x0
    if coefs.dtype != torch.float32 or not coefs.is_contiguous():
        coefs = coefs.to(torch.float32).contiguous()
    grid = (triton.cdiv(numel, _BLOCK),)
    _scheduler_update_kernel[grid](
        sample, model_output,
        model_output_uncond if model_output_uncond is not None else sample,
        noise if noise is not None else sample,
        prev_x0 if prev_x0 is not None else sample,
        coefs, prev, x0 if x0 is not None else prev,
        numel,
        HAS_UNCOND=model_output_uncond is not None, HAS_NOISE=noise is not None,
        HAS_PREV_X0=prev_x0 is not None, WRITE_X0=return_x0,
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return prev, x0
