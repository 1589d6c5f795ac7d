"""Group norm + per-sample modulation + activation, and its gradient.

    y = act(((x − mean)·rstd·w + b)·(1 + scale) + shift),   stats per (sample n, group g)

Vertical slice: kernels, then launchers. The math is `flashdiff.reference.group_norm`.

Layout: x [N, C, *spatial] (1-3 spatial dims) is addressed as [N, C, S] through three strides
(n, c, s), so NCHW-contiguous (s-stride 1) and channels_last (c-stride 1) share one kernel; the
compiler vectorizes along whichever stride is 1. y has x's memory format. A layout whose spatial
dims do not collapse to one stride is copied to contiguous first (the only copy), and y (dx) is
allocated like that copy: contiguous, as the reference's. weight, bias, scale and shift are read
through their strides (slices, expanded scalars: no copies, no extra launches).

Parallelism: at batch 1 a diffusion U-Net has N·G = 32 groups, far too few programs for a GPU
with 132 SMs. Each (n, g) is split along S into SPLIT chunks, one program each:
  pass 1  `_group_norm_stats_kernel`: per chunk (count, K, mean − K, M2), tile by tile with
          Chan's merge (numerically stable; never E[x²] − E[x]²) on values shifted by K, the
          chunk's first element, so that sums are of the size of the spread, not of |mean|
          (unshifted fp32 tile sums put a 1e4 + N(0, 1) group 5-40x past the tolerance
          rule); writes 16 B per chunk.
  pass 2  `_group_norm_fwd_kernel`: every program combines its group's SPLIT partials (exact
          parallel-variance formula, relative to chunk 0's K), folds the affine + modulation
          into y = act((x − mean)·A[n, c] + B[n, c]) and normalizes its chunk (x − mean first:
          the one-FMA form x·A + (B − mean·A) cancels to ~|x|·rstd·2⁻²⁴ when |mean| ≫ std).
Traffic: x read twice, y written once: 3 elements per element (6 B in bf16); the second read
often hits L2. Memory-bound: the roofline is HBM bandwidth / 3 elements.

One-pass variant (`group_norm_fwd_onepass`, dispatch name "triton:onepass"): for a group of at
most ONEPASS_MAX_ELEMENTS padded elements, one program per (n, g) reads the whole group into
registers once, takes its statistics there (shifted by K, two-pass over the registers) and
normalizes + stores: 2 elements per element (4 B in bf16), one launch, no partials. It trades
parallelism for traffic: N·G programs only (32 at batch 1 in a U-Net), so it wins where N·G
fills the device or the launch dominates (small groups, DiT's adaLN rows); `flashdiff tune`
times both. Larger groups fall back to the split path. Both paths share the tile, moments,
affine and activation helpers below.
"""
from __future__ import annotations

import functools
import math
import sys

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, device_sms, memory_format, ncs_strides

__all__ = ["group_norm_fwd", "group_norm_fwd_onepass", "group_norm_bwd", "onepass_fits", "on_tensor_device"]

_ACTIVATIONS = {None: 0, "none": 0, "silu": 1, "gelu": 2}

# CUDA's limit on grid dim x (programs along one axis); dims y and z stop at 65535.
MAX_GRID_X = 2**31 - 1


def on_tensor_device(launcher):
    """Run a launcher on its first argument's CUDA device: Triton launches on the current device
    and its current stream, so tensors on cuda:1 with cuda:0 current would be read from the
    wrong device. The guard costs nothing when the device is already current, and nothing on
    CPU tensors (interpreter). Shared by every launcher in this package but attention's."""
    @functools.wraps(launcher)
    def wrapper(t, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)

    wrapper.on_tensor_device = True  # tests check every launcher carries the guard
    return wrapper


# ================================================================ kernels
@triton.jit
def _apply_act(z, ACT: tl.constexpr):
    if ACT == 1:    # silu: z·sigmoid(z)
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 2:  # gelu, exact: z·Φ(z)
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz."""
    if ACT == 1:
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = sig * (1.0 + z * (1.0 - sig))
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        g = tl.full(z.shape, 1.0, tl.float32)
    return g


@triton.jit
def _program_chunk(G, S, S_PER_CHUNK):
    """This program's group pid_ng = n·G + g (n, g as int64), its chunk, and the chunk's S range."""
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = (pid_ng // G).to(tl.int64)
    g = (pid_ng % G).to(tl.int64)
    s_begin = chunk * S_PER_CHUNK
    s_end = tl.minimum(s_begin + S_PER_CHUNK, S)
    return pid_ng, chunk, n, g, s_begin, s_end


@triton.jit
def _s_tile(s0, s_end, c_valid, BLOCK_S: tl.constexpr):
    """Rows s0 .. s0 + BLOCK_S of a tile: their int64 offsets [BLOCK_S, 1] and the tile mask."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mask = (offs_s < s_end)[:, None] & c_valid[None, :]
    return offs_s[:, None].to(tl.int64), mask


@triton.jit
def _tile_offsets(s64, offs_c, stride_s, stride_c):
    """int64 element offsets of a tile: c·stride_c alone passes 2³¹ in an NCHW group of more
    than 2³¹ elements (stride_c = S), so both products are taken in int64."""
    return s64 * stride_s + offs_c[None, :].to(tl.int64) * stride_c


@triton.jit
def _load_raw(base, s64, offs_c, stride_s, stride_c, mask):
    """A [BLOCK_S, BLOCK_C] tile in x's own dtype, 0 outside the mask (a 16-bit tile takes
    half the registers of its fp32 conversion: what lets the one-pass kernel hold a group)."""
    return tl.load(base + _tile_offsets(s64, offs_c, stride_s, stride_c), mask=mask, other=0.0)


@triton.jit
def _load_tile(base, s64, offs_c, stride_s, stride_c, mask):
    """A [BLOCK_S, BLOCK_C] tile in fp32, 0 outside the mask."""
    return _load_raw(base, s64, offs_c, stride_s, stride_c, mask).to(tl.float32)


@triton.jit
def _store_tile(base, s64, offs_c, stride_s, stride_c, val, mask):
    """Store a tile, cast to the element type of base."""
    tl.store(base + _tile_offsets(s64, offs_c, stride_s, stride_c), val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _tile_moments(xk, mask, count):
    """(mean, M2) of the count valid elements of a tile xk already shifted by K (0 outside the
    mask), two-pass over registers: M2 = Σ (xk − mean)², never Σxk² − count·mean²."""
    mean = tl.sum(tl.sum(xk, 1), 0) / count
    d = tl.where(mask, xk - mean, 0.0)
    return mean, tl.sum(tl.sum(d * d, 1), 0)


@triton.jit
def _pre_act(x, mean, a, b):
    """z = (x − mean)·A + B (= ((x − mean)·rstd·w + b)·(1 + scale) + shift)."""
    return (x - mean) * a[None, :] + b[None, :]


@triton.jit
def _dz(dy, x, mean, a, b, ACT: tl.constexpr):
    """dz = dy·act'(z), z recomputed from x as the forward does; dy itself when ACT is none."""
    if ACT != 0:
        dy = dy * _act_grad(_pre_act(x, mean, a, b), ACT)
    return dy


@triton.jit
def _group_norm_stats_kernel(
    X, PART,
    stride_xn, stride_xc, stride_xs,
    S, G, Cg, S_PER_CHUNK, SPLIT,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 1: (count, K, mean − K, M2) of one chunk of one (n, g), K its first element.

    Reads Cg·S_PER_CHUNK elements once, writes 16 B: memory-bound (HBM roofline).
    """
    pid_ng, chunk, n, g, s_begin, s_end = _program_chunk(G, S, S_PER_CHUNK)
    base = X + n * stride_xn + g * Cg * stride_xc
    shift = tl.load(base + s_begin.to(tl.int64) * stride_xs).to(tl.float32)

    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < Cg
        n_c = tl.minimum(Cg - c0, BLOCK_C)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s64, mask = _s_tile(s0, s_end, c_valid, BLOCK_S)
            # read BLOCK_S·BLOCK_C elements (masked tail), accumulate in fp32
            x = tl.where(mask, _load_tile(base, s64, offs_c, stride_xs, stride_xc, mask) - shift, 0.0)
            nb = (tl.minimum(s_end - s0, BLOCK_S) * n_c).to(tl.float32)
            mb, m2b = _tile_moments(x, mask, nb)
            # Chan et al.: merge (count, mean, m2) with the tile's (nb, mb, m2b)
            total = count + nb
            delta = mb - mean
            frac = nb / total
            mean = mean + delta * frac
            m2 = m2 + m2b + delta * delta * count * frac
            count = total
    out = PART + (pid_ng.to(tl.int64) * SPLIT + chunk) * 4
    tl.store(out, count)
    tl.store(out + 1, shift)
    tl.store(out + 2, mean)
    tl.store(out + 3, m2)


@triton.jit
def _group_stats(PART, pid_ng, SPLIT, eps, BLOCK_SPLIT: tl.constexpr):
    """(mean, rstd) of one (n, g) from its SPLIT partials: exact parallel-variance combine
    M2 = Σ M2_i + Σ n_i·(mean_i − mean)², with the means taken relative to chunk 0's K."""
    offs = tl.arange(0, BLOCK_SPLIT)
    valid = offs < SPLIT
    part = PART + (pid_ng.to(tl.int64) * SPLIT + offs) * 4
    k0 = tl.load(PART + pid_ng.to(tl.int64) * SPLIT * 4 + 1)
    cnt = tl.load(part, mask=valid, other=0.0)
    rel = (tl.load(part + 1, mask=valid, other=0.0) - k0) + tl.load(part + 2, mask=valid, other=0.0)
    m2 = tl.load(part + 3, mask=valid, other=0.0)
    total = tl.sum(cnt, 0)
    mean_rel = tl.sum(cnt * rel, 0) / total
    d = tl.where(valid, rel - mean_rel, 0.0)
    var = (tl.sum(m2, 0) + tl.sum(cnt * d * d, 0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    return k0 + mean_rel, rstd


@triton.jit
def _fold_affine(W, B, SCALE, SHIFT, n, c, c_valid, rstd,
                 stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """A, B with act((x − mean)·A + B) = y, and k = 1 + scale, for channels c of sample n (fp32).
    Every parameter is read through its strides (a weight may be a slice or an expanded
    scalar: stride 2, stride 0); they are C or N·C elements, L1/L2-resident."""
    a = tl.full(c.shape, 1.0, tl.float32) * rstd
    if HAS_W:
        w = tl.load(W + c * stride_w, mask=c_valid, other=0.0).to(tl.float32)
        a = a * w
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    b = tl.zeros(c.shape, tl.float32)
    if HAS_B:
        b += tl.load(B + c * stride_b, mask=c_valid, other=0.0).to(tl.float32)
    k = tl.full(c.shape, 1.0, tl.float32)
    if HAS_SCALE:
        k += tl.load(SCALE + n * stride_scn + c * stride_scc, mask=c_valid, other=0.0).to(tl.float32)
        a = a * k
        b = b * k
    if HAS_SHIFT:
        b += tl.load(SHIFT + n * stride_shn + c * stride_shc, mask=c_valid, other=0.0).to(tl.float32)
    return a, b, w, k


@triton.jit
def _group_norm_fwd_kernel(
    X, Y, PART, W, B, SCALE, SHIFT, MEAN, RSTD,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    C, S, G, Cg, S_PER_CHUNK, SPLIT, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 2: combine the group's partials, then y = act(x·A[n, c] + B[n, c]) on one chunk.

    Reads 12·SPLIT B of partials and Cg·S_PER_CHUNK elements, writes as many: memory-bound.
    """
    pid_ng, chunk, n, g, s_begin, s_end = _program_chunk(G, S, S_PER_CHUNK)
    mean, rstd = _group_stats(PART, pid_ng, SPLIT, eps, BLOCK_SPLIT)
    if chunk == 0:
        tl.store(MEAN + pid_ng, mean)
        tl.store(RSTD + pid_ng, rstd)

    x_base = X + n * stride_xn + g * Cg * stride_xc
    y_base = Y + n * stride_yn + g * Cg * stride_yc
    for c0 in range(0, Cg, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < Cg
        a, b, w, k = _fold_affine(W, B, SCALE, SHIFT, n, g * Cg + offs_c, c_valid, rstd,
                                  stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s64, mask = _s_tile(s0, s_end, c_valid, BLOCK_S)
            x = _load_tile(x_base, s64, offs_c, stride_xs, stride_xc, mask)
            z = _apply_act(_pre_act(x, mean, a, b), ACT)
            _store_tile(y_base, s64, offs_c, stride_ys, stride_yc, z, mask)


@triton.jit
def _group_norm_onepass_kernel(
    X, Y, W, B, SCALE, SHIFT, MEAN, RSTD,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    S, G, Cg, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g): the whole group, [BLOCK_S, BLOCK_C] ≥ [S, Cg], is read once
    into registers (in x's dtype), then statistics (shifted two-pass over the registers),
    then normalize + affine + modulation + activation and the store.

    Reads Cg·S elements and writes as many (2 elements per element: 4 B in bf16, against 6 B
    for the split path), one launch instead of two, no partials. Memory-bound: the roofline
    is HBM bandwidth / 2 elements when N·G programs fill the device, otherwise the bandwidth
    N·G SMs can pull (one program per SM; a batch-1 U-Net has 32 groups for 132 SMs).
    """
    pid_ng, chunk, n, g, s_begin, s_end = _program_chunk(G, S, S)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < Cg
    s64, mask = _s_tile(0, S, c_valid, BLOCK_S)
    x_base = X + n * stride_xn + g * Cg * stride_xc
    xr = _load_raw(x_base, s64, offs_c, stride_xs, stride_xc, mask)   # the only read of x

    k0 = tl.load(x_base).to(tl.float32)       # K: |mean − K| ~ the spread, not |mean|
    count = Cg * S * 1.0  # not .to(): on a GPU, Cg = S = 1 (one-element groups) are constexpr ints
    mean_k, m2 = _tile_moments(tl.where(mask, xr.to(tl.float32) - k0, 0.0), mask, count)
    mean = k0 + mean_k
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(MEAN + pid_ng, mean)
    tl.store(RSTD + pid_ng, rstd)

    a, b, w, k = _fold_affine(W, B, SCALE, SHIFT, n, g * Cg + offs_c, c_valid, rstd,
                              stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
                              HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    z = _apply_act(_pre_act(xr.to(tl.float32), mean, a, b), ACT)
    y_base = Y + n * stride_yn + g * Cg * stride_yc
    _store_tile(y_base, s64, offs_c, stride_ys, stride_yc, z, mask)


@triton.jit
def _group_norm_bwd_reduce_kernel(
    DY, X, W, B, SCALE, SHIFT, MEAN, RSTD, PART_S1, PART_S2,
    stride_dyn, stride_dyc, stride_dys,
    stride_xn, stride_xc, stride_xs,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    C, S, G, Cg, S_PER_CHUNK, SPLIT,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward pass 1: per (n, c) and chunk, s1 = Σ_s dz and s2 = Σ_s dz·x̂, dz = dy·act'(z).

    Reads dy and x once (2 elements per element), writes 8 B per (n, c, chunk): memory-bound.
    """
    pid_ng, chunk, n, g, s_begin, s_end = _program_chunk(G, S, S_PER_CHUNK)
    mean = tl.load(MEAN + pid_ng)
    rstd = tl.load(RSTD + pid_ng)
    x_base = X + n * stride_xn + g * Cg * stride_xc
    dy_base = DY + n * stride_dyn + g * Cg * stride_dyc
    for c0 in range(0, Cg, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < Cg
        a, b, w, k = _fold_affine(W, B, SCALE, SHIFT, n, g * Cg + offs_c, c_valid, rstd,
                                  stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        s1 = tl.zeros([BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_C], tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s64, mask = _s_tile(s0, s_end, c_valid, BLOCK_S)
            x = _load_tile(x_base, s64, offs_c, stride_xs, stride_xc, mask)
            dz = _dz(_load_tile(dy_base, s64, offs_c, stride_dys, stride_dyc, mask), x, mean, a, b, ACT)
            s1 += tl.sum(dz, 0)
            s2 += tl.sum(dz * (x - mean) * rstd, 0)
        # PART_S1, PART_S2: [N, C, SPLIT] each, two pointers: one buffer [2, N, C, SPLIT] would
        # put s2 at N·C·SPLIT, an int32 product of the arguments that can pass 2^31
        idx = (n * C + g * Cg + offs_c) * SPLIT + chunk  # int64 (n is)
        tl.store(PART_S1 + idx, s1, mask=c_valid)
        tl.store(PART_S2 + idx, s2, mask=c_valid)


@triton.jit
def _group_norm_bwd_dx_kernel(
    DY, X, DX, W, B, SCALE, SHIFT, MEAN, RSTD, C1, C2,
    stride_dyn, stride_dyc, stride_dys,
    stride_xn, stride_xc, stride_xs,
    stride_dxn, stride_dxc, stride_dxs,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    S, G, Cg, S_PER_CHUNK,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward pass 2: dx = rstd·(dz·w·k − c1 − x̂·c2), c1/c2 = group means of dx̂ and dx̂·x̂.

    Reads dy and x, writes dx: 3 elements per element, memory-bound.
    """
    pid_ng, chunk, n, g, s_begin, s_end = _program_chunk(G, S, S_PER_CHUNK)
    mean = tl.load(MEAN + pid_ng)
    rstd = tl.load(RSTD + pid_ng)
    c1 = tl.load(C1 + pid_ng)
    c2 = tl.load(C2 + pid_ng)
    x_base = X + n * stride_xn + g * Cg * stride_xc
    dy_base = DY + n * stride_dyn + g * Cg * stride_dyc
    dx_base = DX + n * stride_dxn + g * Cg * stride_dxc
    for c0 in range(0, Cg, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < Cg
        a, b, w, k = _fold_affine(W, B, SCALE, SHIFT, n, g * Cg + offs_c, c_valid, rstd,
                                  stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        wk = w * k
        for s0 in range(s_begin, s_end, BLOCK_S):
            s64, mask = _s_tile(s0, s_end, c_valid, BLOCK_S)
            x = _load_tile(x_base, s64, offs_c, stride_xs, stride_xc, mask)
            dz = _dz(_load_tile(dy_base, s64, offs_c, stride_dys, stride_dyc, mask), x, mean, a, b, ACT)
            xhat = (x - mean) * rstd
            dx = rstd * (dz * wk[None, :] - c1 - xhat * c2)
            _store_tile(dx_base, s64, offs_c, stride_dxs, stride_dxc, dx, mask)


# ================================================================ launch geometry
def _geometry(x: torch.Tensor, NG: int, Cg: int, S: int):
    """Tile (BLOCK_C, BLOCK_S) and split of S into chunks, so that N·G·SPLIT programs fill the
    device (≈ 4 per SM) while each still moves enough bytes to hide its launch."""
    block_c = min(triton.next_power_of_2(Cg), 64)
    tile = 256 if INTERPRET else 2048                    # elements per tile (registers)
    block_s = max(1, min(tile // block_c, triton.next_power_of_2(S)))
    target = 4 * device_sms(x)
    min_elems = 64 if INTERPRET else 4096                # per program: ≥ 8 KB of bf16
    s_per = max(triton.cdiv(S, max(1, triton.cdiv(target, NG))), triton.cdiv(min_elems, Cg))
    s_per = triton.cdiv(s_per, block_s) * block_s        # whole tiles per chunk
    split = triton.cdiv(S, s_per)
    if split > 1024:                                     # cap the partials one program combines
        s_per = triton.cdiv(triton.cdiv(S, 1024), block_s) * block_s
        split = triton.cdiv(S, s_per)
    return block_c, block_s, s_per, split


def _onepass_geometry(Cg: int, S: int):
    """(BLOCK_C, BLOCK_S, num_warps) of the one-pass kernel, or None when the group does not
    fit: its padded tile [next_pow2(S), next_pow2(Cg)] is spread over the program's threads at
    ONEPASS_ELEMS_PER_THREAD each (4 warps at least, so a small group still has a full load
    front), at most ONEPASS_MAX_WARPS."""
    block_c, block_s = triton.next_power_of_2(Cg), triton.next_power_of_2(S)
    padded = block_c * block_s
    if padded > ONEPASS_MAX_ELEMENTS:
        return None
    num_warps = min(ONEPASS_MAX_WARPS, max(4, padded // (32 * ONEPASS_ELEMS_PER_THREAD)))
    return block_c, block_s, num_warps


# One-pass fit limit, from the register budget (the group lives in registers; Triton gives no
# explicit shared-memory buffer, and the reductions already use smem as scratch). A program of
# 32 warps (1024 threads) gets 65 536 / 1024 = 64 registers per thread. Per element a thread
# keeps about 3-4 registers live from the load to the store: the value in fp32 (or packed 16-bit
# plus its fp32 conversion), its int64 address and its mask. 16 elements per thread fit: sm_90
# compiles (triton 3.9 and its ptxas) of fp32/fp16/bf16 × NCHW/channels_last × none/gelu at
# 16 384 padded elements take 58-64 registers and no stack, except channels_last with Cg not a
# multiple of 16 (no vector loads: alignment unproven), 24-32 B of stack (L1-resident); 32 768
# padded elements spill 56-440 B at 32 warps (8-240 B at 16 warps with 128 registers each).
# So at most 32·32·16 = 16 384 padded elements:
# SD 1.5's 1280@16² and 1280@8² (G32: Cg 40 → 64 × 256 / 64), the decoder's 1920@16² and
# 2560@8², DiT adaLN ([N·T, 1152, 1], G1: 2048); not 320@64² (Cg 10 → 16 × 4096 = 65 536),
# 640@32² (32 768) nor any SDXL 1024 px group (split statistics there).
ONEPASS_ELEMS_PER_THREAD = 16
ONEPASS_MAX_WARPS = 32
ONEPASS_MAX_ELEMENTS = ONEPASS_MAX_WARPS * 32 * ONEPASS_ELEMS_PER_THREAD


def onepass_fits(x: torch.Tensor, num_groups: int) -> bool:
    """Whether group_norm_fwd_onepass runs its own kernel on x (else it is group_norm_fwd)."""
    Cg = x.shape[1] // int(num_groups)
    return _onepass_geometry(Cg, math.prod(x.shape[2:])) is not None


def _ncs(t: torch.Tensor, fmt):
    """t and its (n, c, s) strides; copies only layouts that do not collapse to [N, C, S]."""
    strides = ncs_strides(t)
    if strides is None:
        t = t.contiguous(memory_format=fmt)
        strides = ncs_strides(t)
    return t, strides


def _new_empty(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """torch.empty_like(like) (or like.new_empty), NaN-filled while the tests poison outputs
    (flashdiff.testing.poisoned_outputs), so an element a kernel never writes shows up. Read
    from flashdiff only when it is loaded: this package imports without flashdiff."""
    out = torch.empty_like(like) if shape is None else like.new_empty(shape, dtype=dtype)
    common = sys.modules.get("flashdiff.ops._common")
    if common is not None and common.POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _param_strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _params(dummy, weight, bias, scale, shift):
    """The four parameter tensors (dummy where None), their strides in the kernels' order
    (w, b, scale n/c, shift n/c) and the HAS_* flags. Parameters are read through their
    strides (no copies: a cast or a .contiguous() would be one more launch, ~2-4 µs)."""
    tensors = tuple(t if t is not None else dummy for t in (weight, bias, scale, shift))
    strides = (weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
               *_param_strides(scale), *_param_strides(shift))
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None)
    return tensors, strides, flags


def _fwd_outputs(x, G: int, eps: float):
    """(x as the kernels read it, its (n, c, s) strides, y, y's strides, mean, rstd, launch).

    x is copied only when its spatial dims do not collapse into one stride, and y is allocated
    after that copy, like the tensor the kernels read: empty_like keeps a dense layout's
    strides, which for such an x are not [N, C, S]-addressable (allocated from x itself they
    crashed the launch). So y has x's memory format when x is dense and collapsible
    (contiguous, channels_last(_3d)), else it is contiguous, as the reference's.
    launch is False when there is nothing to normalize (the stats are then final)."""
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    x, xs = _ncs(x, memory_format(x))
    y = _new_empty(x)
    mean = _new_empty(x, (N, G), torch.float32)
    rstd = _new_empty(x, (N, G), torch.float32)
    launch = N * G > 0 and C * S > 0
    if N * G > 0 and C * S == 0:  # empty groups: variance 0 by convention
        mean.zero_()
        rstd.fill_(1.0 / math.sqrt(eps))
    return x, xs, y, ncs_strides(y), mean, rstd, launch


# ================================================================ launchers
@on_tensor_device
def group_norm_fwd(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None,
                   scale=None, shift=None):
    """→ (y in x's memory format (contiguous when x's spatial dims do not collapse),
    mean fp32 [N, G], rstd fp32 [N, G]). Split statistics: two launches, 3 elements of
    traffic per element (module docstring)."""
    N, C = x.shape[:2]
    G = int(num_groups)
    Cg = C // G
    S = math.prod(x.shape[2:])
    x, xs, y, ys, mean, rstd, launch = _fwd_outputs(x, G, eps)
    if not launch:
        return y, mean, rstd
    block_c, block_s, s_per, split = _geometry(x, N * G, Cg, S)
    part = torch.empty((N * G, split, 4), dtype=torch.float32, device=x.device)
    grid = (N * G, split)
    _group_norm_stats_kernel[grid](
        x, part, *xs, S, G, Cg, s_per, split, BLOCK_C=block_c, BLOCK_S=block_s,
    )
    params, pstrides, flags = _params(mean, weight, bias, scale, shift)
    _group_norm_fwd_kernel[grid](
        x, y, part, *params, mean, rstd, *xs, *ys, *pstrides,
        C, S, G, Cg, s_per, split, float(eps), **flags, ACT=_ACTIVATIONS[activation],
        BLOCK_SPLIT=max(2, triton.next_power_of_2(split)), BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return y, mean, rstd


@on_tensor_device
def group_norm_fwd_onepass(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None,
                           scale=None, shift=None):
    """group_norm_fwd with one program per (n, g) holding its group in registers: one launch,
    x read once (2 elements of traffic per element instead of 3). Groups over
    ONEPASS_MAX_ELEMENTS padded elements go to group_norm_fwd (same results, same layouts)."""
    N, C = x.shape[:2]
    G = int(num_groups)
    Cg = C // G
    S = math.prod(x.shape[2:])
    geometry = _onepass_geometry(Cg, S)
    if geometry is None:
        return group_norm_fwd(x, G, weight, bias, eps, activation, scale, shift)
    block_c, block_s, num_warps = geometry
    x, xs, y, ys, mean, rstd, launch = _fwd_outputs(x, G, eps)
    if not launch:
        return y, mean, rstd
    params, pstrides, flags = _params(mean, weight, bias, scale, shift)
    _group_norm_onepass_kernel[(N * G,)](
        x, y, *params, mean, rstd, *xs, *ys, *pstrides, S, G, Cg, float(eps),
        **flags, ACT=_ACTIVATIONS[activation], BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    return y, mean, rstd


@on_tensor_device
def group_norm_bwd(dy, x, num_groups, weight=None, bias=None, eps=1e-5, activation=None,
                   scale=None, shift=None, mean=None, rstd=None):
    """→ (dx, dweight, dbias, dscale, dshift); None where the input was None.

    Two passes over (dy, x) plus a few [N, C]-sized torch reductions in fp32 between them
    (the per-channel sums s1 = Σ dz, s2 = Σ dz·x̂ turn into every parameter gradient):
      dshift = s1, dscale = w·s2 + b·s1, dbias = Σ_n k·s1, dweight = Σ_n k·s2   (k = 1 + scale)
    """
    N, C = x.shape[:2]
    G = int(num_groups)
    Cg = C // G
    S = math.prod(x.shape[2:])
    fmt = memory_format(x)
    if mean is None or rstd is None:
        _, mean, rstd = group_norm_fwd(x, G, weight, bias, eps, activation, scale, shift)
    mean = mean.float().contiguous()
    rstd = rstd.float().contiguous()
    x, xs = _ncs(x, fmt)
    dy, dys = _ncs(dy, fmt)
    dx = _new_empty(x)  # after the copy, as y in _fwd_outputs: [N, C, S]-addressable
    dxs = ncs_strides(dx)
    if x.numel() == 0:
        s1 = s2 = torch.zeros((N, C), dtype=torch.float32, device=x.device)
    else:
        block_c, block_s, s_per, split = _geometry(x, N * G, Cg, S)
        part = torch.empty((2, N, C, split), dtype=torch.float32, device=x.device)
        params, pstrides, flags = _params(mean, weight, bias, scale, shift)
        flags.update(ACT=_ACTIVATIONS[activation], BLOCK_C=block_c, BLOCK_S=block_s)
        _group_norm_bwd_reduce_kernel[(N * G, split)](
            dy, x, *params, mean, rstd, part[0], part[1], *dys, *xs, *pstrides,
            C, S, G, Cg, s_per, split, **flags,
        )
        s1, s2 = part.sum(-1)  # [N, C] each, fp32
    w = weight.float() if weight is not None else torch.ones(C, device=x.device)
    k = 1.0 + scale.float() if scale is not None else torch.ones((N, C), device=x.device)
    wk = w * k
    count = float(max(Cg * S, 1))
    c1 = (wk * s1).reshape(N, G, Cg).sum(-1).div_(count).contiguous()   # mean of dx̂ per group
    c2 = (wk * s2).reshape(N, G, Cg).sum(-1).div_(count).contiguous()   # mean of dx̂·x̂
    if x.numel() > 0:
        _group_norm_bwd_dx_kernel[(N * G, split)](
            dy, x, dx, *params, mean, rstd, c1, c2, *dys, *xs, *dxs, *pstrides,
            S, G, Cg, s_per, **flags,
        )
    dweight = (k * s2).sum(0).to(weight.dtype) if weight is not None else None
    dbias = (k * s1).sum(0).to(bias.dtype) if bias is not None else None
    dscale = None
    if scale is not None:
        ds = w * s2
        if bias is not None:
            ds = ds + bias.float() * s1
        dscale = ds.to(scale.dtype)
    dshift = s1.to(shift.dtype) if shift is not None else None
    return dx, dweight, dbias, dscale, dshift
