"""attention(..., return_lse=True) and merge_attention against flashdiff.reference.

lse is fp32 [B, H, Sq], natural log, -inf on a keyless row (whose output is 0). It is checked
with DESIGN.md's rule (flashdiff.testing.assert_close) on its finite entries, with lse computed
by the reference in float64 (ref) and in the input dtype (the rule's "torch in dtype d" term;
for fp32 inputs the bound is then ~1e-5 absolute at |lse| ~ 3-5, i.e. ~1e-5 relative).
Triton runs in its interpreter without a GPU: shapes stay tiny (blocks are 32 × 32 there).
"""
import importlib

import pytest
import torch

import flashdiff
from flashdiff import reference
from flashdiff.testing import assert_close, poisoned_outputs

from conftest import DEVICE_BACKENDS, DTYPE_IDS, DTYPES, require_backend

ops_attention = importlib.import_module("flashdiff.ops.attention")
ops_merge = importlib.import_module("flashdiff.ops.merge_attention")


def _qkv(B, H, Sq, Skv, D, dtype, device="cpu"):
    return tuple(torch.randn(B, H, s, D, device=device).to(dtype) for s in (Sq, Skv, Skv))


def _skip_unserved(backend, dtype):
    """The CUDA kernels take fp16/bf16 only (test_attention.py checks the refusal)."""
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda backend declines fp32 (checked in test_attention.py)")


def _check_lse(lse, q, k, v, mask, label, scale=None):
    """lse against the float64 reference: same -inf rows, the rule on the finite ones."""
    ref = reference.attention_lse(q, k, v, mask, scale, upcast=True)[1]
    ref_d = reference.attention_lse(q, k, v, mask, scale, upcast=False)[1].float()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], (label, lse.dtype, lse.shape)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), f"{label}: -inf rows differ"
    fin = torch.isfinite(ref)
    assert_close(lse[fin], ref[fin], ref_d[fin], f"lse {label}")


def _check(backend, q, k, v, mask=None, label=""):
    with poisoned_outputs():
        o, lse = flashdiff.attention(q, k, v, attn_mask=mask, backend=backend, return_lse=True)
    ref = reference.attention(q, k, v, mask, upcast=True)
    ref_d = reference.attention(q, k, v, mask, upcast=False)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert_close(o, ref, ref_d, f"out {backend} {q.dtype} {label}")
    _check_lse(lse, q, k, v, mask, f"{backend} {q.dtype} {label}")
    return o, lse


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 2, 19, 45, 40), (1, 2, 33, 17, 72), (1, 1, 1, 1, 16)],
                         ids=["Sq19-Skv45-hd40", "Sq33-Skv17-hd72", "single"])
def test_lse_every_backend(device_backend, dtype, shape):
    device, backend = device_backend
    require_backend(device, backend)
    _skip_unserved(backend, dtype)
    q, k, v = _qkv(*shape, dtype, device)
    _check(backend, q, k, v, label=str(shape))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_key_padding_mask_fully_masked_rows(device_backend, dtype):
    """Batch 1 has every key masked: out 0 and lse -inf (the fused kernels' +inf converted)."""
    device, backend = device_backend
    require_backend(device, backend)
    _skip_unserved(backend, dtype)
    q, k, v = _qkv(2, 2, 19, 45, 40, dtype, device)
    mask = torch.zeros(2, 1, 1, 45, dtype=torch.bool, device=device)
    mask[0, ..., :20] = True
    mask[0, ..., 40] = True
    o, lse = _check(backend, q, k, v, mask, "key-padding")
    assert torch.all(o[1] == 0) and torch.all(torch.isneginf(lse[1]))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", None])
@pytest.mark.parametrize("mask_kind", ["additive-float", "bool-per-query"])
def test_general_masks(backend, mask_kind):
    """Masks the fused kernels do not take (auto serves them), each with one keyless row."""
    require_backend("cpu", backend or "reference")
    q, k, v = _qkv(1, 2, 12, 20, 32, torch.float32)
    if mask_kind == "additive-float":
        mask = torch.randn(1, 1, 12, 20)
        mask[..., 3, :] = float("-inf")
    else:
        mask = torch.rand(1, 2, 12, 20) > 0.3
        mask[:, 1, 5] = False
    _check(backend, q, k, v, mask, mask_kind)


def test_torch_lse_fallback_when_kernels_decline(monkeypatch):
    """Inputs no aten lse kernel takes run the fp32 reference a block of query rows at a time
    (blocks of 2 rows here: 2·2·7 = 28 scores per row, 60 per block)."""
    def declining(q, mask):
        def kernel(*args):
            raise RuntimeError("declined")
        yield kernel
    monkeypatch.setattr(ops_attention, "_lse_kernels", declining)
    monkeypatch.setattr(ops_attention, "_LSE_BLOCK_SCORES", 60)
    calls = []
    real = ops_attention._reference_fwd
    monkeypatch.setattr(ops_attention, "_reference_fwd", lambda q, *a, **kw: calls.append(q.shape[2]) or real(q, *a, **kw))
    q, k, v = _qkv(2, 2, 9, 7, 16, torch.float32)
    mask = torch.rand(2, 1, 9, 7) > 0.4
    mask[0, 0, 2] = False
    _check("torch", q, k, v, mask, "fallback")
    assert calls == [2, 2, 2, 2, 1]


def test_keyless_and_empty_inputs():
    q, k, v = _qkv(1, 2, 3, 0, 16, torch.float32)
    o, lse = flashdiff.attention(q, k, v, return_lse=True)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse)) and lse.shape == (1, 2, 3)
    o, lse = flashdiff.attention(q[:, :, :0], *_qkv(1, 2, 3, 5, 16, torch.float32)[1:], return_lse=True)
    assert o.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0) and lse.dtype == torch.float32


def test_eager_fast_path_keys_on_return_lse():
    """The memoized eager path must not hand a tuple to a plain call or a tensor to a lse call."""
    q, k, v = _qkv(1, 2, 5, 6, 16, torch.float32)
    for _ in range(2):
        assert isinstance(flashdiff.attention(q, k, v), torch.Tensor)
        o, lse = flashdiff.attention(q, k, v, return_lse=True)
        assert lse.shape == (1, 2, 5)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        flashdiff.attention(q, k, v, return_lse=1)


# ------------------------------------------------------------------ backward
def _grads(fn, q, k, v, do, g):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    o, lse = fn(*leaves)
    outs, cots = [], []
    if do is not None:
        outs.append(o)
        cots.append(do.to(o.dtype))
    if g is not None:
        outs.append(lse)
        cots.append(g.to(lse.dtype))
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)  # lse alone: v unused
    return [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [40, 72, 80, 160])
@pytest.mark.parametrize("use", ["out+lse", "lse-only"])
def test_backward_with_lse(device_backend, dtype, D, use):
    """dq, dk, dv of ⟨do, out⟩ + ⟨g, lse⟩ against float64 autograd of the reference."""
    device, backend = device_backend
    require_backend(device, backend)
    _skip_unserved(backend, dtype)
    if D not in (40, 160) and (backend == "reference" or use == "lse-only"):
        pytest.skip("kept short: reference gradients are autograd of the same math; the lse-only "
                    "path is the same kernels as out+lse")
    q, k, v = _qkv(1, 2, 13, 35, D, dtype, device)
    mask = torch.ones(1, 1, 1, 35, dtype=torch.bool, device=device)
    mask[..., -5:] = False
    do = None if use == "lse-only" else torch.randn(q.shape, device=device)
    g = torch.randn(q.shape[:3], device=device)
    got = _grads(lambda *t: flashdiff.attention(*t, attn_mask=mask, backend=backend, return_lse=True), q, k, v, do, g)

    def ref(upcast):
        return _grads(lambda *t: reference.attention_lse(*t, mask, upcast=upcast), q, k, v, do, g)

    for name, x, r, r_d in zip("qkv", got, ref(True), ref(False)):
        assert x.dtype == dtype
        assert_close(x, r, r_d, f"d{name} {backend} {dtype} hd{D} {use}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_keyless_rows_are_zero_not_nan(backend):
    """A keyless row (lse -inf) has P = 0: any lse gradient there changes nothing."""
    require_backend("cpu", backend)
    q, k, v = _qkv(2, 1, 9, 12, 32, torch.float32)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1] = False
    g = torch.randn(2, 1, 9)
    dq, dk, dv = _grads(lambda *t: flashdiff.attention(*t, attn_mask=mask, backend=backend, return_lse=True),
                        q, k, v, torch.randn(q.shape), g)
    for d in (dq, dk, dv):
        assert torch.isfinite(d).all() and torch.all(d[1] == 0)


# ------------------------------------------------------------------ merge
MERGE_BACKENDS = ["reference", "torch", "triton"]


def _splits(Skv, n):
    """n disjoint key ranges covering [0, Skv), one of them empty when n ≥ 3."""
    cuts = sorted(torch.randperm(Skv - 1)[: n - 1].add(1).tolist())
    bounds = [0] + cuts + [Skv]
    ranges = [(a, b) for a, b in zip(bounds, bounds[1:])]
    if n >= 3:
        ranges[1] = (ranges[1][0], ranges[1][0])  # an empty chunk; its keys go to the next one
        ranges[2] = (ranges[1][0], ranges[2][1])
    return ranges


@pytest.mark.parametrize("merge_backend", ["torch", "triton"])  # reference: the same function as torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_merge_equals_attention_over_the_union(merge_backend, dtype, n):
    """Split the keys into n disjoint chunks (one empty for n ≥ 3; with n = 4 one more fully
    masked by the key-padding mask), attend to each with return_lse, merge: the attention over
    all keys, to the rule. The partials come from the auto backend (torch's CPU flash)."""
    require_backend("cpu", merge_backend)
    B, H, Sq, Skv, D = 2, 2, 11, 41, 40
    q, k, v = _qkv(B, H, Sq, Skv, D, dtype)
    mask = torch.rand(B, 1, 1, Skv) > 0.2
    mask[1, ..., :] = False  # batch 1: no key anywhere -> out 0, lse -inf after the merge
    ranges = _splits(Skv, n)
    if n == 4:
        a, b = ranges[3]
        mask[0, ..., a:b] = False  # a fully masked chunk in batch 0
        mask[0, ..., 0] = True
    outs, lses = [], []
    for a, b in ranges:
        o, lse = flashdiff.attention(q, k[:, :, a:b], v[:, :, a:b], attn_mask=mask[..., a:b], return_lse=True)
        outs.append(o)
        lses.append(lse)
    with poisoned_outputs():
        out, lse = flashdiff.merge_attention(outs, lses, backend=merge_backend)
    ref = reference.attention(q, k, v, mask, upcast=True)
    ref_d = reference.attention(q, k, v, mask, upcast=False)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_close(out, ref, ref_d, f"merge {merge_backend} {dtype} n={n}")
    _check_lse(lse, q, k, v, mask, f"merge {merge_backend} {dtype} n={n}")
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


def _partials(n, shape=(2, 3, 7, 24), dtypes=(torch.float32,)):
    """Random partials: some rows empty in one partial (-inf, or +inf as kernels write it,
    with a NaN out that must not leak), one row empty everywhere, non-contiguous views."""
    outs, lses = [], []
    for i in range(n):
        dt = dtypes[i % len(dtypes)]
        base = torch.randn(shape[0], shape[1], shape[3], shape[2]).to(dt)
        o = base.transpose(-1, -2)  # a strided view
        lse = torch.randn(shape[:3]) * 3
        lse[0, 0, i % shape[2]] = float("-inf") if i % 2 else float("inf")
        o[0, 0, i % shape[2]] = float("nan")
        lse[1, 2, 4] = float("-inf")
        outs.append(o)
        lses.append(lse)
    return outs, lses


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", [1, 2, 5, 9])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
def test_merge_against_reference(backend, n, dtypes):
    """n = 5 and 9 exercise the fused kernel's folding (4 partials per launch)."""
    require_backend("cpu", backend)
    outs, lses = _partials(n, dtypes=dtypes)
    with poisoned_outputs():
        out, lse = flashdiff.merge_attention(outs, lses, out_dtype=torch.float32, backend=backend)
    ref_out, ref_lse = reference.merge_attention(outs, lses, upcast=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[1, 2, 4] == 0) and torch.isneginf(lse[1, 2, 4])
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_backward(backend):
    """Gradients w.r.t. outs and lses against float64 autograd of the reference; with the
    attention lse they make a split-KV forward differentiable end to end."""
    require_backend("cpu", backend)
    outs, lses = _partials(3)
    outs = [o.nan_to_num() for o in outs]
    leaves = [t.detach().requires_grad_(True) for t in outs + lses]
    out, lse = flashdiff.merge_attention(leaves[:3], leaves[3:], backend=backend)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0)
    got = torch.autograd.grad([out, lse], leaves, [dout, dlse])
    ref_leaves = [t.detach().double().requires_grad_(True) for t in outs + lses]
    r_out, r_lse = reference.merge_attention(ref_leaves[:3], ref_leaves[3:])
    ref = torch.autograd.grad([r_out, r_lse], ref_leaves, [dout.double(), dlse.double()])
    for i, (x, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(x.double(), r.nan_to_num(), atol=1e-5, rtol=1e-5, msg=f"grad {i}")


def test_split_kv_training_step_matches_full_attention():
    """attention(return_lse) per key chunk + merge, differentiated: the gradients of attention
    over all keys (the torch backend's lse gradient path and the merge backward together)."""
    q, k, v = _qkv(1, 2, 9, 20, 16, torch.float32)
    do = torch.randn(q.shape)

    def split(q, k, v):
        parts = [flashdiff.attention(q, k[:, :, a:b], v[:, :, a:b], backend="torch", return_lse=True)
                 for a, b in ((0, 7), (7, 20))]
        return flashdiff.merge_attention([p[0] for p in parts], [p[1] for p in parts])

    got = _grads(split, q, k, v, do, None)
    ref = _grads(lambda *t: reference.attention_lse(*t), q, k, v, do, None)
    for x, r in zip(got, ref):
        torch.testing.assert_close(x.double(), r.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda o, l: flashdiff.merge_attention([], []), ValueError, "at least one partial"),
    (lambda o, l: flashdiff.merge_attention([o, o], [l]), ValueError, "equal length, got 2 and 1"),
    (lambda o, l: flashdiff.merge_attention(o, l), TypeError, "outs must be a list or tuple"),
    (lambda o, l: flashdiff.merge_attention([o, o[:, :1]], [l, l]), ValueError, r"outs\[1\] must have shape"),
    (lambda o, l: flashdiff.merge_attention([o, o], [l, l[..., :2]]), ValueError, r"lses\[1\] must have shape"),
    (lambda o, l: flashdiff.merge_attention([o], [l[0]]), ValueError, r"lses\[0\] must have 3 dimensions"),
    (lambda o, l: flashdiff.merge_attention([o], [l.int()]), TypeError, r"lses\[0\] must be a floating"),
    (lambda o, l: flashdiff.merge_attention([o, o.to("meta")], [l, l]), ValueError, r"outs\[1\] is on meta"),
    (lambda o, l: flashdiff.merge_attention([o], [l], out_dtype=torch.int32), TypeError, "out_dtype"),
    (lambda o, l: flashdiff.merge_attention([o.double()], [l], backend="triton"), NotImplementedError,
     "float64 is not supported"),
])
def test_merge_bad_input(call, error, match):
    if "triton" in match or "float64" in match:
        require_backend("cpu", "triton")
    o, l = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3)
    with pytest.raises(error, match=match):
        call(o, l)


def test_merge_empty_rows_and_dims():
    out, lse = flashdiff.merge_attention([torch.randn(1, 2, 0, 8)] * 2, [torch.randn(1, 2, 0)] * 2)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


# ------------------------------------------------------------------ torch.library
@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "triton:v2", "triton:tma"])
def test_opcheck_attention_with_lse(backend):
    require_backend("cpu", backend.split(":")[0])
    q, k, v = _qkv(1, 2, 7, 9, 40, torch.float32)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    mask[..., 2] = False
    args = (q, k, v, mask, 0.25, backend, True)
    utils = ("test_schema", "test_faketensor") if backend.startswith("triton") else None
    if utils:  # the interpreter makes the autograd/AOT checks slow; the schema and fake suffice
        torch.library.opcheck(ops_attention._attention_op, args, test_utils=utils)
    else:
        torch.library.opcheck(ops_attention._attention_op, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_merge(backend):
    require_backend("cpu", backend)
    outs, lses = _partials(3)
    outs = [o.nan_to_num().contiguous() for o in outs]
    args = ([o.requires_grad_() for o in outs], lses, torch.float32, backend)
    torch.library.opcheck(ops_merge._merge_op, args)


def test_compile_fullgraph_through_return_lse():
    """torch.compile(fullgraph=True) traces attention(return_lse) on two key chunks and the
    merge (custom ops + fakes), forward and backward, equal to eager."""
    q, k, v = _qkv(2, 2, 8, 12, 16, torch.float32)

    def f(q, k, v):
        a = flashdiff.attention(q, k[:, :, :5], v[:, :, :5], return_lse=True)
        b = flashdiff.attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True)
        return flashdiff.merge_attention([a[0], b[0]], [a[1], b[1]])

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = compiled(*leaves)
    e_out, e_lse = f(q, k, v)
    torch.testing.assert_close(out, e_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, e_lse, atol=1e-5, rtol=1e-5)
    (out.square().sum() + lse.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
