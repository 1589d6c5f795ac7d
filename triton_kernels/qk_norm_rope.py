"""q/k RMS norm then the rotary embedding, for q and k in one launch, and its gradient.

    n = x·rstd·w,  rstd = 1/sqrt(mean(x²) + eps)         per row of D (one head of one token)
    y = n·cos + rotate(n)·sin                             cos, sin [S, D], row s = the token

rotate pairs the columns (c1, c2): interleaved (Flux, diffusers' use_real_unbind_dim=-1)
c1 = 2i, c2 = 2i + 1; half-split (use_real_unbind_dim=-2) c1 = i, c2 = i + D/2; and
    y[c1] = n[c1]·cos[c1] − n[c2]·sin[c1],   y[c2] = n[c2]·cos[c2] + n[c1]·sin[c2].
The math is `flashdiff.reference.qk_norm_rope`.

Layout: q [B, H, S, D] and k [B, Hk, Sk, D], any strides with a unit column stride (else
copied first); row r = (b·H + h)·S + s is read at b·stride_b + h·stride_h + s·stride_s, so a
[B, S, H, D] tensor seen through .transpose(1, 2) is read in place. Outputs (and dq, dk) are
contiguous, of the input's shape. cos/sin are read as fp32 rows with a unit column stride.

Parallelism: one launch; programs [0, Pq) take BLOCK_R rows of q, the rest rows of k. A
program loads its tile as the two halves of every pair ([BLOCK_R, BLOCK_H] each, BLOCK_H =
next_pow2(ceil(D/2))), so the rotation is elementwise between two register tiles and every
element is loaded once. Without rope the same pairing (interleaved) serves any D, odd too.
Traffic (forward): read q and k, write them: 2 elements per element (4 B in bf16), plus the
cos/sin rows (8 B per S·D element, L2-resident across the B·H heads that share them),
against ~14 passes for the eager RMSNorm + apply_rotary_emb pair of q and of k.
Backward: read dy and x, write dx: 3 elements per element, + 4·D B of dweight partials per
program; rstd is recomputed from x (the forward saves nothing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, device_sms

__all__ = ["MAX_D", "qk_norm_rope_fwd", "qk_norm_rope_bwd"]

MAX_D = 8192  # a whole row in one program's registers (head dims are ≤ 256 in practice)
_TILE = 4096  # elements per program tile
_ROPE_NONE, _ROPE_INTERLEAVED, _ROPE_HALF = 0, 1, 2


# ================================================================ shared pieces
@triton.jit
def _pairs(D, HALF, ROPE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Column indices (c1, c2) of the pairs and their masks (interleaved unless half-split)."""
    i = tl.arange(0, BLOCK_H)
    if ROPE == 2:
        c1 = i
        c2 = i + HALF
        m1 = i < HALF
        m2 = m1
    else:
        c1 = 2 * i
        c2 = 2 * i + 1
        m1 = c1 < D
        m2 = c2 < D
    return c1, c2, m1, m2


@triton.jit
def _row_offsets(row0, R, H, S, sb, sh, ss, BLOCK_R: tl.constexpr):
    """Rows row0 .. row0 + BLOCK_R of a [B, H, S, D] view: the row indices (int64: B·H·S·D may
    pass 2^31), each row's element offset, its sequence index s (the cos/sin row), the row mask."""
    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    s = rows % S
    bh = rows // S
    return rows, (bh // H) * sb + (bh % H) * sh + s * ss, s, rows < R


@triton.jit
def _ld(base, off, cols, mask):
    return tl.load(base + off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight(W, cols, m, HAS_W: tl.constexpr):
    if HAS_W:
        return tl.load(W + cols, mask=m, other=0.0).to(tl.float32)[None, :]
    return tl.full(cols.shape, 1.0, tl.float32)[None, :]


@triton.jit
def _trig(COS, SIN, s, stride_c, stride_s, c1, c2, mk1, mk2):
    """cos and sin at (s, c1) and (s, c2): four fp32 [BLOCK_R, BLOCK_H] tiles."""
    o_c = s * stride_c
    o_s = s * stride_s
    return _ld(COS, o_c, c1, mk1), _ld(COS, o_c, c2, mk2), _ld(SIN, o_s, c1, mk1), _ld(SIN, o_s, c2, mk2)


# ================================================================ forward
@triton.jit
def _fwd_rows(X, Y, W, COS, SIN, row0, R, H, S, sb, sh, ss, stride_c, stride_s, D, HALF, eps,
              HAS_W: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """y for BLOCK_R rows of one tensor (q or k): reads BLOCK_R·D elements, writes as many."""
    rows, off, s, rmask = _row_offsets(row0, R, H, S, sb, sh, ss, BLOCK_R)
    c1, c2, m1, m2 = _pairs(D, HALF, ROPE, BLOCK_H)
    mk1 = rmask[:, None] & m1[None, :]
    mk2 = rmask[:, None] & m2[None, :]
    x1 = _ld(X, off, c1, mk1)
    x2 = _ld(X, off, c2, mk2)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
    n1 = x1 * rstd[:, None] * _weight(W, c1, m1, HAS_W)
    n2 = x2 * rstd[:, None] * _weight(W, c2, m2, HAS_W)
    if ROPE != 0:
        cos1, cos2, sin1, sin2 = _trig(COS, SIN, s, stride_c, stride_s, c1, c2, mk1, mk2)
        y1 = n1 * cos1 - n2 * sin1
        y2 = n2 * cos2 + n1 * sin2
    else:
        y1 = n1
        y2 = n2
    tl.store(Y + rows[:, None] * D + c1[None, :], y1.to(Y.dtype.element_ty), mask=mk1)  # contiguous out
    tl.store(Y + rows[:, None] * D + c2[None, :], y2.to(Y.dtype.element_ty), mask=mk2)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, QO, KO, QW, KW, COS, SIN,
    Rq, Hq, Sq, q_sb, q_sh, q_ss, Rk, Hk, Sk, k_sb, k_sh, k_ss,
    stride_c, stride_s, q_programs, D, HALF, eps,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Programs [0, q_programs) normalize + rotate q's rows, the others k's: q and k in one pass."""
    pid = tl.program_id(0)
    if pid < q_programs:
        _fwd_rows(Q, QO, QW, COS, SIN, pid.to(tl.int64) * BLOCK_R, Rq, Hq, Sq, q_sb, q_sh, q_ss,
                  stride_c, stride_s, D, HALF, eps, HAS_QW, ROPE, BLOCK_R, BLOCK_H)
    else:
        _fwd_rows(K, KO, KW, COS, SIN, (pid - q_programs).to(tl.int64) * BLOCK_R, Rk, Hk, Sk,
                  k_sb, k_sh, k_ss, stride_c, stride_s, D, HALF, eps, HAS_KW, ROPE, BLOCK_R, BLOCK_H)


# ================================================================ backward
@triton.jit
def _bwd_rows(DY, X, DX, W, COS, SIN, PART, first, R, per, H, S, sb, sh, ss, dsb, dsh, dss,
              stride_c, stride_s, D, HALF, eps,
              HAS_W: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """dx for the rows [first, first + per) of one tensor, and their Σ dn·x̂ (dweight) into PART.

    dn = rotateᵀ(dy): dn[c1] = dy[c1]·cos[c1] + dy[c2]·sin[c2], dn[c2] = dy[c2]·cos[c2] − dy[c1]·sin[c1];
    then the RMS norm's dx = rstd·(dx̂ − x̂·mean(dx̂·x̂)), dx̂ = dn·w. Reads dy and x, writes dx.
    """
    end = tl.minimum(first + per, R)
    c1, c2, m1, m2 = _pairs(D, HALF, ROPE, BLOCK_H)
    w1 = _weight(W, c1, m1, HAS_W)
    w2 = _weight(W, c2, m2, HAS_W)
    acc1 = tl.zeros([BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_H], tl.float32)
    for row0 in range(first, end, BLOCK_R):
        rows, off, s, rmask = _row_offsets(row0, end, H, S, sb, sh, ss, BLOCK_R)
        doff = _row_offsets(row0, end, H, S, dsb, dsh, dss, BLOCK_R)[1]
        mk1 = rmask[:, None] & m1[None, :]
        mk2 = rmask[:, None] & m2[None, :]
        x1 = _ld(X, off, c1, mk1)
        x2 = _ld(X, off, c2, mk2)
        dy1 = _ld(DY, doff, c1, mk1)
        dy2 = _ld(DY, doff, c2, mk2)
        if ROPE != 0:
            cos1, cos2, sin1, sin2 = _trig(COS, SIN, s, stride_c, stride_s, c1, c2, mk1, mk2)
            dn1 = dy1 * cos1 + dy2 * sin2
            dn2 = dy2 * cos2 - dy1 * sin1
        else:
            dn1 = dy1
            dn2 = dy2
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        xh1 = x1 * rstd[:, None]
        xh2 = x2 * rstd[:, None]
        dxh1 = dn1 * w1
        dxh2 = dn2 * w2
        c = (tl.sum(dxh1 * xh1, 1) + tl.sum(dxh2 * xh2, 1)) / D
        tl.store(DX + rows[:, None] * D + c1[None, :],
                 (rstd[:, None] * (dxh1 - xh1 * c[:, None])).to(DX.dtype.element_ty), mask=mk1)
        tl.store(DX + rows[:, None] * D + c2[None, :],
                 (rstd[:, None] * (dxh2 - xh2 * c[:, None])).to(DX.dtype.element_ty), mask=mk2)
        acc1 += tl.sum(dn1 * xh1, 0)
        acc2 += tl.sum(dn2 * xh2, 0)
    tl.store(PART + c1, acc1, mask=m1)
    tl.store(PART + c2, acc2, mask=m2)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO, DKO, Q, K, DQ, DK, QW, KW, COS, SIN, PART,
    Rq, Hq, Sq, q_sb, q_sh, q_ss, dq_sb, dq_sh, dq_ss, q_per,
    Rk, Hk, Sk, k_sb, k_sh, k_ss, dk_sb, dk_sh, dk_ss, k_per,
    stride_c, stride_s, q_programs, D, HALF, eps,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program p < q_programs: chunk p of q's rows; else chunk p − q_programs of k's. PART[p]
    gets the chunk's dweight column sums (q's chunks first)."""
    pid = tl.program_id(0)
    part = PART + pid.to(tl.int64) * D
    if pid < q_programs:
        _bwd_rows(DQO, Q, DQ, QW, COS, SIN, part, pid.to(tl.int64) * q_per, Rq, q_per, Hq, Sq,
                  q_sb, q_sh, q_ss, dq_sb, dq_sh, dq_ss, stride_c, stride_s, D, HALF, eps,
                  HAS_QW, ROPE, BLOCK_R, BLOCK_H)
    else:
        _bwd_rows(DKO, K, DK, KW, COS, SIN, part, (pid - q_programs).to(tl.int64) * k_per, Rk, k_per,
                  Hk, Sk, k_sb, k_sh, k_ss, dk_sb, dk_sh, dk_ss, stride_c, stride_s, D, HALF, eps,
                  HAS_KW, ROPE, BLOCK_R, BLOCK_H)


# ================================================================ launchers
def _unit_cols(t):
    """t with a unit column stride (a view when it has one already, else a copy)."""
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _geometry(t):
    """(rows, H, S, stride_b, stride_h, stride_s) of a [B, H, S, D] view."""
    B, H, S, _ = t.shape
    return (B * H * S, H, S, *t.stride()[:3])


def _block(D: int, R: int):
    """(BLOCK_R, BLOCK_H, num_warps): whole rows as two half tiles, ~_TILE elements per program."""
    block_h = triton.next_power_of_2(max((D + 1) // 2, 1))
    block_r = max(1, min(_TILE // (2 * block_h), triton.next_power_of_2(max(R, 1))))
    return block_r, block_h, min(16, max(4, block_r * block_h // 256))


def _rope(cos, sin, interleaved):
    """(mode, cos fp32, sin fp32, row stride of cos, of sin). cos/sin are [S, D]: at most a few MB,
    so the fp32 cast is cheap and the kernel stays one-typed."""
    if cos is None:
        return _ROPE_NONE, None, None, 0, 0
    cos, sin = (_unit_cols(t.to(torch.float32)) for t in (cos, sin))
    return (_ROPE_INTERLEAVED if interleaved else _ROPE_HALF), cos, sin, cos.stride(0), sin.stride(0)


def qk_norm_rope_fwd(q, k, q_weight=None, k_weight=None, cos=None, sin=None, eps=1e-6, interleaved=True,
                     q_out=None, k_out=None):
    """→ (q_out, k_out): contiguous, of q's and k's shapes, in q's dtype (written into the given
    outputs when passed: contiguous tensors of those shapes). q [B, H, S, D], k [B, Hk, Sk, D];
    cos, sin [S, D] (S = Sq = Sk) or None (the norm alone)."""
    D = q.shape[-1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    ko = torch.empty(k.shape, dtype=q.dtype, device=q.device) if k_out is None else k_out
    q, k = _unit_cols(q), _unit_cols(k)
    qw, kw = (None if w is None else w.contiguous() for w in (q_weight, k_weight))
    mode, cos, sin, stride_c, stride_s = _rope(cos, sin, interleaved)
    gq, gk = _geometry(q), _geometry(k)
    block_r, block_h, num_warps = _block(D, max(gq[0], gk[0]))
    q_programs = triton.cdiv(gq[0], block_r)
    grid = q_programs + triton.cdiv(gk[0], block_r)
    if grid == 0:
        return qo, ko
    _qk_norm_rope_fwd_kernel[(grid,)](
        q, k, qo, ko, qw if qw is not None else q, kw if kw is not None else q,
        cos if cos is not None else q, sin if sin is not None else q,
        *gq, *gk, stride_c, stride_s, q_programs, D, D // 2, float(eps),
        HAS_QW=qw is not None, HAS_KW=kw is not None, ROPE=mode,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return qo, ko


def _chunk_rows(t, R: int, block_r: int, share: int) -> int:
    """Rows per backward program: whole tiles, ~`share` of 4 programs per SM, a few tiles each
    on a GPU (fewer dweight partials to sum afterwards)."""
    per = max(block_r, triton.cdiv(R, max(1, share)))
    if not INTERPRET:
        per = max(per, 4 * block_r)
    return triton.cdiv(per, block_r) * block_r


def qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight=None, k_weight=None, cos=None, sin=None, eps=1e-6,
                     interleaved=True):
    """→ (dq, dk, dq_weight or None, dk_weight or None): one kernel over (dy, x) of q and k
    (rstd recomputed), then the dweight partials' column sums in torch. dq, dk are contiguous,
    in q's and k's dtypes; dweights in the weights' dtypes."""
    D = q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q, k, dq_out, dk_out = (_unit_cols(t) for t in (q, k, dq_out, dk_out))
    qw, kw = (None if w is None else w.contiguous() for w in (q_weight, k_weight))
    mode, cos, sin, stride_c, stride_s = _rope(cos, sin, interleaved)
    gq, gk = _geometry(q), _geometry(k)
    block_r, block_h, num_warps = _block(D, max(gq[0], gk[0]))
    target = 4 * device_sms(q)
    q_per = _chunk_rows(q, gq[0], block_r, target // 2)
    k_per = _chunk_rows(k, gk[0], block_r, target // 2)
    q_programs = triton.cdiv(gq[0], q_per)
    grid = q_programs + triton.cdiv(gk[0], k_per)
    part = torch.zeros((max(grid, 1), D), dtype=torch.float32, device=q.device)
    if grid:
        _qk_norm_rope_bwd_kernel[(grid,)](
            dq_out, dk_out, q, k, dq, dk, qw if qw is not None else q, kw if kw is not None else q,
            cos if cos is not None else q, sin if sin is not None else q, part,
            *gq, *dq_out.stride()[:3], q_per, *gk, *dk_out.stride()[:3], k_per,
            stride_c, stride_s, q_programs, D, D // 2, float(eps),
            HAS_QW=qw is not None, HAS_KW=kw is not None, ROPE=mode,
            BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
        )
    dqw = part[:q_programs].sum(0).to(qw.dtype) if qw is not None else None
    dkw = part[q_programs:grid].sum(0).to(kw.dtype) if kw is not None else None
    return dq, dk, dqw, dkw
