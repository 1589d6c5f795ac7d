"""Row norms over the last dim, and their gradients: adaLN LayerNorm and RMSNorm.

    layer_norm:  y = act((x̂·w + b)·(1 + scale) + shift),  x̂ = (x − mean)·rstd
    rms_norm:    y = x·rstd·w,                            rstd = 1/sqrt(mean(x²) + eps)

Vertical slice: kernels, then launchers. The math is `flashdiff.reference.layer_norm` /
`rms_norm`.

Layout: x [..., D] is addressed as R rows of D elements through one row stride (a column
stride of 1); a view whose leading dims do not collapse to one stride is copied first. y and
dx are contiguous. scale/shift are addressed as M rows of D (M = N for [N, D] with
x [N, T, D]: row r reads modulation row r // (R / M); M = R for a per-token modulation).

Parallelism: a program owns a [BLOCK_R, BLOCK_D] tile: BLOCK_D = next_pow2(D) ≤ 8192 holds a
whole row in registers, BLOCK_R rows fill ~4K elements (D = 64: 64 rows per program, DiT's
q/k norm; D = 1152: 4 rows). So the statistics are exact two-pass over registers and x is
read from memory once.
Numerics: statistics in fp32; LayerNorm shifts each row by its first element K before
summing, so sums are of the size of the spread, not of |mean| (1e4 + N(0, 1) rows), and
normalizes x − K − (mean − K) without forming mean in fp32 (rounding mean to fp32 would cost
~|mean|·2⁻²⁴·rstd per element). The backward kernels recompute the statistics from x the
same way, so the forward writes no mean/rstd.
Traffic (forward): read x, write y: 2 elements per element (4 B in bf16) + the modulation
rows (per token: 2 more). Backward: read x and dy, write dx: 3 elements per element (+ the
per-token dscale/dshift), plus [programs, 4, D] fp32 partial column sums. Memory-bound: the
roofline is HBM bandwidth / bytes moved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, device_sms
# The activation and its derivative are group norm's (one definition of silu/gelu per backend).
from .group_norm import _act_grad, _apply_act, on_tensor_device

__all__ = ["MAX_D", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"]

MAX_D = 8192  # a whole row in one program's registers
_ACTIVATIONS = {None: 0, "none": 0, "silu": 1, "gelu": 2}
_TILE = 4096  # elements per program tile


# ================================================================ shared pieces
@triton.jit
def _tile(row0, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows row0 .. row0 + BLOCK_R: row indices (int64), column indices and the tile mask."""
    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    return rows, cols, mask


@triton.jit
def _load(base, rows, cols, stride_r, mask):
    """A [BLOCK_R, BLOCK_D] tile in fp32, 0 outside the mask."""
    return tl.load(base + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(base, rows, cols, stride_r, val, mask):
    tl.store(base + rows[:, None] * stride_r + cols[None, :], val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _ln_stats(x, cols, mask, D, eps):
    """(x̂, rstd) per row: shifted two-pass over the registers (K = the row's first element)."""
    k = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), 1)
    xs = tl.where(mask, x - k[:, None], 0.0)
    mean_k = tl.sum(xs, 1) / D                       # mean − K
    d = tl.where(mask, xs - mean_k[:, None], 0.0)    # x − mean, never rounded through mean
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / D + eps)
    return d * rstd[:, None], rstd


@triton.jit
def _rms_rstd(x, D, eps):
    return 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)


@triton.jit
def _col_param(P, cols, D, HAS: tl.constexpr, default: tl.constexpr):
    """A [D] parameter (weight/bias) as fp32 [1, BLOCK_D]; `default` when absent."""
    if HAS:
        v = tl.load(P + cols, mask=cols < D, other=0.0).to(tl.float32)
    else:
        v = tl.full(cols.shape, default, tl.float32)
    return v[None, :]


@triton.jit
def _modulation(SCALE, SHIFT, rows, cols, mask, rows_per_mod, stride_sr, stride_tr,
                HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """k = 1 + scale and t = shift for the tile's rows (fp32 tiles; 1 and 0 when absent)."""
    m = rows // rows_per_mod
    k = tl.full(mask.shape, 1.0, tl.float32)
    t = tl.zeros(mask.shape, tl.float32)
    if HAS_SCALE:
        k += _load(SCALE, m, cols, stride_sr, mask)
    if HAS_SHIFT:
        t += _load(SHIFT, m, cols, stride_tr, mask)
    return k, t


# ================================================================ kernels
@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, B, SCALE, SHIFT,
    R, D, rows_per_mod, stride_xr, stride_yr, stride_sr, stride_tr, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y = act((x̂·w + b)·(1 + scale) + shift) for BLOCK_R whole rows.

    Reads BLOCK_R·D elements of x (+ as many of scale/shift rows, L2-resident when shared by
    the tokens of a sample) and writes BLOCK_R·D of y: memory-bound.
    """
    rows, cols, mask = _tile(tl.program_id(0).to(tl.int64) * BLOCK_R, R, D, BLOCK_R, BLOCK_D)
    xhat, rstd = _ln_stats(_load(X, rows, cols, stride_xr, mask), cols, mask, D, eps)
    k, t = _modulation(SCALE, SHIFT, rows, cols, mask, rows_per_mod, stride_sr, stride_tr,
                       HAS_SCALE, HAS_SHIFT)
    z = (xhat * _col_param(W, cols, D, HAS_W, 1.0) + _col_param(B, cols, D, HAS_B, 0.0)) * k + t
    _store(Y, rows, cols, stride_yr, _apply_act(z, ACT), mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, DX, W, B, SCALE, SHIFT, DSCALE, DSHIFT, PART,
    R, D, rows_per_mod, rows_per_group, rows_per_chunk, num_chunks,
    stride_dyr, stride_xr, stride_sr, stride_tr, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    PER_ROW_MOD: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx for the rows of chunk c of group g, and that chunk's column sums.

    With u = x̂·w + b, k = 1 + scale, z = u·k + shift, dz = dy·act'(z), dx̂ = dz·k·w:
      dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))                            per row
      PART[g·num_chunks + c] = (Σ dz·k·x̂, Σ dz·k, Σ dz·u, Σ dz)  over the chunk's rows
    (dweight, dbias, and dscale, dshift of a per-sample modulation: a group is a sample, so
    its chunks' sums are its gradient). A per-token modulation's gradients dz·u and dz are
    written per element instead (PER_ROW_MOD). Reads dy and x, writes dx (+ dscale, dshift
    per token) and 16·D B per program: memory-bound.
    """
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    first = g * rows_per_group + c * rows_per_chunk
    end = tl.minimum(first + rows_per_chunk, (g + 1) * rows_per_group)
    w = _col_param(W, tl.arange(0, BLOCK_D), D, HAS_W, 1.0)
    b = _col_param(B, tl.arange(0, BLOCK_D), D, HAS_B, 0.0)
    acc_dw = tl.zeros([BLOCK_D], tl.float32)
    acc_db = tl.zeros([BLOCK_D], tl.float32)
    acc_ds = tl.zeros([BLOCK_D], tl.float32)
    acc_dt = tl.zeros([BLOCK_D], tl.float32)
    for row0 in range(first, end, BLOCK_R):
        rows, cols, mask = _tile(row0, end, D, BLOCK_R, BLOCK_D)
        xhat, rstd = _ln_stats(_load(X, rows, cols, stride_xr, mask), cols, mask, D, eps)
        k, t = _modulation(SCALE, SHIFT, rows, cols, mask, rows_per_mod, stride_sr, stride_tr,
                           HAS_SCALE, HAS_SHIFT)
        u = xhat * w + b
        dz = _load(DY, rows, cols, stride_dyr, mask)
        if ACT != 0:
            dz = dz * _act_grad(u * k + t, ACT)
        du = dz * k
        dxhat = du * w
        c1 = tl.sum(dxhat, 1) / D
        c2 = tl.sum(dxhat * xhat, 1) / D
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        _store(DX, rows, cols, D, dx, mask)
        acc_dw += tl.sum(du * xhat, 0)
        acc_db += tl.sum(du, 0)
        if PER_ROW_MOD:
            if HAS_SCALE:
                _store(DSCALE, rows, cols, D, dz * u, mask)
            if HAS_SHIFT:
                _store(DSHIFT, rows, cols, D, dz, mask)
        else:
            acc_ds += tl.sum(dz * u, 0)
            acc_dt += tl.sum(dz, 0)
    cols = tl.arange(0, BLOCK_D)
    part = PART + (g * num_chunks + c) * 4 * D + cols
    cmask = cols < D
    tl.store(part, acc_dw, mask=cmask)
    tl.store(part + D, acc_db, mask=cmask)
    tl.store(part + 2 * D, acc_ds, mask=cmask)
    tl.store(part + 3 * D, acc_dt, mask=cmask)


@triton.jit
def _rms_norm_fwd_kernel(
    X, Y, W, R, D, stride_xr, stride_yr, eps,
    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y = x·rstd·w for BLOCK_R whole rows. Reads and writes BLOCK_R·D elements: memory-bound."""
    rows, cols, mask = _tile(tl.program_id(0).to(tl.int64) * BLOCK_R, R, D, BLOCK_R, BLOCK_D)
    x = _load(X, rows, cols, stride_xr, mask)
    y = x * _rms_rstd(x, D, eps)[:, None] * _col_param(W, cols, D, HAS_W, 1.0)
    _store(Y, rows, cols, stride_yr, y, mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, DX, W, PART, R, D, rows_per_chunk, stride_dyr, stride_xr, eps,
    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = rstd·(dx̂ − x̂·mean(dx̂·x̂)), dx̂ = dy·w, for one chunk of rows; PART[c] = Σ dy·x̂
    over the chunk (dweight). Reads dy and x, writes dx and 4·D B: memory-bound."""
    c = tl.program_id(0).to(tl.int64)
    first = c * rows_per_chunk
    end = tl.minimum(first + rows_per_chunk, R)
    w = _col_param(W, tl.arange(0, BLOCK_D), D, HAS_W, 1.0)
    acc_dw = tl.zeros([BLOCK_D], tl.float32)
    for row0 in range(first, end, BLOCK_R):
        rows, cols, mask = _tile(row0, end, D, BLOCK_R, BLOCK_D)
        x = _load(X, rows, cols, stride_xr, mask)
        rstd = _rms_rstd(x, D, eps)
        xhat = x * rstd[:, None]
        dy = _load(DY, rows, cols, stride_dyr, mask)
        dxhat = dy * w
        c2 = tl.sum(dxhat * xhat, 1) / D
        _store(DX, rows, cols, D, rstd[:, None] * (dxhat - xhat * c2[:, None]), mask)
        acc_dw += tl.sum(dy * xhat, 0)
    cols = tl.arange(0, BLOCK_D)
    tl.store(PART + c * D + cols, acc_dw, mask=cols < D)


# ================================================================ launch geometry
def _block(R: int, D: int):
    """(BLOCK_R, BLOCK_D, num_warps): whole rows, ~_TILE elements per program."""
    block_d = triton.next_power_of_2(max(D, 1))
    block_r = max(1, min(_TILE // block_d, triton.next_power_of_2(max(R, 1))))
    num_warps = min(16, max(4, block_r * block_d // 512))
    return block_r, block_d, num_warps


def _chunks(x: torch.Tensor, groups: int, rows_per_group: int, block_r: int):
    """Rows per backward program (whole tiles) so that groups·chunks programs fill the device
    (≈ 4 per SM) while each still covers a few tiles; and the chunk count per group."""
    target = 4 * device_sms(x)
    per = max(block_r, triton.cdiv(rows_per_group, max(1, triton.cdiv(target, groups))))
    if not INTERPRET:
        per = max(per, 4 * block_r)  # fewer partial rows to sum afterwards
    per = triton.cdiv(per, block_r) * block_r
    return per, triton.cdiv(rows_per_group, per)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """t as [rows, D] with column stride 1 (a view when t's leading dims collapse, else a copy)."""
    t2 = t.reshape(-1, D)
    if D > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _mod_rows(m, D):
    """A modulation tensor as [M, D] rows and its row stride (a placeholder pair when absent)."""
    if m is None:
        return None, 0
    m2 = _rows(m, D)
    return m2, m2.stride(0)


# ================================================================ launchers
def _contiguous(t):
    return t.contiguous() if t is not None else None


@on_tensor_device
def layer_norm_fwd(x, weight=None, bias=None, eps=1e-6, activation=None, scale=None, shift=None,
                   out=None):
    """→ y, contiguous, x's shape and dtype (written into `out` when given: a contiguous tensor
    of x's shape and dtype). scale/shift: [N, D] with x [N, T, D], or x's shape."""
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    weight, bias = _contiguous(weight), _contiguous(bias)
    if x.numel() == 0:
        return y
    x2 = _rows(x, D)
    R = x2.shape[0]
    s2, ssr = _mod_rows(scale, D)
    t2, tsr = _mod_rows(shift, D)
    mod = s2 if s2 is not None else t2
    rows_per_mod = R // mod.shape[0] if mod is not None else 1
    block_r, block_d, num_warps = _block(R, D)
    dummy = x2
    _layer_norm_fwd_kernel[(triton.cdiv(R, block_r),)](
        x2, y, weight if weight is not None else dummy, bias if bias is not None else dummy,
        s2 if s2 is not None else dummy, t2 if t2 is not None else dummy,
        R, D, rows_per_mod, x2.stride(0), D, ssr, tsr, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=_ACTIVATIONS[activation],
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y


@on_tensor_device
def layer_norm_bwd(dy, x, weight=None, bias=None, eps=1e-6, activation=None, scale=None, shift=None):
    """→ (dx, dweight, dbias, dscale, dshift), each like its input (None where it was None).

    One kernel over (dy, x) (statistics recomputed), then fp32 column sums of the programs'
    partials in torch: dweight, dbias over all rows; dscale, dshift of an [N, D] modulation
    over each sample's rows."""
    D = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    weight, bias = _contiguous(weight), _contiguous(bias)
    x2, dy2 = _rows(x, D), _rows(dy, D)
    R = x2.shape[0]
    s2, ssr = _mod_rows(scale, D)
    t2, tsr = _mod_rows(shift, D)
    mod = s2 if s2 is not None else t2
    M = mod.shape[0] if mod is not None else 0
    per_row = mod is not None and M == R
    groups = M if (mod is not None and not per_row) else 1  # a group: the rows of one modulation row
    rows_per_group = R // groups if groups else 0
    dscale = torch.empty(scale.shape, dtype=scale.dtype, device=x.device) if per_row and scale is not None else None
    dshift = torch.empty(shift.shape, dtype=shift.dtype, device=x.device) if per_row and shift is not None else None
    block_r, block_d, num_warps = _block(rows_per_group, D)
    if x.numel() == 0:
        part = torch.zeros((max(groups, 1), 1, 4, D), dtype=torch.float32, device=x.device)
        if dscale is not None:
            dscale.zero_()
        if dshift is not None:
            dshift.zero_()
    else:
        per, num_chunks = _chunks(x2, groups, rows_per_group, block_r)
        part = torch.empty((groups, num_chunks, 4, D), dtype=torch.float32, device=x.device)
        dummy = x2
        _layer_norm_bwd_kernel[(groups, num_chunks)](
            dy2, x2, dx, weight if weight is not None else dummy, bias if bias is not None else dummy,
            s2 if s2 is not None else dummy, t2 if t2 is not None else dummy,
            dscale if dscale is not None else dummy, dshift if dshift is not None else dummy, part,
            R, D, R // M if M else 1, rows_per_group, per, num_chunks,
            dy2.stride(0), x2.stride(0), ssr, tsr, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, PER_ROW_MOD=per_row,
            ACT=_ACTIVATIONS[activation], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
        )
    dweight = part[:, :, 0].sum((0, 1)).to(weight.dtype) if weight is not None else None
    dbias = part[:, :, 1].sum((0, 1)).to(bias.dtype) if bias is not None else None
    if not per_row:
        if scale is not None:
            dscale = part[:, :, 2].sum(1).to(scale.dtype).reshape(scale.shape)
        if shift is not None:
            dshift = part[:, :, 3].sum(1).to(shift.dtype).reshape(shift.shape)
    return dx, dweight, dbias, dscale, dshift


@on_tensor_device
def rms_norm_fwd(x, weight=None, eps=1e-6, out=None):
    """→ y, contiguous, x's shape and dtype (into `out` when given, as layer_norm_fwd)."""
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    weight = _contiguous(weight)
    if x.numel() == 0:
        return y
    x2 = _rows(x, D)
    R = x2.shape[0]
    block_r, block_d, num_warps = _block(R, D)
    _rms_norm_fwd_kernel[(triton.cdiv(R, block_r),)](
        x2, y, weight if weight is not None else x2, R, D, x2.stride(0), D, float(eps),
        HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y


@on_tensor_device
def rms_norm_bwd(dy, x, weight=None, eps=1e-6):
    """→ (dx, dweight or None): one kernel over (dy, x), then the partials' column sum."""
    D = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    weight = _contiguous(weight)
    if x.numel() == 0:
        dw = torch.zeros(D, dtype=torch.float32, device=x.device)
    else:
        x2, dy2 = _rows(x, D), _rows(dy, D)
        R = x2.shape[0]
        block_r, block_d, num_warps = _block(R, D)
        per, num_chunks = _chunks(x2, 1, R, block_r)
        part = torch.empty((num_chunks, D), dtype=torch.float32, device=x.device)
        _rms_norm_bwd_kernel[(num_chunks,)](
            dy2, x2, dx, weight if weight is not None else x2, part, R, D, per,
            dy2.stride(0), x2.stride(0), float(eps),
            HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
        )
        dw = part.sum(0)
    return dx, (dw.to(weight.dtype) if weight is not None else None)
