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

Configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel ("fwd", "dkdv", "dq") come from a
table keyed by `config_key`: op, dtype, head-dim bucket (BLOCK_D), mask present or not, and Sq /
Skv bucketed to powers of two (64..16384), so a new sequence length in a known bucket reuses its
config. The table is filled by `flashdiff tune` (stored in the dispatch table, seeded when it
loads; `tuned_configs()` / `load_tuned_configs()`). A key missing from it takes the config of
the nearest tuned key (same op, dtype, head-dim bucket and mask; closest Sq/Skv buckets), else
`default_config`: nothing is timed on a user's call. Timing a key (its candidates compiled and
timed: 5.8-9.7 s per key on a cold Triton cache, measured on an H200) happens only where
`autotune_allowed()`: inside `tuning()` (what `flashdiff tune` and the benchmarks use) or with
FLASHDIFF_AUTOTUNE=1, and never inside CUDA-graph capture or torch.compile tracing;
FLASHDIFF_AUTOTUNE=0 turns it off everywhere. Under the interpreter nothing is timed: "tuning"
records the one small interpreter config.

Layout: q [B, H, Sq, D], k/v [B, H, Skv, D] with arbitrary strides (e.g. views of a fused qkv
[B, S, 3, H, D]); all four strides are passed, nothing is copied. head_dim 16..256; a head_dim
that is not a power of two (40, 72, 80, 160) uses the next power-of-two BLOCK_D with masked
loads (no padding copies). Outputs are allocated here, contiguous: o [B, H, Sq, D] in q's
dtype, lse fp32 [B, H, Sq] (natural log).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime import errors as _triton_errors
from triton.testing import do_bench

from ._utils import INTERPRET, dot_upcast

__all__ = ["attention_fwd", "attention_bwd", "config_key", "tuned_configs", "load_tuned_configs",
           "default_config", "autotune_allowed", "tuning"]

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


# ================================================================ configs and tuning
# A config is a plain dict {BLOCK_M, BLOCK_N, num_warps, num_stages}: JSON-serialisable as it
# is, and `**config` is exactly the launch keywords.
_CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _cfg(bm, bn, w, s):
    return dict(zip(_CONFIG_FIELDS, (bm, bn, w, s)))


# Tiers by the bytes of one row of a head (BLOCK_D · element size): shared memory and registers
# scale with it. fp16/bf16 hd ≤ 64 → tier 0, hd 128 → 1, hd 256 → 2; fp32 one tier higher.
# The first config of each list is the heuristic default (used without timing); the lists are
# short so that tuning one key costs well under a second of device time. For fp16/bf16 the
# defaults compile for sm_90 without register spills, and no fwd candidate of hd ≤ 128 uses
# num_warps=8 with BLOCK_M·BLOCK_N < 128·128, which Triton's fused-attention tutorial prunes
# as never winning. (At hd 128, 128 × 64 with 4 warps spills 376 B per thread in an offline
# sm_90 compile with Triton 3.9; 128 × 32 uses 254 registers and no stack.)
_CANDIDATES = {
    "fwd": {
        0: [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
        1: [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 2), _cfg(128, 128, 8, 2)],
        2: [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2)],
        3: [_cfg(32, 32, 4, 1), _cfg(64, 32, 8, 1)],
    },
    "dkdv": {
        0: [_cfg(64, 64, 4, 3), _cfg(32, 128, 4, 3)],
        1: [_cfg(32, 64, 4, 3), _cfg(32, 128, 8, 3)],
        2: [_cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2)],
        3: [_cfg(16, 32, 4, 1), _cfg(32, 32, 8, 1)],
    },
    "dq": {
        0: [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3)],
        1: [_cfg(64, 32, 4, 3), _cfg(128, 32, 8, 3)],
        2: [_cfg(32, 32, 4, 2), _cfg(64, 32, 8, 2)],
        3: [_cfg(16, 32, 4, 1), _cfg(32, 32, 8, 1)],
    },
}
_INTERPRET_CONFIG = _cfg(32, 32, 4, 1)  # small blocks keep the interpreter's tests quick

# Sequence lengths are bucketed to the next power of two within these bounds, so a new length
# in a known bucket reuses its config (no run-time re-tuning as resolutions change).
_SEQ_BUCKET_MIN, _SEQ_BUCKET_MAX = 64, 16384

_TABLE: dict = {}  # config key -> config: tuned here or loaded by load_tuned_configs


def _tier(block_d: int, dtype: torch.dtype) -> int:
    row = block_d * dtype.itemsize
    return 0 if row <= 128 else 1 if row <= 256 else 2 if row <= 512 else 3


def _seq_bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(n), _SEQ_BUCKET_MIN), _SEQ_BUCKET_MAX)


def _key(op: str, dtype: torch.dtype, block_d: int, has_mask: bool, sq: int, skv: int) -> str:
    """The config key, e.g. "fwd:bfloat16:d128:mask:q4096:kv128" (head dim as its BLOCK_D)."""
    return (f"{op}:{str(dtype).rpartition('.')[2]}:d{block_d}:{'mask' if has_mask else 'nomask'}"
            f":q{_seq_bucket(sq)}:kv{_seq_bucket(skv)}")


def config_key(q: torch.Tensor, k: torch.Tensor, key_padding_mask=None, op: str = "fwd") -> str:
    """The key under which the config of one attention kernel for these inputs is looked up:
    op ("fwd", "dkdv" or "dq"), dtype, head-dim bucket (BLOCK_D), mask present or not, and
    the Sq and Skv buckets."""
    if op not in _CANDIDATES:
        raise ValueError(f"op must be one of {sorted(_CANDIDATES)}, got {op!r}")
    return _key(op, q.dtype, _block_d(q.shape[-1]), key_padding_mask is not None,
                q.shape[2], k.shape[2])


def tuned_configs() -> dict:
    """The configs tuned or loaded so far: {config key: {BLOCK_M, BLOCK_N, num_warps,
    num_stages}}, a copy, JSON-serialisable (the dispatch table `flashdiff tune` writes).
    Heuristic defaults are never recorded here."""
    return {key: dict(cfg) for key, cfg in _TABLE.items()}


def load_tuned_configs(d: dict, replace: bool = False) -> None:
    """Seed the table with {config key: config} (e.g. a shipped or cached tuned_configs()
    output); these keys are never tuned at run time. Merges unless replace=True. Every entry is
    checked first, so a bad table raises ValueError and changes nothing."""
    checked = {}
    for key, cfg in d.items():
        if not isinstance(key, str) or not isinstance(cfg, dict) or set(cfg) != set(_CONFIG_FIELDS):
            raise ValueError(f"tuned config {key!r}: expected a str key and a dict with exactly "
                             f"{_CONFIG_FIELDS}, got {cfg!r}")
        vals = {f: cfg[f] for f in _CONFIG_FIELDS}
        # tl.dot needs blocks of at least 16; blocks and warps must be powers of two
        if not (all(isinstance(v, int) and not isinstance(v, bool) for v in vals.values())
                and all(v >= 16 and v & (v - 1) == 0 for v in (vals["BLOCK_M"], vals["BLOCK_N"]))
                and vals["num_warps"] >= 1 and vals["num_warps"] & (vals["num_warps"] - 1) == 0
                and vals["num_stages"] >= 1):
            raise ValueError(f"tuned config {key!r}: invalid values {cfg!r}")
        checked[key] = vals
    if replace:
        _TABLE.clear()
    _TABLE.update(checked)
    _TABLE_WRITES[0] += 1


def default_config(op: str, dtype: torch.dtype, head_dim: int) -> dict:
    """The heuristic config (no timing) of op ("fwd", "dkdv", "dq") for a key without a tuned
    one: the first candidate of the tier of (head-dim bucket, dtype); under the interpreter
    one small config."""
    if INTERPRET:
        return dict(_INTERPRET_CONFIG)
    return dict(_CANDIDATES[op][_tier(_block_d(head_dim), dtype)][0])


def _candidates(op: str, dtype: torch.dtype, head_dim: int) -> list:
    """The configs timed when a key is tuned (only the default under the interpreter)."""
    if INTERPRET:
        return [default_config(op, dtype, head_dim)]
    return [dict(c) for c in _CANDIDATES[op][_tier(_block_d(head_dim), dtype)]]


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # CPU-only torch: the CUDA stub raises, and nothing can be captured
        return False


_TUNING: list = []  # the timers of the open tuning() contexts, innermost last


@contextlib.contextmanager
def tuning(timer=None):
    """Within this context a key without a config is tuned on its first launch (flashdiff tune
    and the benchmarks time kernels here; a user's call never waits for tuning). timer(launch)
    -> milliseconds replaces the timing (None: _time_config); flashdiff tune's precompile passes
    one that launches once, which compiles each candidate without timing it."""
    _TUNING.append(timer)
    try:
        yield
    finally:
        _TUNING.pop()


def autotune_allowed() -> bool:
    """Whether a key without a config may be tuned now: inside tuning() or with
    FLASHDIFF_AUTOTUNE=1, unless FLASHDIFF_AUTOTUNE=0; never during CUDA-graph capture (timing
    synchronises, which capture forbids) nor while torch.compile traces."""
    env = os.environ.get("FLASHDIFF_AUTOTUNE")
    wanted = env == "1" or (env != "0" and bool(_TUNING))
    return wanted and not torch.compiler.is_compiling() and not _capturing()


_NEAREST: dict = {}  # key -> nearest tuned config (memo; dropped whenever _TABLE changes)
_NEAREST_STAMP: list = [None]
_TABLE_WRITES = [0]  # bumped by every write through this module (a replace keeps id and size)


def _nearest_tuned(key: str):
    """The config of the tuned key nearest to `key`: same op, dtype, head-dim bucket and mask,
    the smallest sum of log2 distances of the Sq and Skv buckets (ties: the larger buckets,
    whose tiles are the safer guess for long sequences); None when no such key is tuned."""
    stamp = (id(_TABLE), len(_TABLE), _TABLE_WRITES[0])
    if _NEAREST_STAMP[0] != stamp:
        _NEAREST.clear()
        _NEAREST_STAMP[0] = stamp
    if key in _NEAREST:
        return _NEAREST[key]
    prefix, q, kv = key.rsplit(":", 2)
    lq, lkv = math.log2(int(q[1:])), math.log2(int(kv[2:]))
    best, best_rank = None, None
    for other, cfg in _TABLE.items():
        o_prefix, o_q, o_kv = other.rsplit(":", 2)
        if o_prefix != prefix:
            continue
        oq, okv = math.log2(int(o_q[1:])), math.log2(int(o_kv[2:]))
        rank = (abs(oq - lq) + abs(okv - lkv), -(oq + okv))
        if best_rank is None or rank < best_rank:
            best, best_rank = cfg, rank
    _NEAREST[key] = best
    return best


# Failures that mean "this config does not fit this GPU", as Triton's own autotuner skips them.
_CONFIG_ERRORS = tuple(getattr(_triton_errors, name) for name in ("OutOfResources", "PTXASError")
                       if hasattr(_triton_errors, name))


def _time_config(launch) -> float:
    """Median milliseconds of launch() (compiling it first). Under the interpreter timings mean
    nothing: 0.0 without running it."""
    if INTERPRET:
        return 0.0
    try:
        return do_bench(launch, warmup=10, rep=40, return_mode="median")
    except _CONFIG_ERRORS:
        return float("inf")


def _launch(kernel, grid, args, meta, cfg) -> None:
    """One launch of kernel with config cfg; grid(cfg) gives the launch grid. args is the
    argument tuple, or a function of cfg returning it (tensor descriptors carry block shapes)."""
    kernel[grid(cfg)](*(args(cfg) if callable(args) else args), **meta, **cfg)


def _run(op, kernel, grid, args, meta, dtype, sq, skv) -> None:
    """Launch op's kernel with the config of its key: the table's; else tune the key once when
    allowed (recorded); else the nearest tuned key's config, else the heuristic default (neither
    recorded). meta holds the constexpr flags, BLOCK_D and HAS_MASK among them."""
    block_d = meta["BLOCK_D"]
    key = _key(op, dtype, block_d, meta["HAS_MASK"], sq, skv)
    cfg = _TABLE.get(key)
    if cfg is None:
        if autotune_allowed():
            cands = _candidates(op, dtype, block_d)
            timer = (_TUNING[-1] if _TUNING else None) or _time_config
            times = [timer(lambda c=c: _launch(kernel, grid, args, meta, c)) for c in cands]
            best = min(range(len(cands)), key=times.__getitem__)
            if math.isinf(times[best]):
                raise RuntimeError(f"attention {key}: no candidate config fits this GPU: {cands}")
            cfg = _TABLE[key] = cands[best]
            _TABLE_WRITES[0] += 1
        else:
            cfg = _nearest_tuned(key) or default_config(op, dtype, block_d)
    _launch(kernel, grid, args, meta, cfg)


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
    _run("fwd", _attention_fwd_kernel, lambda cfg: (triton.cdiv(Sq, cfg["BLOCK_M"]), H, B),
         (q, k, v, o, lse, mask,
          *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3], smb, smn,
          H, Sq, Skv, D, scale * _LOG2E),
         dict(HAS_MASK=has_mask, DOT_F32=dot_upcast(q.dtype), PRECISION=_precision(q.dtype),
              BLOCK_D=block_d),
         q.dtype, Sq, Skv)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask=None, scale=None, dlse=None):
    """Gradients of attention_fwd → (dq, dk, dv), contiguous, in q's dtype.

    Three launches: delta = rowsum(dO·O) (memory-bound), dK/dV looping over query blocks,
    dQ looping over key blocks (two passes instead of atomics: deterministic).
    dlse: fp32 [B, H, Sq], the gradient of lse, or None. d lse_i/d s_ij = P_ij, so it enters as
    dS = P∘(dP − delta + dlse): delta − dlse replaces delta (one 4 B-per-row subtraction).
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
    if dlse is not None:
        delta -= dlse.to(torch.float32).reshape(B, H, Sq)
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, delta)
    flags = dict(HAS_MASK=has_mask, DOT_F32=dot_upcast(q.dtype), PRECISION=_precision(q.dtype),
                 BLOCK_D=block_d)
    lse = lse.contiguous()
    _run("dkdv", _attention_bwd_dkdv_kernel, lambda cfg: (triton.cdiv(Skv, cfg["BLOCK_N"]), H, B),
         (q, k, v, do, lse, delta, dk, dv, mask,
          *q.stride(), *k.stride(), *v.stride(), *do.stride(),
          *dk.stride()[:3], *dv.stride()[:3], smb, smn,
          H, Sq, Skv, D, scale * _LOG2E, scale),
         flags, q.dtype, Sq, Skv)
    _run("dq", _attention_bwd_dq_kernel, lambda cfg: (triton.cdiv(Sq, cfg["BLOCK_M"]), H, B),
         (q, k, v, do, lse, delta, dq, mask,
          *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3], smb, smn,
          H, Sq, Skv, D, scale * _LOG2E, scale),
         flags, q.dtype, Sq, Skv)
    return dq, dk, dv
