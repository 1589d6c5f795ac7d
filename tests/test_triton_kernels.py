"""Triton launchers (flashdiff.triton_kernels) against flashdiff.reference.

Runs on a GPU when one is present; otherwise on the CPU through triton's interpreter
(TRITON_INTERPRET=1, set below before triton is imported). The same tests run in both places.
Tolerance (DESIGN.md): max|y − ref| ≤ 2·max|y_torch_d − ref| + atol_d, ref = reference in
float64, y_torch_d = reference run in dtype d; NaN only where the reference has NaN.
"""
import itertools
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
pytest.importorskip("triton")

try:
    from flashdiff import reference
except ImportError:  # not installed: run from the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    from flashdiff import reference
try:
    from flashdiff.triton_kernels import _utils as tk_utils
    from flashdiff.triton_kernels import attention as tk_attention
    from flashdiff.triton_kernels import group_norm as tk_group_norm
    from flashdiff.triton_kernels import scheduler as tk_scheduler
except ImportError:  # package not installed yet: import the source folder
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from triton_kernels import _utils as tk_utils
    from triton_kernels import attention as tk_attention
    from triton_kernels import group_norm as tk_group_norm
    from triton_kernels import scheduler as tk_scheduler

if not torch.cuda.is_available() and not tk_utils.INTERPRET:
    pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 could be set "
                "(run this file alone or set TRITON_INTERPRET=1 in the environment)",
                allow_module_level=True)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(scope="module")
def device():
    """The one place the device is chosen: the GPU when present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- helpers
def poison_allocator(device, *shapes_dtypes):
    """Leave NaN-filled freed blocks of the outputs' sizes behind, so that outputs the launcher
    allocates next likely reuse them and an unwritten element shows up as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=d, device=device) for s, d in shapes_dtypes]
    del blocks


def assert_within(name, y, ref, y_torch, dtype):
    """DESIGN.md's rule, with a message saying where it failed."""
    assert y.shape == ref.shape, f"{name}: shape {tuple(y.shape)} != reference {tuple(ref.shape)}"
    y64, ref64 = y.double(), ref.double()
    nan_y, nan_ref = torch.isnan(y64), torch.isnan(ref64)
    if not torch.equal(nan_y, nan_ref):
        idx = (nan_y != nan_ref).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN pattern differs from the reference, first at {idx}: "
                             f"y={y64[tuple(idx)].item()} ref={ref64[tuple(idx)].item()} "
                             f"({int((nan_y & ~nan_ref).sum())} unexpected NaN)")
    inf_y, inf_ref = torch.isinf(y64), torch.isinf(ref64)
    assert torch.equal(inf_y, inf_ref), f"{name}: inf pattern differs from the reference"
    finite = ~(nan_ref | inf_ref)
    err = torch.where(finite, (y64 - ref64).abs(), torch.zeros_like(y64))
    torch_err = torch.where(finite, (y_torch.double() - ref64).abs(), torch.zeros_like(y64)).max().item()
    bound = 2 * torch_err + ATOL[dtype]
    worst = err.max().item() if err.numel() else 0.0
    if worst > bound:
        flat = err.flatten().argmax().item()
        where = [int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)]
        raise AssertionError(
            f"{name} [{dtype}]: max|y - ref| = {worst:.3e} > bound {bound:.3e} "
            f"(2 x torch-{dtype} error {torch_err:.3e} + atol {ATOL[dtype]:.0e}); worst at {where}: "
            f"y={y64.flatten()[flat].item():.6g} ref={ref64.flatten()[flat].item():.6g}; "
            f"{int((err > bound).sum())} of {err.numel()} elements out")


# ================================================================ attention
# (label, B, H, Sq, Skv, D); the interpreter's blocks are 32 x 32, the GPU's 64..128.
ATTN_SHAPES = [
    ("d64", 2, 2, 64, 64, 64),
    ("d128 Sq!=Skv", 1, 2, 33, 40, 128),
    ("d40 Sq=37 Skv=77", 2, 2, 37, 77, 40),
    ("d72 Skv<Sq", 1, 2, 33, 17, 72),
    ("d80", 2, 1, 20, 45, 80),
    ("d160", 1, 1, 16, 33, 160),
    ("d256", 1, 1, 17, 24, 256),
    ("d16 tiny", 1, 1, 5, 3, 16),
    ("one past a block", 1, 1, 33, 65, 32),
    ("one past a GPU block", 1, 1, 129, 65, 64),
]


def _attn_inputs(B, H, Sq, Skv, D, dtype, device):
    q = torch.randn(B, H, Sq, D, device=device).to(dtype)
    k = torch.randn(B, H, Skv, D, device=device).to(dtype)
    v = torch.randn(B, H, Skv, D, device=device).to(dtype)
    return q, k, v


def _check_attention(q, k, v, mask, scale, dtype, device, label):
    B, H, Sq, D = q.shape
    poison_allocator(device, ((B, H, Sq, D), dtype), ((B, H, Sq), torch.float32))
    o, lse = tk_attention.attention_fwd(q, k, v, key_padding_mask=mask, scale=scale)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    m4 = None if mask is None else mask[:, None, None, :]
    ref = reference.attention(q, k, v, m4, scale=scale, upcast=True)
    ref_d = reference.attention(q, k, v, m4, scale=scale, upcast=False)
    assert_within(f"attention {label}", o, ref, ref_d, dtype)
    # lse: natural-log logsumexp of the scaled, masked scores; +inf where no key is attended
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * s
    if mask is not None:
        scores = scores.masked_fill(~m4, float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref_lse = torch.where(torch.isneginf(ref_lse), torch.full_like(ref_lse, float("inf")), ref_lse)
    assert_within(f"lse {label}", lse, ref_lse, ref_lse, torch.float32)
    return o, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("label,B,H,Sq,Skv,D", ATTN_SHAPES, ids=[s[0] for s in ATTN_SHAPES])
def test_attention_fwd(label, B, H, Sq, Skv, D, dtype, device):
    q, k, v = _attn_inputs(B, H, Sq, Skv, D, dtype, device)
    _check_attention(q, k, v, None, None, dtype, device, label)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_fwd_key_padding_mask(dtype, device):
    """Random padding, plus batch 0 fully masked: its rows must be 0 (not NaN), lse +inf."""
    B, H, Sq, Skv, D = 3, 2, 37, 77, 64
    q, k, v = _attn_inputs(B, H, Sq, Skv, D, dtype, device)
    mask = torch.rand(B, Skv, device=device) > 0.4
    mask[0] = False
    mask[2, 33:] = False  # a padded tail, as in a batch of prompts of different lengths
    o, lse = _check_attention(q, k, v, mask, None, dtype, device, "key padding")
    assert torch.all(o[0] == 0) and torch.all(torch.isposinf(lse[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [40, 64], ids=["d40", "d64"])
def test_attention_fwd_strided_fused_qkv(D, dtype, device):
    """q, k, v as views of a fused qkv [B, S, 3, H, D] (the usual projection output), a
    strided key-padding mask and a non-default scale: nothing may be copied or misread."""
    B, S, H = 2, 45, 3
    qkv = torch.randn(B, S, 3, H, D, device=device).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, D], stride_s = 3·H·D
    assert not q.is_contiguous()
    mask_full = torch.rand(B, 2 * S, device=device) > 0.3
    mask = mask_full[:, ::2]  # stride 2 along keys
    _check_attention(q, k, v, mask, 0.3, dtype, device, f"fused qkv d{D}")


# (label, B, H, Sq, Skv, D, masked)
ATTN_BWD_SHAPES = [
    ("d40 Sq=37 Skv=77 masked", 2, 2, 37, 77, 40, True),
    ("d64 one past a block", 1, 1, 33, 33, 64, False),
    ("d160 Sq!=Skv", 1, 2, 16, 20, 160, False),
    ("d80 masked", 2, 1, 20, 45, 80, True),
]


def _attention_bwd_check(q, k, v, mask, dtype, device, label):
    B, H, Sq, D = q.shape
    do = torch.randn(B, H, Sq, D, device=device).to(dtype)
    o, lse = tk_attention.attention_fwd(q, k, v, key_padding_mask=mask)
    poison_allocator(device, ((B, H, Sq, D), dtype), (tuple(k.shape), dtype))
    dq, dk, dv = tk_attention.attention_bwd(do, q, k, v, o, lse, key_padding_mask=mask)
    m4 = None if mask is None else mask[:, None, None, :]

    def grads(upcast):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = reference.attention(*leaves, m4, upcast=upcast)
        out.backward(do.to(out.dtype))
        return [t.grad for t in leaves]

    refs, refs_d = grads(True), grads(False)
    for name, y, r, rd in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, refs_d):
        assert y.dtype == dtype
        assert_within(f"attention bwd {label} {name}", y, r, rd, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("label,B,H,Sq,Skv,D,masked", ATTN_BWD_SHAPES, ids=[s[0] for s in ATTN_BWD_SHAPES])
def test_attention_bwd(label, B, H, Sq, Skv, D, masked, dtype, device):
    q, k, v = _attn_inputs(B, H, Sq, Skv, D, dtype, device)
    mask = None
    if masked:
        mask = torch.rand(B, Skv, device=device) > 0.4
        mask[0] = False  # a fully masked batch: its gradients are exactly 0
    _attention_bwd_check(q, k, v, mask, dtype, device, label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_bwd_strided_fused_qkv(dtype, device):
    B, S, H, D = 1, 35, 2, 72
    qkv = torch.randn(B, S, 3, H, D, device=device).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _attention_bwd_check(q, k, v, None, dtype, device, "fused qkv d72")


def test_attention_empty(device):
    q = torch.randn(2, 2, 0, 64, device=device)
    k = torch.randn(2, 2, 5, 64, device=device)
    o, lse = tk_attention.attention_fwd(q, k, k)
    assert o.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0)
    q = torch.randn(1, 2, 3, 64, device=device)
    k = torch.randn(1, 2, 0, 64, device=device)
    o, lse = tk_attention.attention_fwd(q, k, k)  # no key at all: zeros, like a fully masked row
    assert torch.all(o == 0) and torch.all(torch.isposinf(lse))


# ================================================================ group norm
# (label, shape, G, memory format); activation / affine / modulation vary per case below.
GN_SHAPES = [
    ("C30 G5 prime spatial", (2, 30, 7, 11), 5, "contiguous"),
    ("C30 G5 channels_last", (2, 30, 7, 11), 5, "channels_last"),
    ("batch 1 prime 13x17", (1, 32, 13, 17), 8, "contiguous"),
    ("batch 1 channels_last", (1, 32, 13, 17), 8, "channels_last"),
    ("3-D spatial", (2, 12, 3, 5, 7), 3, "contiguous"),
    ("3-D channels_last_3d", (2, 12, 3, 5, 7), 3, "channels_last"),
    ("1-D spatial", (2, 16, 37), 4, "contiguous"),
    ("Cg=80 > channel block", (1, 160, 5, 3), 2, "channels_last"),
    ("batch 1 few groups: split along S", (1, 8, 48, 48), 2, "contiguous"),
    ("single element per group", (3, 4, 1, 1), 4, "contiguous"),
]
# (activation, affine, modulation): every combination is met across shapes x dtypes
GN_VARIANTS = list(itertools.product([None, "silu", "gelu"], [True, False], [True, False]))


def _gn_inputs(shape, G, fmt, dtype, device, variant_index):
    activation, affine, modulation = GN_VARIANTS[variant_index % len(GN_VARIANTS)]
    N, C = shape[:2]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    weight = torch.randn(C, device=device) if affine else None
    bias = torch.randn(C, device=device) if affine else None
    scale = 0.5 * torch.randn(N, C, device=device) if modulation else None
    shift = torch.randn(N, C, device=device) if modulation else None
    return x, dict(weight=weight, bias=bias, eps=1e-5, activation=activation, scale=scale, shift=shift)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(GN_SHAPES)), ids=[s[0] for s in GN_SHAPES])
def test_group_norm_fwd(case, dtype, device):
    label, shape, G, fmt = GN_SHAPES[case]
    x, kw = _gn_inputs(shape, G, fmt, dtype, device, case + 3 * DTYPES.index(dtype))
    poison_allocator(device, (shape, dtype), ((shape[0], G), torch.float32))
    y, mean, rstd = tk_group_norm.group_norm_fwd(x, G, kw["weight"], kw["bias"], kw["eps"],
                                                 kw["activation"], kw["scale"], kw["shift"])
    ref = reference.group_norm(x, G, **kw, upcast=True)
    ref_d = reference.group_norm(x, G, **kw, upcast=False)
    assert y.dtype == dtype and y.stride() == ref.stride(), f"{label}: y must keep x's memory format"
    assert_within(f"group_norm {label} {kw['activation']}", y, ref, ref_d, dtype)
    xg = x.double().reshape(shape[0], G, -1)
    ref_mean = xg.mean(-1)
    ref_rstd = torch.rsqrt(xg.var(-1, unbiased=False) + kw["eps"])
    assert mean.shape == (shape[0], G) and rstd.shape == (shape[0], G)
    assert_within("group_norm mean", mean, ref_mean, ref_mean, torch.float32)
    assert torch.allclose(rstd.double(), ref_rstd, rtol=1e-5, atol=0), "group_norm rstd"


def test_group_norm_splits_along_s(device):
    """The batch-1 case must really be split over several programs per group (pass 1 + merge)."""
    x = torch.empty(1, 8, 48, 48, device=device)
    *_, split = tk_group_norm._geometry(x, 2, 4, 48 * 48)
    assert split > 1


def test_group_norm_stable_with_large_mean(device):
    """mean ≫ std: E[x²] − E[x]² would cancel catastrophically in fp32; Welford/Chan does not."""
    x = (1000.0 + 0.01 * torch.randn(1, 8, 31, 29, device=device)).float()
    y, mean, rstd = tk_group_norm.group_norm_fwd(x, 2, None, None, 1e-6, None, None, None)
    xg = x.double().reshape(1, 2, -1)
    ref_rstd = torch.rsqrt(xg.var(-1, unbiased=False) + 1e-6)
    assert torch.allclose(rstd.double(), ref_rstd, rtol=2e-3), (rstd, ref_rstd)


GN_BWD_CASES = [
    ("C30 G5 prime, silu, affine + modulation", (2, 30, 7, 11), 5, "contiguous", "silu", True, True),
    ("channels_last, gelu, modulation only", (1, 32, 13, 17), 8, "channels_last", "gelu", False, True),
    ("3-D, no activation, affine only", (2, 12, 3, 5, 7), 3, "channels_last", None, True, False),
    ("1-D, gelu, bare", (2, 16, 37), 4, "contiguous", "gelu", False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GN_BWD_CASES, ids=[c[0] for c in GN_BWD_CASES])
def test_group_norm_bwd(case, dtype, device):
    label, shape, G, fmt, activation, affine, modulation = case
    N, C = shape[:2]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    params = dict(
        weight=torch.randn(C, device=device) if affine else None,
        bias=torch.randn(C, device=device) if affine else None,
        scale=0.5 * torch.randn(N, C, device=device) if modulation else None,
        shift=torch.randn(N, C, device=device) if modulation else None,
    )
    dy = torch.randn(shape, device=device).to(dtype)  # contiguous even when x is channels_last
    _, mean, rstd = tk_group_norm.group_norm_fwd(x, G, params["weight"], params["bias"], 1e-5,
                                                 activation, params["scale"], params["shift"])
    poison_allocator(device, (shape, dtype))
    grads = tk_group_norm.group_norm_bwd(dy, x, G, params["weight"], params["bias"], 1e-5, activation,
                                         params["scale"], params["shift"], mean, rstd)

    def ref_grads(upcast):
        xx = x.detach().clone().requires_grad_()
        ps = {k: (p.detach().clone().requires_grad_() if p is not None else None) for k, p in params.items()}
        out = reference.group_norm(xx, G, eps=1e-5, activation=activation, upcast=upcast, **ps)
        out.backward(dy.to(out.dtype))
        return [xx.grad] + [ps[k].grad if ps[k] is not None else None
                            for k in ("weight", "bias", "scale", "shift")]

    refs, refs_d = ref_grads(True), ref_grads(False)
    assert grads[0].stride() == x.stride(), "dx must keep x's memory format"
    for name, g, r, rd in zip(("dx", "dweight", "dbias", "dscale", "dshift"), grads, refs, refs_d):
        if r is None:
            assert g is None, f"{name} must be None when its input was None"
            continue
        # parameter gradients are fp32 (as the parameters); the bound is still dtype d's,
        # since they are computed from dtype-d activations
        assert_within(f"group_norm bwd {label} {name}", g, r, rd, dtype)


# ================================================================ scheduler
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("has_uncond,has_noise,has_prev_x0,return_x0",
                         list(itertools.product([False, True], repeat=4)),
                         ids=lambda v: "T" if v else "F")
def test_scheduler_update(has_uncond, has_noise, has_prev_x0, return_x0, dtype, device):
    # a prime-sized channels_last tensor: dense, not contiguous, numel not a block multiple
    shape = (2, 3, 17, 13)

    def t():
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)

    x, c = t(), t()
    u = t() if has_uncond else None
    noise = t() if has_noise else None
    prev_x0 = t() if has_prev_x0 else None
    coefs = torch.randn(12, dtype=torch.float64, device=device)
    coefs[reference.SCHED_COEF_NAMES.index("clip")] = 1.5  # the clamp engages on some elements
    c[1, 2, 5, 7] = float("nan")  # clamp must keep NaN (NaN in x0 -> NaN in prev)
    poison_allocator(device, (shape, dtype), (shape, dtype))
    prev, x0 = tk_scheduler.scheduler_update(x, c, coefs, u, noise, prev_x0, return_x0)
    ref_prev, ref_x0 = reference.scheduler_update(x, c, coefs, u, noise, prev_x0, upcast=True)
    d_prev, d_x0 = reference.scheduler_update(x, c, coefs, u, noise, prev_x0, upcast=False)
    assert prev.dtype == dtype and prev.stride() == x.stride()
    assert_within("scheduler prev", prev, ref_prev, d_prev, dtype)
    if return_x0:
        assert x0.dtype == dtype and x0.stride() == x.stride()
        assert_within("scheduler x0", x0, ref_x0, d_x0, dtype)
    else:
        assert x0 is None


def test_scheduler_clip_infinite_and_fp32_coefs(device):
    """clip = +inf (no clipping) and coefficients already fp32, on a 1-element tensor."""
    x = torch.randn(1, device=device)
    c = torch.randn(1, device=device)
    coefs = torch.randn(12, device=device)
    coefs[reference.SCHED_COEF_NAMES.index("clip")] = float("inf")
    prev, x0 = tk_scheduler.scheduler_update(x, c, coefs, return_x0=True)
    ref_prev, ref_x0 = reference.scheduler_update(x, c, coefs)
    assert_within("scheduler prev", prev, ref_prev, ref_prev.float(), torch.float32)
    assert_within("scheduler x0", x0, ref_x0, ref_x0.float(), torch.float32)


def test_scheduler_empty(device):
    x = torch.randn(0, 4, device=device)
    prev, x0 = tk_scheduler.scheduler_update(x, x, torch.zeros(12, device=device), return_x0=True)
    assert prev.shape == (0, 4) and x0.shape == (0, 4)
