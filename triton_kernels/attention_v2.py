"""Attention forward v2: softmax(q kᵀ · scale, key-padding mask) v with head-dim pieces.

Registered as the dispatch variant "triton:v2" (flashdiff.ops.attention); an explicit
backend="triton" keeps `attention.attention_fwd`, and `flashdiff tune` decides per shape class
which one wins. The backward is `attention.attention_bwd`: lse follows the same convention
(fp32 [B, H, Sq], natural log, +inf for a row whose keys are all masked out).

What differs from `attention._attention_fwd_kernel`
  * Head dim is a constexpr (HEAD_D) and is computed as up to three power-of-two pieces of its
    next multiple of 16 (`head_dim_pieces`): 40 → 32+16 (48), 72 → 64+16 (80), 80 → 64+16,
    96 → 64+32, 160 → 128+32, 64/128/256 one piece. QKᵀ is a chain of tl.dot over the pieces
    into one accumulator; PV keeps one accumulator per piece. v1 pads to the next power of two,
    so at hd 40/72/80/96/160 it spends 60/78/60/33/60 % more MMA work than the head dim needs;
    here at most 15 columns (< one k-step of 16) are padding: 20 % at hd 40, 11 % at 72, 0 at
    80/96/160.
  * The running max is taken on raw scores; each score then costs one FMA, s·c − m·c with
    c = |scale|·log2(e), before exp2 (v1 multiplies every score by c first, then subtracts).
  * K/V loads carry no predicate at all: full key blocks need none; the last block (peeled,
    when Skv is not a multiple of BLOCK_N) re-reads the last key for rows past Skv and drops them
    with -inf scores; the padded piece's columns past HEAD_D are clamped (they meet Q's zero
    columns). The key-padding mask costs BLOCK_N bytes per key block. (A masked K load of the
    padded piece miscompiled on an H200 with Triton 3.6: wrong values and an illegal address.)
  * Tensor descriptors (op "fwd_tma", the dispatch variant "triton:tma"): on sm_90+ the key
    loop's K/V loads become TMA bulk copies (cp.async.bulk.tensor, 4-D box [1, 1, BLOCK_N, P] at
    (b, h, n, column)) pipelined over num_stages with mbarriers, issued by one thread instead of
    every thread computing addresses; Q's load and O's store go through descriptors too (no
    per-element addresses, whatever the row stride). The copy engine zero-fills loads and clips
    stores past Sq/Skv and HEAD_D, so the padded piece needs no clamp and no mask. Host-side
    descriptors: no per-program tensormap writes, no global scratch. Needs 16-byte aligned bases
    and strides (head dims that are multiples of 8 in 16-bit types; `tma_usable`), else the
    pointer path runs in the same call; the pointer path stays for sm_80 as well.
  * A flat 1-D grid, query blocks fastest: programs running together share one (batch, head)'s
    K/V in L2; the grid never passes 2^31 − 1 (split by batch when it would).

Cost: FLOPs 4·B·H·Sq·Skv·Dp (Dp = HEAD_D rounded up to 16). Bytes: Q and O once (2·Sq·D per
head), K and V once per query block (2·Skv·D·⌈Sq/BLOCK_M⌉, mostly L2 hits), lse 4 B per row.
Arithmetic intensity against DRAM is ~BLOCK_M FLOPs per byte (≥ 64), far above an H200's
ridge (~990 dense bf16 TFLOP/s ÷ 4.8 TB/s ≈ 206 FLOP/B counting only compulsory traffic at
Sq ≥ 1k), so the roofline is the tensor-core peak. The second limit is the exp2 per score:
16 MUFU ops/clk/SM against 1024 dense bf16 FMAs/clk/SM, and a score costs 2·Dp FMAs, so at
Dp = 48 MUFU is 1024/(16·96) ≈ 67 % as busy as the tensor cores (at Dp 128: 25 %): small head
dims are bound by exp2 and softmax issue, not by MMA.

Configs (BLOCK_M, BLOCK_N, num_warps, num_stages) come from the table of `attention` (the same
`_TABLE`, tuner and JSON round-trip; keys "fwd_v2:<dtype>:d<Dp>:..." and "fwd_tma:..."), with
this module's candidate lists registered under the op names "fwd_v2" and "fwd_tma".

Warp specialization: not used. With Triton 3.6 (the GPU machines' version) an offline sm_90
compile of this online-softmax loop with `tl.range(..., warp_specialize=True)` fails in the
NVGPUWarpSpecialization pass (an assertion in WSLowerToken.cpp; 2026-12-01, a probe of this loop
with device-side and with host-side descriptors), so the sm_90 overlap comes from TMA + mbarrier
pipelining only.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import attention as _v1
from ._utils import INTERPRET, dot_upcast
from .attention import _cfg, _key, _key_keep, _mask_args, _precision, _run, _tile_ptrs

try:  # host-side tensor descriptors (Triton >= 3.4; the GPU machines have 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - an older Triton: the pointer path only
    TensorDescriptor = None

__all__ = ["attention_fwd_v2", "head_dim_pieces", "config_key_v2", "tma_usable", "OP", "OP_TMA"]

OP = "fwd_v2"      # op name in the shared config table: pointer loads
OP_TMA = "fwd_tma"  # the same kernel through tensor descriptors (its own tuned configs)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MIN_QK_SCALE = 2.0 ** -126  # smallest normal fp32 (see attention_fwd_v2: scale = 0)
_GRID_MAX = 2 ** 31 - 1     # CUDA's limit on gridDim.x
_MAX_BLOCK_N = 128          # largest BLOCK_N of any candidate (bounds the in-tile int32 offsets)


def head_dim_pieces(head_dim: int) -> tuple:
    """(D0, D1, D2): the next multiple of 16 of head_dim as power-of-two pieces, largest first,
    0 for an absent piece. 40 → (32, 16, 0), 160 → (128, 32, 0), 112 → (64, 32, 16).
    Only 240 has four bits set (128+64+32+16); it uses one piece of 256 (6 % padding) rather
    than a fourth accumulator."""
    dp = -(-head_dim // 16) * 16
    bits = [1 << b for b in range(dp.bit_length() - 1, 3, -1) if dp >> b & 1]
    if len(bits) > 3:
        bits = [triton.next_power_of_2(dp)]
    return tuple(bits + [0] * (3 - len(bits)))


# ================================================================ kernel
@triton.jit
def _load_q_piece(Q, desc, off_b, off_h, desc_b, desc_h, m0, offs_m, row_ok,
                  stride_qb, stride_qh, stride_qs, stride_qd,
                  OFF: tl.constexpr, P: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  USE_DESC: tl.constexpr, DOT_F32: tl.constexpr):
    """Load one [BLOCK_M, P] piece (columns OFF..OFF+P) of Q, once per program: rows past Sq and
    columns past HEAD_D (only the last piece has them) read as 0. The zero columns are what make
    the clamped K columns harmless in QKᵀ. Descriptor path: one TMA box, zero-filled by the copy
    engine (no per-element addresses: at hd 40 those cost the pointer path ~90 registers when the
    row stride is not a multiple of 16 elements, offline sm_90 compile)."""
    if USE_DESC:
        t = desc.load([desc_b, desc_h, m0, OFF]).reshape([BLOCK_M, P])
    else:
        ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, OFF + tl.arange(0, P), stride_qb, stride_qh,
                          stride_qs, stride_qd)
        if OFF + P > HEAD_D:
            t = tl.load(ptrs, mask=row_ok[:, None] & ((OFF + tl.arange(0, P)) < HEAD_D)[None, :], other=0.0)
        else:
            t = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _tile_offs(offs_s, OFF: tl.constexpr, P: tl.constexpr, HEAD_D: tl.constexpr, stride_s, stride_d):
    """int32 offsets of rows offs_s × columns OFF..OFF+P within a K/V tile (the launcher keeps
    them below 2^31; the int64 batch/head/block part is a scalar). Columns past HEAD_D are
    clamped to HEAD_D − 1 rather than masked: they meet Q's zero-filled padding in QKᵀ and fill
    O columns that are never stored, so K/V loads carry no predicate (and stay in bounds)."""
    cols = OFF + tl.arange(0, P)
    if OFF + P > HEAD_D:  # only the padded piece: a clamp hides contiguity (no vector loads)
        cols = tl.minimum(cols, HEAD_D - 1)
    return offs_s[:, None] * stride_s + cols[None, :] * stride_d


@triton.jit
def _load_kv(ptrs, desc, off_b, off_h, start_n, OFF: tl.constexpr, P: tl.constexpr,
             BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr, DOT_F32: tl.constexpr):
    """One [BLOCK_N, P] K/V piece, fp32 under DOT_F32. Pointer path: an unmasked load (offsets
    already clamped in range). Descriptor path: one TMA box [1, 1, BLOCK_N, P] at (b, h, start_n,
    OFF); the copy engine zero-fills rows past Skv and columns past HEAD_D, so neither needs a
    clamp or a predicate, and the loop's loads become asynchronous bulk copies."""
    if USE_DESC:
        t = desc.load([off_b, off_h, start_n, OFF]).reshape([BLOCK_N, P])
    else:
        t = tl.load(ptrs)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _kv_offsets(offs_n, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                stride_ks, stride_kd, stride_vs, stride_vd):
    """In-tile offsets of the K and V pieces (absent pieces: placeholders no load reads)."""
    ko0 = _tile_offs(offs_n, 0, D0, HEAD_D, stride_ks, stride_kd)
    vo0 = _tile_offs(offs_n, 0, D0, HEAD_D, stride_vs, stride_vd)
    ko1 = ko0
    vo1 = vo0
    ko2 = ko0
    vo2 = vo0
    if D1 > 0:
        ko1 = _tile_offs(offs_n, D0, D1, HEAD_D, stride_ks, stride_kd)
        vo1 = _tile_offs(offs_n, D0, D1, HEAD_D, stride_vs, stride_vd)
    if D2 > 0:
        ko2 = _tile_offs(offs_n, D0 + D1, D2, HEAD_D, stride_ks, stride_kd)
        vo2 = _tile_offs(offs_n, D0 + D1, D2, HEAD_D, stride_vs, stride_vd)
    return ko0, ko1, ko2, vo0, vo1, vo2


@triton.jit
def _attend_block(q0, q1, q2, acc0, acc1, acc2, m_i, l_i,
                  k_blk, v_blk, ko0, ko1, ko2, vo0, vo1, vo2,
                  KD0, KD1, KD2, VD0, VD1, VD2, off_b, off_h,
                  mask_row, start_n, Skv, stride_mn, qk_scale,
                  HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                  TAIL: tl.constexpr, HAS_MASK: tl.constexpr, NEG_SCALE: tl.constexpr,
                  DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  USE_DESC: tl.constexpr):
    """One key block: s = Σ_pieces q_j k_jᵀ, online softmax, acc_j += p v_j.
    Reads BLOCK_N·Dp elements of K and of V (+ BLOCK_N mask bytes); 4·BLOCK_M·BLOCK_N·Dp FLOPs.
    Pointer path: k_blk/v_blk point at the block's first key row of this (batch, head), ko*/vo*
    are the in-tile offsets. Descriptor path: KD*/VD* and (off_b, off_h, start_n) address it."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Skv  # only read when TAIL or HAS_MASK
    # chained dots: one fp32 [BLOCK_M, BLOCK_N] accumulator over the pieces
    k = _load_kv(k_blk + ko0, KD0, off_b, off_h, start_n, 0, D0, BLOCK_N, USE_DESC, DOT_F32)
    s = tl.dot(q0, tl.trans(k), input_precision=PRECISION)
    if D1 > 0:
        k = _load_kv(k_blk + ko1, KD1, off_b, off_h, start_n, D0, D1, BLOCK_N, USE_DESC, DOT_F32)
        s = tl.dot(q1, tl.trans(k), s, input_precision=PRECISION)
    if D2 > 0:
        k = _load_kv(k_blk + ko2, KD2, off_b, off_h, start_n, D0 + D1, D2, BLOCK_N, USE_DESC, DOT_F32)
        s = tl.dot(q2, tl.trans(k), s, input_precision=PRECISION)
    if NEG_SCALE:  # scale < 0: max(s·scale) = |scale|·max(−s); the launcher passes |scale|
        s = -s
    if TAIL or HAS_MASK:  # the tail's rows past Skv (clamped repeats, or TMA's zeros) dropped here
        keep = _key_keep(mask_row, offs_n, n_ok, stride_mn, HAS_MASK)
        s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if TAIL or HAS_MASK:
        # a row with every key so far masked: subtract 0, not -inf (exp2(-inf + inf) is NaN)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    m_c = m_new * qk_scale
    # one FMA + one MUFU.EX2 per score; tl.fma, not s·c − m: Triton 3.10 turns FP fusion off by default
    p = tl.exp2(tl.fma(s, qk_scale, -m_c[:, None]))
    alpha = tl.exp2(m_i * qk_scale - m_c)      # m_i = -inf (nothing seen yet) gives 0
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(q0.dtype)  # P in the input dtype for the tensor-core PV dot (as FlashAttention)
    v = _load_kv(v_blk + vo0, VD0, off_b, off_h, start_n, 0, D0, BLOCK_N, USE_DESC, DOT_F32)
    acc0 = tl.dot(p, v, acc0 * alpha[:, None], input_precision=PRECISION)
    if D1 > 0:
        v = _load_kv(v_blk + vo1, VD1, off_b, off_h, start_n, D0, D1, BLOCK_N, USE_DESC, DOT_F32)
        acc1 = tl.dot(p, v, acc1 * alpha[:, None], input_precision=PRECISION)
    if D2 > 0:
        v = _load_kv(v_blk + vo2, VD2, off_b, off_h, start_n, D0 + D1, D2, BLOCK_N, USE_DESC, DOT_F32)
        acc2 = tl.dot(p, v, acc2 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, acc2, m_new, l_i


@triton.jit
def _store_piece(O, desc, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, acc, inv_l,
                 OFF: tl.constexpr, P: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 USE_DESC: tl.constexpr, stride_ob, stride_oh, stride_os):
    """Store one [BLOCK_M, P] piece of O = acc / l: rows past Sq and columns past HEAD_D are
    dropped (by the mask, or by TMA's clipping at the descriptor's bounds)."""
    o = (acc * inv_l[:, None]).to(O.dtype.element_ty)
    if USE_DESC:
        desc.store([desc_b, desc_h, m0, OFF], o.reshape([1, 1, BLOCK_M, P]))
    else:
        offs_d = OFF + tl.arange(0, P)
        ptrs = _tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_os, 1)
        tl.store(ptrs, o, mask=m_ok[:, None] & (offs_d < HEAD_D)[None, :])


@triton.heuristics({"TAIL_N": lambda a: a["Skv"] % a["BLOCK_N"] != 0})
@triton.jit
def _attention_fwd_v2_kernel(
    Q, K, V, O, LSE, MASK,
    QD0, QD1, QD2, KD0, KD1, KD2,  # tensor descriptors per head-dim piece (USE_DESC), else None
    VD0, VD1, VD2, OD0, OD1, OD2,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mn,
    H, Sq, Skv,
    qk_scale,                      # |scale| · log2(e) (> 0): scores in the log2 domain
    HEAD_D: tl.constexpr,          # the head dim
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,  # head_dim_pieces (0 = absent)
    BLOCK_D: tl.constexpr,         # D0 + D1 + D2 (the config-table bucket; unused in the body)
    NEG_SCALE: tl.constexpr,       # scale < 0
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,          # Skv % BLOCK_N != 0: one masked tail block after the loop
    USE_DESC: tl.constexpr,        # Q/K/V/O through the tensor descriptors (TMA on sm_90+)
):
    """One program: BLOCK_M queries of one (batch, head) against all Skv keys. Program ids run
    over query blocks fastest, then (batch · H + head)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(Sq, BLOCK_M)
    bh = pid // n_m
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    m0 = (pid % n_m) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Sq
    # descriptor coordinates are int32: off_b < B and off_h < H always fit
    desc_b = off_b.to(tl.int32)
    desc_h = off_h.to(tl.int32)

    # Q: BLOCK_M·Dp elements read once, kept in registers for the whole key loop
    q0 = _load_q_piece(Q, QD0, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, stride_qb, stride_qh,
                       stride_qs, stride_qd, 0, D0, HEAD_D, BLOCK_M, USE_DESC, DOT_F32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    # absent pieces get 16-wide placeholders that no dot reads (dead code after compilation)
    q1 = q0
    q2 = q0
    acc1 = acc0
    acc2 = acc0
    if D1 > 0:
        q1 = _load_q_piece(Q, QD1, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, stride_qb, stride_qh,
                           stride_qs, stride_qd, D0, D1, HEAD_D, BLOCK_M, USE_DESC, DOT_F32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    if D2 > 0:
        q2 = _load_q_piece(Q, QD2, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, stride_qb, stride_qh,
                           stride_qs, stride_qd, D0 + D1, D2, HEAD_D, BLOCK_M, USE_DESC, DOT_F32)
        acc2 = tl.zeros([BLOCK_M, D2], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of raw scores
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2

    offs_n = tl.arange(0, BLOCK_N)
    if USE_DESC:  # the descriptors address K/V; no in-tile offsets (placeholders no load reads)
        ko0 = 0
        ko1 = 0
        ko2 = 0
        vo0 = 0
        vo1 = 0
        vo2 = 0
    else:
        ko0, ko1, ko2, vo0, vo1, vo2 = _kv_offsets(offs_n, HEAD_D, D0, D1, D2, stride_ks, stride_kd,
                                                   stride_vs, stride_vd)
    # scalar block pointers (int64 batch/head part), advanced by BLOCK_N·stride per block (< 2^31)
    k_blk = K + off_b * stride_kb + off_h * stride_kh
    v_blk = V + off_b * stride_vb + off_h * stride_vh
    mask_row = MASK + off_b * stride_mb

    n_full = (Skv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full blocks: no bounds masks
        acc0, acc1, acc2, m_i, l_i = _attend_block(
            q0, q1, q2, acc0, acc1, acc2, m_i, l_i, k_blk, v_blk,
            ko0, ko1, ko2, vo0, vo1, vo2, KD0, KD1, KD2, VD0, VD1, VD2, desc_b, desc_h,
            mask_row, start_n, Skv, stride_mn, qk_scale,
            HEAD_D, D0, D1, D2, False, HAS_MASK, NEG_SCALE, DOT_F32, PRECISION, BLOCK_N, USE_DESC)
        k_blk += BLOCK_N * stride_ks
        v_blk += BLOCK_N * stride_vs
    if TAIL_N:  # the peeled last block: Skv % BLOCK_N keys; rows past Skv re-read the last key
        if not USE_DESC:  # (with descriptors they read as zeros)
            ko0, ko1, ko2, vo0, vo1, vo2 = _kv_offsets(tl.minimum(offs_n, Skv - 1 - n_full), HEAD_D, D0,
                                                       D1, D2, stride_ks, stride_kd, stride_vs, stride_vd)
        acc0, acc1, acc2, m_i, l_i = _attend_block(
            q0, q1, q2, acc0, acc1, acc2, m_i, l_i, k_blk, v_blk,
            ko0, ko1, ko2, vo0, vo1, vo2, KD0, KD1, KD2, VD0, VD1, VD2, desc_b, desc_h,
            mask_row, n_full, Skv, stride_mn, qk_scale,
            HEAD_D, D0, D1, D2, True, HAS_MASK, NEG_SCALE, DOT_F32, PRECISION, BLOCK_N, USE_DESC)

    # l == 0: every key masked -> output 0 and lse = +inf (attention_bwd then gives 0 gradients)
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    inv_l = tl.where(has_keys, 1.0 / l_safe, 0.0)
    _store_piece(O, OD0, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, acc0, inv_l, 0, D0, HEAD_D,
                 BLOCK_M, USE_DESC, stride_ob, stride_oh, stride_os)
    if D1 > 0:
        _store_piece(O, OD1, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, acc1, inv_l, D0, D1, HEAD_D,
                     BLOCK_M, USE_DESC, stride_ob, stride_oh, stride_os)
    if D2 > 0:
        _store_piece(O, OD2, off_b, off_h, desc_b, desc_h, m0, offs_m, m_ok, acc2, inv_l, D0 + D1, D2,
                     HEAD_D, BLOCK_M, USE_DESC, stride_ob, stride_oh, stride_os)
    lse = tl.where(has_keys, (m_i * qk_scale + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + (off_b * H + off_h) * Sq + offs_m, lse, mask=m_ok)


# ================================================================ configs
# The space: BLOCK_M 64/128, BLOCK_N 32/64/128, num_warps 4/8, num_stages 2-4, pruned
#  (1) as Triton's fused-attention tutorial does on sm_90: no num_warps=8 with
#      BLOCK_M·BLOCK_N < 128·128 (never won there);
#  (2) by registers, for the smallest Dp of the tier (timing discards what spills at larger Dp):
#      fp32 values per thread ≈ (BLOCK_M·Dp [acc] + 1.5·BLOCK_M·BLOCK_N [S fp32 + P 16-bit]) /
#      (32·num_warps) must stay ≤ 224 of the 255 registers (the rest: addresses, m, l);
#  (3) by shared memory for the largest Dp of the tier: num_stages·BLOCK_N·Dp·2 (K and V) +
#      BLOCK_M·Dp (Q), times the element size, ≤ 200 KiB of the H200's 227 KiB per block.
# To keep tuning one key near a second of device time (compiles dominate), each tier times its
# default, the other surviving tiles at 3 stages (or the deepest that fits), then the default
# tile at its other stage counts: at most 9 candidates. Pointer-path defaults, offline sm_90,
# Triton 3.9, bf16, key-padding mask, 2026-12-01: no stack at hd 16-32, 64, 80-256 (115-252
# registers); at hd 40 and 72, whose row strides are not multiples of 16 elements, the padded
# piece's clamped loads and masked stores are per element: 88 and 152 B of stack and no
# cp.async pipelining (16 and 24 KB of shared memory). The descriptor path has neither problem.
_SPACE_BM, _SPACE_BN, _SPACE_W, _SPACE_STAGES = (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)
_MAX_TIMED = 9
# tier (row bytes of the next power of two of Dp, as attention._tier) -> (smallest Dp, largest Dp)
# for 2-byte types; fp32 tiers hold half the Dp at the same bytes, so the same bounds are safe.
_TIER_DP = {0: (16, 64), 1: (80, 128), 2: (144, 256), 3: (144, 256)}
_DEFAULTS = {0: (128, 64, 4, 3), 1: (128, 32, 4, 3), 2: (64, 32, 4, 2), 3: (32, 32, 4, 1)}
# The descriptor path's defaults: with Q, K, V and O all through descriptors no thread computes
# per-element addresses, and 128 × 64 with 4 warps and 3 stages (the tile of Triton's Hopper
# tutorial) compiles without stack at hd 40-128 (159-251 registers; offline sm_90, Triton 3.9,
# bf16), where the pointer path's tier-1 tile spills at hd 72. tests/test_offline_compile.py
# compiles every default and prints the table.
_DEFAULTS_TMA = {**_DEFAULTS, 1: (128, 64, 4, 3)}


def _regs(bm, bn, w, dp):
    return (bm * dp + 1.5 * bm * bn) / (32 * w)


def _smem(bm, bn, stages, dp, itemsize=2):
    return (stages * bn * dp * 2 + bm * dp) * itemsize


def _fits(bm, bn, w, s, tier):
    dp_min, dp_max = _TIER_DP[tier]
    return (not (w == 8 and bm * bn < 128 * 128)
            and _regs(bm, bn, w, dp_min) <= 224
            and _smem(bm, bn, s, dp_max) <= 200 * 1024)


def _tier_candidates(tier: int, defaults: dict = _DEFAULTS) -> list:
    d = defaults[tier]
    cands = [_cfg(*d)]
    tiles = [(bm, bn, w) for bm in _SPACE_BM for bn in _SPACE_BN for w in _SPACE_W]
    for bm, bn, w in tiles:
        if (bm, bn, w) == d[:3]:
            continue
        for s in (3, 2):  # 3 stages, else 2 where 3 does not fit shared memory
            if _fits(bm, bn, w, s, tier):
                cands.append(_cfg(bm, bn, w, s))
                break
    cands += [_cfg(*d[:3], s) for s in _SPACE_STAGES if s != d[3] and _fits(*d[:3], s, tier)]
    return cands[:_MAX_TIMED]


# Registered into attention's candidate table, so that attention._run (key, tuning once per
# key, default without timing, never during capture/tracing) and tuned_configs() /
# load_tuned_configs() serve this kernel unchanged.
_v1._CANDIDATES.setdefault(OP, {t: _tier_candidates(t) for t in _TIER_DP})
_v1._CANDIDATES.setdefault(OP_TMA, {t: _tier_candidates(t, _DEFAULTS_TMA) for t in _TIER_DP})


def config_key_v2(q: torch.Tensor, k: torch.Tensor, key_padding_mask=None, tma: bool = False) -> str:
    """The config-table key of the v2 forward for these inputs, e.g.
    "fwd_v2:bfloat16:d48:nomask:q4096:kv128" (head dim as its padded Dp); "fwd_tma:..." for the
    descriptor path, which `tma=True` takes where tma_usable(q, k, v)."""
    op = OP_TMA if tma and tma_usable(q, k, k) else OP
    return _key(op, q.dtype, sum(head_dim_pieces(q.shape[-1])), key_padding_mask is not None,
                q.shape[2], k.shape[2])


# ================================================================ tensor descriptors
@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    """Hopper (sm_90) and newer have the tensor memory accelerator."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _desc_strides(t: torch.Tensor):
    """t's strides for a descriptor, or None when TMA cannot address t: the last dim must be
    contiguous and every other stride a positive multiple of 16 bytes (a size-1 dim's stride is
    never used to step, so it is replaced by one past the whole tensor's extent)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    item = t.element_size()
    extent = max([st * n for st, n in zip(t.stride(), t.shape) if n > 1] + [t.shape[-1]])
    past = -(-extent * item // 16) * 16 // item  # extent rounded up to 16 bytes, in elements
    strides = []
    for st, n in zip(t.stride()[:-1], t.shape[:-1]):
        if n == 1:
            st = past
        elif st <= 0 or st * item % 16:
            return None
        strides.append(st)
    return strides + [1]


def tma_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the descriptor path can take these q, k, v: a Triton with host tensor descriptors,
    a GPU with TMA (sm_90+; the interpreter emulates descriptors on the CPU), 16-byte aligned
    bases, 16-byte multiple strides, unit last-dim stride, and rows of a multiple of 16 bytes
    (PyTorch's inductor asks the same of a tensor before it uses TMA). The strides need not
    decrease: diffusers' [B, S, H, D] storage seen as [B, H, S, D] is described as it is, which
    keeps the box [1, 1, rows, P] (a box [1, rows, 1, P] over the storage order compiles to 63 more
    registers at hd 40 and spills at hd 128, offline sm_90)."""
    if TensorDescriptor is None:
        return False
    if q.device.type == "cuda":
        if not _has_tma(q.device.index if q.device.index is not None else torch.cuda.current_device()):
            return False
    elif not INTERPRET:
        return False
    return all(t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0
               and _desc_strides(t) is not None for t in (q, k, v))


def _descriptors(t: torch.Tensor, block_rows: int, pieces) -> list:
    """One TensorDescriptor per head-dim piece over t [B, H, S, D] (None for an absent piece):
    box [1, 1, block_rows, P]; TMA zero-fills loads and clips stores past S or D."""
    strides = _desc_strides(t)
    return [TensorDescriptor(t, list(t.shape), strides, [1, 1, block_rows, p]) if p else None for p in pieces]


# ================================================================ launcher
def _tile_span_ok(t: torch.Tensor, rows: int) -> bool:
    """Whether the in-tile offsets of rows × D elements stay below 2^31 (they are int32)."""
    return rows * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3)) < 2 ** 31


def attention_fwd_v2(q, k, v, key_padding_mask=None, scale=None, out=None, tma=False):
    """o = softmax(q kᵀ · scale) v per (batch, head) → (o [B, H, Sq, D] contiguous, lse fp32
    [B, H, Sq]); the contract of attention.attention_fwd. `out` = (o, lse) preallocated (the
    ops layer passes its poisonable buffers) or None. tma=True reads Q, K, V and writes O through
    tensor descriptors where tma_usable(q, k, v) (else, in the same call, the pointer path).

    q [B, H, Sq, D], k/v [B, H, Skv, D] in fp16/bf16/fp32 with any strides (nothing is copied
    unless a key row stride is so large that BLOCK_N rows span 2^31 elements);
    key_padding_mask bool [B, Skv] (True = attend) or None; scale defaults to 1/sqrt(D).
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if out is None:
        o = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    else:
        o, lse = out
    if o.numel() == 0:
        return o, lse
    if Skv == 0:
        return o.zero_(), lse.fill_(float("inf"))
    use_desc = bool(tma) and tma_usable(q, k, v) and tma_usable(o, o, o)
    if not use_desc:
        k, v = (t if _tile_span_ok(t, _MAX_BLOCK_N) else t.contiguous() for t in (k, v))
    d0, d1, d2 = head_dim_pieces(D)
    # scale = 0 makes every score 0; c = 0 would turn masked -inf scores into NaN (-inf·0), the
    # smallest normal c gives exp2(s·c − m·c) = 1 exactly for every finite score instead.
    qk_scale = max(abs(scale) * _LOG2E, _MIN_QK_SCALE)
    meta = dict(HEAD_D=D, D0=d0, D1=d1, D2=d2, BLOCK_D=d0 + d1 + d2, NEG_SCALE=scale < 0,
                DOT_F32=dot_upcast(q.dtype), PRECISION=_precision(q.dtype), USE_DESC=use_desc)
    # batches per launch so that ⌈Sq/16⌉·H·batches ≤ 2^31 − 1 for any BLOCK_M ≥ 16
    per_launch = max(1, _GRID_MAX // (triton.cdiv(Sq, 16) * H))
    for b0 in range(0, B, per_launch):
        b1 = min(B, b0 + per_launch)
        kpm = None if key_padding_mask is None else key_padding_mask[b0:b1]
        mask, smb, smn, has_mask = _mask_args(kpm, lse)
        qb, kb, vb, ob = q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1]
        nb = b1 - b0

        def args(cfg, qb=qb, kb=kb, vb=vb, ob=ob, lse=lse[b0:b1], mask=mask, smb=smb, smn=smn):
            # descriptors carry the config's block sizes in their box: built per launch (host side)
            pieces = (d0, d1, d2)
            descs = ([*_descriptors(qb, cfg["BLOCK_M"], pieces), *_descriptors(kb, cfg["BLOCK_N"], pieces),
                      *_descriptors(vb, cfg["BLOCK_N"], pieces), *_descriptors(ob, cfg["BLOCK_M"], pieces)]
                     if use_desc else [None] * 12)
            return (qb, kb, vb, ob, lse, mask, *descs,
                    *qb.stride(), *kb.stride(), *vb.stride(), *ob.stride()[:3], smb, smn,
                    H, Sq, Skv, qk_scale)

        _run(OP_TMA if use_desc else OP, _attention_fwd_v2_kernel,
             lambda cfg, nb=nb: (triton.cdiv(Sq, cfg["BLOCK_M"]) * H * nb,),
             args, dict(meta, HAS_MASK=has_mask), q.dtype, Sq, Skv)
    return o, lse
