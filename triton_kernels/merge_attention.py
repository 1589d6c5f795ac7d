"""Merge of partial attention results by log-sum-exp, in one pass over the partials.

Given n results of attention of the same queries over disjoint key sets, (out_i, lse_i),
the attention over the union is

    lse = log Σ_i exp(lse_i),    out = Σ_i exp(lse_i − lse) · out_i

(FlashAttention's split-KV combine; ring attention merges one K/V block at a time with it).
Validation and dispatch live in `flashdiff.ops.merge_attention`; the math is defined by
`flashdiff.reference.merge_attention`.

Numerics: everything in fp32. An empty partial (lse_i = -inf, or +inf as the attention kernels
write it internally) weighs exactly 0 and its out_i is never multiplied (a NaN there stays
out); a row empty in every partial gives out 0 and lse -inf. A NaN lse_i makes the row NaN.

Layout: up to MAX_PARTIALS partials per launch, each out_i [B, H, Sq, D] with its own dtype and
strides (views, e.g. of a fused buffer, are read in place); lses fp32 [B, H, Sq] contiguous.
More partials are folded: the first MAX_PARTIALS merged, then that result with the next
MAX_PARTIALS − 1, and so on (merging is associative; each fold rereads one fp32 partial).
Traffic for n ≤ MAX_PARTIALS: reads n·D elements + 4·n B per row, writes D elements + 4 B:
memory-bound, ~(n + 1)·D·2 bytes per row in bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET

__all__ = ["merge_attention_fwd", "MAX_PARTIALS"]

MAX_PARTIALS = 4  # pointer arguments per launch (a list of n pointers is not a Triton argument)


@triton.jit
def _partial_lse(LSE, rows, r_ok):
    """lse_i of BLOCK_R rows (4 B each), with +inf (an internal "empty") mapped to -inf."""
    lse = tl.load(LSE + rows, mask=r_ok, other=float("-inf"))
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit
def _add_partial(acc, O, lse, m_safe, row_off, offs_d, rd_ok, stride_d):
    """acc += exp(lse_i − m)·out_i, skipping rows where the weight is 0 (empty partials: their
    out_i is not read, so a NaN there stays out; a NaN weight does propagate).
    Reads BLOCK_R·BLOCK_D elements of out_i."""
    w = tl.exp(lse - m_safe)
    live = w != 0.0
    o = tl.load(O + row_off[:, None] + offs_d[None, :] * stride_d, mask=rd_ok & live[:, None], other=0.0)
    return acc + tl.where(live[:, None], w[:, None] * o.to(tl.float32), 0.0), w


@triton.jit
def _row_offsets(rows, H, Sq, stride_b, stride_h, stride_s):
    """Element offsets (int64) of the rows (b·H + h)·Sq + s of a [B, H, Sq, D] tensor."""
    r = rows.to(tl.int64)
    s = r % Sq
    bh = r // Sq
    return (bh // H) * stride_b + (bh % H) * stride_h + s * stride_s


@triton.jit
def _merge_attention_kernel(
    O0, O1, O2, O3, L0, L1, L2, L3, OUT, LSE_OUT,
    s0b, s0h, s0s, s0d, s1b, s1h, s1s, s1d, s2b, s2h, s2s, s2d, s3b, s3h, s3s, s3d,
    so_b, so_h, so_s,
    n_rows, H, Sq, D,
    N: tl.constexpr,               # partials in this launch, 1..4
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_R rows (query rows of all batches and heads, flattened) × all D."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    rd_ok = r_ok[:, None] & (offs_d < D)[None, :]

    # pass 1 over the lses (4·N B per row): the row max m
    l0 = _partial_lse(L0, rows, r_ok)
    l1 = l0
    l2 = l0
    l3 = l0
    m = l0
    if N > 1:
        l1 = _partial_lse(L1, rows, r_ok)
        m = tl.maximum(m, l1)
    if N > 2:
        l2 = _partial_lse(L2, rows, r_ok)
        m = tl.maximum(m, l2)
    if N > 3:
        l3 = _partial_lse(L3, rows, r_ok)
        m = tl.maximum(m, l3)
    # every partial empty: subtract 0, so exp(-inf − 0) = 0 (exp(-inf + inf) would be NaN)
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    # the one pass over the outputs: weights exp(lse_i − m) ≤ 1, accumulated in fp32
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc, s = _add_partial(acc, O0, l0, m_safe, _row_offsets(rows, H, Sq, s0b, s0h, s0s), offs_d, rd_ok, s0d)
    if N > 1:
        acc, w = _add_partial(acc, O1, l1, m_safe, _row_offsets(rows, H, Sq, s1b, s1h, s1s), offs_d, rd_ok, s1d)
        s += w
    if N > 2:
        acc, w = _add_partial(acc, O2, l2, m_safe, _row_offsets(rows, H, Sq, s2b, s2h, s2s), offs_d, rd_ok, s2d)
        s += w
    if N > 3:
        acc, w = _add_partial(acc, O3, l3, m_safe, _row_offsets(rows, H, Sq, s3b, s3h, s3s), offs_d, rd_ok, s3d)
        s += w

    # s ≥ 1 where some partial is not empty (the largest weighs exp(0)); 0 where none is; NaN
    # where an lse_i was NaN, and then out and lse are NaN too (never a clean-looking row)
    empty = s == 0.0
    s_safe = tl.where(empty, 1.0, s)
    out = acc / s_safe[:, None]
    tl.store(OUT + _row_offsets(rows, H, Sq, so_b, so_h, so_s)[:, None] + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=rd_ok)
    tl.store(LSE_OUT + rows, tl.where(empty, float("-inf"), m_safe + tl.log(s_safe)), mask=r_ok)


def _launch(outs, lses, out, lse):
    """One launch over ≤ MAX_PARTIALS partials into (out, lse)."""
    B, H, Sq, D = out.shape
    n = len(outs)
    pad = MAX_PARTIALS - n
    o_args = list(outs) + [outs[0]] * pad      # placeholders: N is constexpr, never read
    l_args = list(lses) + [lses[0]] * pad
    strides = [s for o in o_args for s in o.stride()]
    block_d = max(16, triton.next_power_of_2(D))
    # ~4K fp32 accumulator elements per program (16 KB in registers across 4 warps)
    block_r = 16 if INTERPRET else max(1, min(64, 4096 // block_d))
    n_rows = B * H * Sq
    _merge_attention_kernel[(triton.cdiv(n_rows, block_r),)](
        *o_args, *l_args, out, lse, *strides, *out.stride()[:3], n_rows, H, Sq, D,
        N=n, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def merge_attention_fwd(outs, lses, out_dtype=None, out=None):
    """(out [B, H, Sq, D] contiguous in out_dtype (default outs[0]'s), lse fp32 [B, H, Sq])
    of the union of the partials. outs: n ≥ 1 tensors [B, H, Sq, D] of float dtypes, any
    strides; lses: n fp32 contiguous [B, H, Sq]. `out` = (out, lse) preallocated or None."""
    shape = outs[0].shape
    if out is None:
        o = torch.empty(shape, dtype=out_dtype or outs[0].dtype, device=outs[0].device)
        lse = torch.empty(shape[:3], dtype=torch.float32, device=outs[0].device)
    else:
        o, lse = out
    if o.numel() == 0:
        return o, lse.fill_(float("-inf")) if lse.numel() else lse
    if len(outs) <= MAX_PARTIALS:
        _launch(outs, lses, o, lse)
        return o, lse
    # fold: an fp32 running result keeps the rounding of one final cast
    acc = torch.empty(shape, dtype=torch.float32, device=o.device)
    acc_lse = torch.empty_like(lse)
    _launch(outs[:MAX_PARTIALS], lses[:MAX_PARTIALS], acc, acc_lse)
    i = MAX_PARTIALS
    while i < len(outs):
        j = min(len(outs), i + MAX_PARTIALS - 1)
        last = j == len(outs)
        dst = (o, lse) if last else (torch.empty_like(acc), torch.empty_like(acc_lse))
        _launch([acc] + list(outs[i:j]), [acc_lse] + list(lses[i:j]), *dst)
        acc, acc_lse = dst
        i = j
    return o, lse
