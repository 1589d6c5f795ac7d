"""Attention, FlashAttention-2 style: softmax(q kᵀ · scale, key-padding mask) v, and its gradient.

Vertical slice: forward kernel, backward kernels (preprocess, dk/dv, dq), launchers.
Validation, dispatch and autograd live in `flashdiff.ops`; the math is defined by
`flashdiff.reference.attention`.

Numerics
  * Scores and the online softmax run in fp32. `scale · log2(e)` is folded into one multiply so
    the kernel uses exp2 (one MUFU op) instead of exp.
  * fp16 / bf16 inputs: tensor-core dots with fp32 accumulation; P is rounded to the input dtype
    before P·V (as FlashAttention does).
  * fp32 inputs: dots use input_precision="ieee" (true fp32, **no tf32**), so fp32 results meet
    the fp32 tolerance of DESIGN.md. It is slow (no tensor cores); fp32 attention is for checks.
  * Under the interpreter, bf16 dot operands are upcast to fp32 (DOT_F32; TOOLCHAIN.md: the
    interpreter's bf16 `tl.dot` is broken). Compiled kernels never set that flag.
  * A query row whose keys are all masked out returns 0 (l == 0 guard) and lse = +inf
    (FlashAttention's convention), so that exp(s − lse) = 0 in the backward: its gradients are 0.
  * int64 batch/head/sequence offsets: fused-qkv strides times long sequences can pass 2^31.

Layout: q [B, H, Sq, D], k/v [B, H, Skv, D] with arbitrary strides (e.g. views of a fused qkv
[B, S, 3, H, D]); all four strides are passed, nothing is copied. head_dim 16..256; a head_dim
that is not a power of two (40, 72, 80, 160) uses the next power-of-two BLOCK_D with masked
loads (no padding copies). Outputs are allocated here, contiguous: o [B, H, Sq, D] in q's
dtype, lse fp32 [B, H, Sq] (natural log).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, configs, dot_upcast

__all__ = ["attention_fwd", "attention_bwd"]

_LOG2E = 1.4426950408889634


# ================================================================ tile helpers (inlined)
@triton.jit
def _tile_ptrs(PTR, off_b, off_h, offs_s, offs_d, stride_b, stride_h, stride_s, stride_d):
    """Pointers to rows offs_s × columns offs_d of one (batch, head) of a [B, H, S, D] tensor.
    int64 row offsets: fused-qkv strides times long sequences can pass 2^31."""
    return (PTR + off_b * stride_b + off_h * stride_h
            + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d)


@triton.jit
def _load_operand(ptrs, mask, DOT_F32: tl.constexpr):
    """Masked load of a dot operand tile (0 outside the mask); fp32 under DOT_F32."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _key_keep(MASK_ROW, offs_n, n_valid, stride_mn, HAS_MASK: tl.constexpr):
    """Keys a query may attend to: in range and, with a key-padding mask, not padded.
    HAS_MASK reads BLOCK_N bytes of the mask row; out-of-range keys load as 0, so they drop too."""
    keep = n_valid
    if HAS_MASK:
        keep = tl.load(MASK_ROW + offs_n * stride_mn, mask=n_valid, other=0) != 0
    return keep


@triton.jit
def _load_lse_delta(LSE, DELTA, row, start_m, offs_m, m_valid):
    """lse (converted to the log2 domain) and delta of query rows start_m + offs_m of the
    (batch, head) whose rows begin at row: 8 B per row. Out-of-range rows get lse = +inf: P = 0."""
    lse = tl.load(LSE + row + start_m + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + start_m + offs_m, mask=m_valid, other=0.0)
    return lse, delta


@triton.jit
def _recompute_p(a, b, lse, keep, qk_scale, PRECISION: tl.constexpr):
    """Backward: P = exp2(a·bᵀ·qk_scale − lse) recomputed for one tile, 0 at dropped keys.
    The caller picks the orientation: (q, k) with lse[:, None], keep[None, :] gives P [M, N];
    (k, q) with lse[None, :], keep[:, None] gives Pᵀ [N, M]."""
    p = tl.exp2(tl.dot(a, tl.trans(b), input_precision=PRECISION) * qk_scale - lse)
    return tl.where(keep, p, 0.0)


# ================================================================ forward kernel
@triton.heuristics({"MASK_N": lambda args: args["Skv"] % args["BLOCK_N"] != 0})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, MASK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mn,
    H, Sq, Skv, D,
    qk_scale,                      # scale · log2(e): scores in the log2 domain
    HAS_MASK: tl.constexpr,        # key-padding mask [B, Skv], nonzero = attend
    DOT_F32: tl.constexpr,         # upcast dot operands (interpreter + bf16 only)
    PRECISION: tl.constexpr,       # "ieee" for fp32 operands (no tf32); no effect on fp16/bf16
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,          # Skv is not a multiple of BLOCK_N: mask the last key block
):
    """One program: BLOCK_M queries of one (batch, head) against all Skv keys.

    Traffic: reads Q once (Sq·D), K and V once per query block (2·Skv·D·⌈Sq/BLOCK_M⌉), writes
    O (Sq·D) and lse (4 B per row). FLOPs: 4·Sq·Skv·D. With BLOCK_M ≥ 64 the K/V rereads
    (mostly L2 hits) leave it compute-bound: the roofline is the tensor-core peak.
    """
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Sq
    d_valid = offs_d < D                     # BLOCK_D = next power of two ≥ D: mask the tail

    q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_qs, stride_qd)
    k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_ks, stride_kd)
    v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vs, stride_vd)

    # read BLOCK_M·D elements of Q once; they stay in registers for the whole key loop
    q = _load_operand(q_ptrs, m_valid[:, None] & d_valid[None, :], DOT_F32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start_n in range(0, Skv, BLOCK_N):
        n_valid = (start_n + offs_n) < Skv
        nd_mask = n_valid[:, None] & d_valid[None, :]
        # read 2·BLOCK_N·D elements (K and V tiles)
        k = _load_operand(k_ptrs, nd_mask, DOT_F32)
        v = _load_operand(v_ptrs, nd_mask, DOT_F32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK or MASK_N:
            # padded (HAS_MASK: BLOCK_N bytes of the mask read) and out-of-range keys get -inf
            keep = _key_keep(MASK + off_b * stride_mb, start_n + offs_n, n_valid, stride_mn, HAS_MASK)
            qk = tl.where(keep[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # every key so far masked: subtract 0 instead of -inf (exp2(-inf - -inf) would be NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    # l == 0: the row attended to nothing -> output 0, lse = +inf (backward then gives 0)
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = _tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_os, 1)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    tl.store(LSE + (off_b * H + off_h) * Sq + offs_m, lse, mask=m_valid)


# ================================================================ backward kernels
@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    H, Sq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = Σ_d dO·O (fp32). Reads 2·Sq·D elements, writes 4 B per row: memory-bound."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(_tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od),
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_dos, stride_dod),
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (off_b * H + off_h) * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_mb, stride_mn,
    H, Sq, Skv, D,
    qk_scale, scale,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N keys of one (batch, head), looping over all queries.

    dV = Pᵀ dO,  dK = scale · dSᵀ Q,  dS = P ∘ (dO Vᵀ − delta),  P = exp(s·scale − lse).
    Traffic: K, V read once; Q, dO (+lse, delta) read once per key block; dK, dV written once.
    FLOPs: 8·Sq·Skv·D (recomputes QKᵀ): compute-bound like the forward.
    """
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Skv
    d_valid = offs_d < D
    nd_mask = n_valid[:, None] & d_valid[None, :]

    k = _load_operand(_tile_ptrs(K, off_b, off_h, offs_n, offs_d,
                                 stride_kb, stride_kh, stride_ks, stride_kd), nd_mask, DOT_F32)
    v = _load_operand(_tile_ptrs(V, off_b, off_h, offs_n, offs_d,
                                 stride_vb, stride_vh, stride_vs, stride_vd), nd_mask, DOT_F32)
    keep = _key_keep(MASK + off_b * stride_mb, offs_n, n_valid, stride_mn, HAS_MASK)

    q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_qs, stride_qd)
    do_ptrs = _tile_ptrs(DO, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_dos, stride_dod)
    row = (off_b * H + off_h) * Sq

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Sq, BLOCK_M):
        m_valid = (start_m + offs_m) < Sq
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = _load_operand(q_ptrs, md_mask, DOT_F32)
        do = _load_operand(do_ptrs, md_mask, DOT_F32)
        lse, delta = _load_lse_delta(LSE, DELTA, row, start_m, offs_m, m_valid)
        pT = _recompute_p(k, q, lse[None, :], keep[:, None], qk_scale, PRECISION)  # [BLOCK_N, BLOCK_M]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos

    dk = dk * scale
    tl.store(_tile_ptrs(DK, off_b, off_h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dks, 1),
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(_tile_ptrs(DV, off_b, off_h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvs, 1),
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs,
    stride_mb, stride_mn,
    H, Sq, Skv, D,
    qk_scale, scale,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dQ = scale · dS K for BLOCK_M queries, looping over all keys (no atomics,
    deterministic). Traffic: Q, dO read once; K, V once per query block. FLOPs 6·Sq·Skv·D."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Sq
    d_valid = offs_d < D
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = _load_operand(_tile_ptrs(Q, off_b, off_h, offs_m, offs_d,
                                 stride_qb, stride_qh, stride_qs, stride_qd), md_mask, DOT_F32)
    do = _load_operand(_tile_ptrs(DO, off_b, off_h, offs_m, offs_d,
                                  stride_dob, stride_doh, stride_dos, stride_dod), md_mask, DOT_F32)
    lse, delta = _load_lse_delta(LSE, DELTA, (off_b * H + off_h) * Sq, 0, offs_m, m_valid)

    k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_ks, stride_kd)
    v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vs, stride_vd)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Skv, BLOCK_N):
        n_valid = (start_n + offs_n) < Skv
        nd_mask = n_valid[:, None] & d_valid[None, :]
        k = _load_operand(k_ptrs, nd_mask, DOT_F32)
        v = _load_operand(v_ptrs, nd_mask, DOT_F32)
        keep = _key_keep(MASK + off_b * stride_mb, start_n + offs_n, n_valid, stride_mn, HAS_MASK)
        p = _recompute_p(q, k, lse[:, None], keep[None, :], qk_scale, PRECISION)  # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    dq = dq * scale
    tl.store(_tile_ptrs(DQ, off_b, off_h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqs, 1),
             dq.to(DQ.dtype.element_ty), mask=md_mask)


# ================================================================ configs
# Tiers by the bytes of one row of a head (BLOCK_D · element size): shared memory and registers
# scale with it. First config of each list = the one used when autotuning is off.
def _tier(block_d: int, elsize: int) -> int:
    row = block_d * elsize
    return 0 if row <= 128 else 1 if row <= 256 else 2 if row <= 512 else 3


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


_FWD_CONFIGS = {
    0: [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
    1: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3)],
    2: [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2)],
    3: [_cfg(32, 32, 4, 1), _cfg(64, 32, 8, 1)],
}
_DKDV_CONFIGS = {
    0: [_cfg(32, 128, 4, 3), _cfg(64, 64, 4, 3)],
    1: [_cfg(32, 64, 4, 3), _cfg(32, 128, 8, 3)],
    2: [_cfg(32, 32, 4, 2), _cfg(16, 64, 8, 2)],
    3: [_cfg(16, 32, 4, 1), _cfg(32, 32, 8, 1)],
}
_DQ_CONFIGS = {
    0: [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3)],
    1: [_cfg(64, 32, 4, 3), _cfg(128, 32, 8, 3)],
    2: [_cfg(32, 32, 4, 2), _cfg(64, 32, 8, 2)],
    3: [_cfg(16, 32, 4, 1), _cfg(32, 32, 8, 1)],
}
_INTERPRET_CONFIG = [_cfg(32, 32, 4, 1)]  # one config: autotuning under the interpreter is slow

_tuned = {}


def _kernel(name, jit_fn, table, tier):
    """The autotuned kernel for (op, tier); the autotune key adds (Sq, Skv) (+ dtypes)."""
    key = (name, tier)
    if key not in _tuned:
        cfgs = _INTERPRET_CONFIG if INTERPRET else configs(table[tier])
        _tuned[key] = triton.autotune(configs=cfgs, key=["Sq", "Skv"])(jit_fn)
    return _tuned[key]


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands: "ieee" (no tf32: DESIGN.md's fp32 tolerance). fp16/bf16 operands: "tf32",
    triton's default, which only affects fp32 operands (spelled out rather than None: a
    constexpr None is not `is None` inside tl.dot)."""
    return "ieee" if (dtype == torch.float32 or dot_upcast(dtype)) else "tf32"


def _mask_args(key_padding_mask, dummy):
    if key_padding_mask is None:
        return dummy, 0, 0, False
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes; avoids i1 pointers
    return m, m.stride(0), m.stride(1), True


# ================================================================ launchers
def attention_fwd(q, k, v, key_padding_mask=None, scale=None):
    """o = softmax(q kᵀ · scale) v per (batch, head) → (o [B, H, Sq, D] contiguous, lse fp32 [B, H, Sq]).

    q [B, H, Sq, D], k/v [B, H, Skv, D] in fp16/bf16/fp32, any strides; key_padding_mask bool
    [B, Skv] (True = attend) or None; scale defaults to 1/sqrt(D).
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Skv == 0:  # nothing to attend to: every row is "fully masked"
        return o.zero_(), lse.fill_(float("inf"))
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, lse)
    block_d = _block_d(D)
    kernel = _kernel("fwd", _attention_fwd_kernel, _FWD_CONFIGS, _tier(block_d, q.element_size()))
    grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), H, B)  # noqa: E731
    kernel[grid](
        q, k, v, o, lse, mask,
        *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3], smb, smn,
        H, Sq, Skv, D, scale * _LOG2E,
        HAS_MASK=has_mask, DOT_F32=dot_upcast(q.dtype), PRECISION=_precision(q.dtype),
        BLOCK_D=block_d,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask=None, scale=None):
    """Gradients of attention_fwd → (dq, dk, dv), contiguous, in q's dtype.

    Three launches: delta = rowsum(dO·O) (memory-bound), dK/dV looping over query blocks,
    dQ looping over key blocks (two passes instead of atomics: deterministic).
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Skv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Skv, D), dtype=v.dtype, device=v.device)
    if B * H * D == 0 or Sq == 0 or Skv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(D)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    pre_m = 32 if INTERPRET else max(16, min(128, 8192 // block_d))
    _attention_bwd_preprocess_kernel[(triton.cdiv(Sq, pre_m), H, B)](
        o, do, delta, *o.stride(), *do.stride(), H, Sq, D, BLOCK_M=pre_m, BLOCK_D=block_d,
    )
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, delta)
    tier = _tier(block_d, q.element_size())
    flags = dict(HAS_MASK=has_mask, DOT_F32=dot_upcast(q.dtype), PRECISION=_precision(q.dtype),
                 BLOCK_D=block_d)
    lse = lse.contiguous()
    kernel = _kernel("dkdv", _attention_bwd_dkdv_kernel, _DKDV_CONFIGS, tier)
    kernel[lambda meta: (triton.cdiv(Skv, meta["BLOCK_N"]), H, B)](
        q, k, v, do, lse, delta, dk, dv, mask,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride()[:3], *dv.stride()[:3], smb, smn,
        H, Sq, Skv, D, scale * _LOG2E, scale, **flags,
    )
    kernel = _kernel("dq", _attention_bwd_dq_kernel, _DQ_CONFIGS, tier)
    kernel[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), H, B)](
        q, k, v, do, lse, delta, dq, mask,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3], smb, smn,
        H, Sq, Skv, D, scale * _LOG2E, scale, **flags,
    )
    return dq, dk, dv
