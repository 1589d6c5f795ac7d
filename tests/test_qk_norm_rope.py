"""qk_norm_rope (q/k RMS norm + rotary embedding) on every backend against flashdiff.reference
(DESIGN.md rule), its gradients, bad input, opcheck, and equality with diffusers' own RMSNorm +
apply_rotary_emb."""
import importlib

import pytest
import torch

import flashdiff
from flashdiff import reference
from flashdiff.testing import poisoned_outputs

from conftest import DEVICE_BACKENDS, DTYPE_IDS, DTYPES, require_backend
# one rule for the row norms: DESIGN.md's, + one bf16 ulp for the interpreter's truncation
from test_layer_norm import _interpreted, assert_close

ops_qk = importlib.import_module("flashdiff.ops.qk_norm_rope")

# the backends with an implementation; cpu (and cuda) decline with a reason (test below)
SERVING = [p for p in DEVICE_BACKENDS if p.values[0][1] not in ("cpu", "cuda")]
ROPES = ["interleaved", "half", "none"]
S = 7  # prime: no tile of rows divides B·H·S


def _inputs(dtype, D, rope, device="cpu", layout="bshd", weights=True, Hk=1):
    """q [2, 2, S, D] as a view of a [B, S, H, D] projection (diffusers' unflatten), or of a
    fused qkv projection, k [2, Hk, S, D] a column slice of a wider tensor; cos/sin [S, D] fp32
    with a column stride of 2 (the launcher's copy path)."""
    B, H = 2, 2
    if layout == "qkv":
        q = torch.randn(B, S, 3, H, D, device=device).to(dtype)[:, :, 0].transpose(1, 2)
    elif layout == "bshd":
        q = torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, S, D, device=device).to(dtype)
    k = (torch.randn(B, Hk, S, 2 * D, device=device) * 3 + 0.5).to(dtype)[..., :D]
    qw, kw = ((torch.randn(D, device=device).to(dtype), torch.randn(D, device=device).to(dtype))
              if weights else (None, None))
    cos = sin = None
    if rope != "none":
        angles = torch.randn(S, D, device=device) * 3
        cos, sin = torch.cos(angles), torch.sin(angles)
        cos, sin = torch.cat([cos, cos], -1)[:, ::2], torch.cat([sin, sin], -1)[:, ::2]
    return q, k, qw, kw, cos, sin


def _check(device_backend, dtype, D, rope, **kw):
    device, backend = device_backend
    require_backend(device, backend)
    q, k, qw, kw_, cos, sin = _inputs(dtype, D, rope, device, **kw)
    args = (q, k, qw, kw_, cos, sin, 1e-6, rope != "half")
    with poisoned_outputs():
        qo, ko = flashdiff.qk_norm_rope(*args, backend=backend)
    refs, refs_d = reference.qk_norm_rope(*args, upcast=True), reference.qk_norm_rope(*args, upcast=False)
    for name, y, x, r, r_d in zip(("q_out", "k_out"), (qo, ko), (q, k), refs, refs_d):
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(), f"{name}: contiguous, x's shape, q's dtype"
        assert not y.isnan().any(), f"{name}: an output element was never written (poisoned NaN left)"
        assert_close(y, r, r_d, f"{name} {backend} {dtype} D={D} rope={rope} {kw}", _interpreted(device, backend))


@pytest.mark.parametrize("device_backend", SERVING)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("D", [64, 72, 128, 40, 18])
def test_forward(device_backend, dtype, rope, D):
    _check(device_backend, dtype, D, rope)


@pytest.mark.parametrize("device_backend", SERVING)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D, layout, weights, Hk", [(17, "bhsd", True, 1), (1, "bshd", False, 3), (40, "qkv", False, 2)],
                         ids=["odd-D17-no-rope", "D1-no-weights-Hk3", "qkv-view-no-weights"])
def test_forward_layouts(device_backend, dtype, D, layout, weights, Hk):
    """Odd D (no rope), D = 1, views of a fused qkv projection, GQA-style Hk ≠ H."""
    _check(device_backend, dtype, D, "none" if D % 2 else "interleaved", layout=layout, weights=weights, Hk=Hk)


def test_no_rope_k_may_have_its_own_length():
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 9, 16)
    for backend in ("reference", "torch", "triton"):
        require_backend("cpu", backend)
        _, ko = flashdiff.qk_norm_rope(q, k, None, None, backend=backend)
        torch.testing.assert_close(ko, reference.rms_norm(k, upcast=torch.float32))


# ------------------------------------------------------------------ backward
def _grads(fn, q, k, qw, kw, cos, sin, dq_out, dk_out, interleaved, **kw_):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, qw, kw)]
    qo, ko = fn(*leaves, cos, sin, 1e-6, interleaved, **kw_)
    return torch.autograd.grad((qo, ko), leaves, (dq_out.to(qo.dtype), dk_out.to(ko.dtype)))


@pytest.mark.parametrize("device_backend", SERVING)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("D", [40, 18])
def test_backward(device_backend, dtype, rope, D):
    """dq, dk, dq_weight, dk_weight against autograd of the reference (float64 and in dtype)."""
    device, backend = device_backend
    require_backend(device, backend)
    q, k, qw, kw, cos, sin = _inputs(dtype, D, rope, device, Hk=2)
    dq_out = torch.randn(q.shape, device=device).to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    dk_out = torch.randn(k.shape, device=device).to(dtype)
    inter = rope != "half"
    got = _grads(flashdiff.qk_norm_rope, q, k, qw, kw, cos, sin, dq_out, dk_out, inter, backend=backend)
    want = _grads(reference.qk_norm_rope, q, k, qw, kw, cos, sin, dq_out, dk_out, inter, upcast=True)
    want_d = _grads(reference.qk_norm_rope, q, k, qw, kw, cos, sin, dq_out, dk_out, inter, upcast=False)
    for name, g, r, r_d, x in zip(("q", "k", "q_weight", "k_weight"), got, want, want_d, (q, k, qw, kw)):
        assert g.dtype == x.dtype and g.shape == x.shape, f"d{name}: dtype/shape of {name}"
        assert_close(g, r, r_d, f"d{name} {backend} {dtype} D={D} rope={rope}", _interpreted(device, backend))


@pytest.mark.parametrize("device_backend", SERVING)
def test_backward_one_output_and_cos_sin_gradients(device_backend):
    """Only q_out used (k_out's gradient is zeros); cos/sin requiring grad (the triton kernel has
    no dcos/dsin: that call takes the reference's gradient)."""
    device, backend = device_backend
    require_backend(device, backend)
    q, k, qw, kw, cos, sin = _inputs(torch.float32, 18, "interleaved", device)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, qw, kw, cos, sin)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, qw, kw, cos, sin)]
    qo = flashdiff.qk_norm_rope(*leaves, backend=backend)[0]
    ref_qo = reference.qk_norm_rope(*ref_leaves)[0]
    got = torch.autograd.grad(qo.square().sum(), leaves, allow_unused=True)
    want = torch.autograd.grad(ref_qo.square().sum(), ref_leaves, allow_unused=True)
    for name, g, r in zip(("q", "k", "q_weight", "k_weight", "cos", "sin"), got, want):
        if r is None:  # k, k_weight: k_out was not used
            assert g is None or not g.any(), f"d{name} should be zero"
            continue
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=f"d{name} {backend}")


# ------------------------------------------------------------------ diffusers equality
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interleaved", [True, False], ids=["flux-interleaved", "half-split"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_matches_diffusers(dtype, interleaved, backend):
    """diffusers' RMSNorm (norm_q/norm_k) then apply_rotary_emb(sequence_dim=1) on [B, S, H, D],
    with real RoPE tables: fp32 agrees to rounding; in half precision diffusers rounds the norm
    before the rotation, so both are held to the rule against float64, diffusers as the
    in-dtype term (flashdiff is at least that accurate)."""
    require_backend("cpu", backend)
    emb = pytest.importorskip("diffusers.models.embeddings")
    norm = pytest.importorskip("diffusers.models.normalization")
    B, S_, H, D = 2, 11, 3, 32
    cos, sin = emb.get_1d_rotary_pos_embed(D, S_, use_real=True, repeat_interleave_real=interleaved)
    unbind = -1 if interleaved else -2
    qs, ks = (torch.randn(B, S_, H, D) * 2).to(dtype), torch.randn(B, S_, H, D).to(dtype)
    nq, nk = norm.RMSNorm(D, eps=1e-6), norm.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        for n in (nq, nk):
            n.weight.copy_(torch.randn(D))
            n.to(dtype)
        want = [emb.apply_rotary_emb(n(x), (cos, sin), use_real_unbind_dim=unbind, sequence_dim=1)
                for n, x in ((nq, qs), (nk, ks))]
        got = flashdiff.qk_norm_rope(qs.transpose(1, 2), ks.transpose(1, 2), nq.weight, nk.weight, cos, sin,
                                     interleaved=interleaved, backend=backend)
        ref = reference.qk_norm_rope(qs.transpose(1, 2), ks.transpose(1, 2), nq.weight, nk.weight, cos, sin,
                                     interleaved=interleaved)
    for name, g, w, r in zip(("q", "k"), got, want, ref):
        w = w.transpose(1, 2)
        assert w.dtype == dtype and g.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{name} vs diffusers ({backend})")
        else:
            assert_close(g, r, w, f"{name} {backend} {dtype} vs diffusers", _interpreted("cpu", backend))


# ------------------------------------------------------------------ bad input, empty, reasons
@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q[0], k, w, w), ValueError, "q must have 4 dimensions"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k[..., :8], w, w), ValueError, r"k must be \[B, Hk, Sk, D\] with q's B=2 and D=16"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k[:1], w, w), ValueError, "k must be"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k.half(), w, w), TypeError, "k has dtype torch.float16 but q has"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q.int(), k, w, w), TypeError, "q must be a floating tensor"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope([1.0], k, w, w), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, None, w, w), TypeError, "k must be a torch.Tensor"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w[:8], w), ValueError, r"q_weight must have shape \(16,\)"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w[None]), ValueError, r"k_weight must have shape \(16,\)"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w.long()), TypeError, "k_weight must be a floating tensor"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, c, None), ValueError, "cos and sin must be given together"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, None, c), ValueError, "cos and sin must be given together"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, c[:4], c), ValueError, r"cos must have shape \(5, 16\)"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, c, c.T), ValueError, r"sin must have shape \(5, 16\)"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k[:, :, :3], w, w, c, c), ValueError, "k must have q's sequence length S=5"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q[..., :15], k[..., :15], None, None, c[:, :15], c[:, :15]),
     ValueError, "D=15 .* must be even"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, c, c.int()), TypeError, "sin must be a floating tensor"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w.to("meta")), ValueError, "k_weight is on meta"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, c.to("meta"), c), ValueError, "cos is on meta"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, eps=float("nan")), ValueError, "eps must be finite"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, eps=-1e-6), ValueError, "eps must be >= 0"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, c, c, interleaved=1), TypeError, "interleaved must be a bool"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, backend="tpu"), ValueError, "backend must be one of"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, backend="cpu"), NotImplementedError,
     "no CPU kernel yet: on CPU the torch backend serves"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q, k, w, w, backend="cuda"), NotImplementedError, "cuda backend runs on CUDA"),
    (lambda q, k, w, c: flashdiff.qk_norm_rope(q.double(), k.double(), w, w, backend="triton"), NotImplementedError,
     "dtype torch.float64"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), torch.randn(16), torch.randn(5, 16))


def test_reasons_and_auto_choice():
    inputs = {"q": torch.randn(1, 1, 2, 8), "k": torch.randn(1, 1, 2, 8)}
    assert ops_qk._dispatch.supports["cpu"](**inputs) == "no CPU kernel yet: on CPU the torch backend serves"
    assert ops_qk._dispatch.supports["cuda"](**inputs) == "no kernel yet: the triton backend serves CUDA tensors"
    if not torch.cuda.is_available():
        choice = flashdiff.explain("qk_norm_rope", inputs["q"], inputs["k"], None, None)
        assert choice.backend == "torch", str(choice)
    pytest.importorskip("triton")
    with pytest.raises(NotImplementedError, match="over the triton kernel's maximum of 8192"):
        flashdiff.qk_norm_rope(torch.randn(1, 1, 1, 8194), torch.randn(1, 1, 1, 8194), None, None, backend="triton")


@pytest.mark.parametrize("shape", [(0, 2, 3, 8), (2, 0, 3, 8), (2, 2, 0, 8), (2, 2, 3, 0)])
def test_empty_input_returns_empty(shape, monkeypatch):
    for name in list(ops_qk._dispatch.impls):
        monkeypatch.setitem(ops_qk._dispatch.impls, name, lambda *a, **k: pytest.fail("launched on empty input"))
    q = torch.randn(shape)
    qo, ko = flashdiff.qk_norm_rope(q, q, None, None)
    assert qo.shape == ko.shape == q.shape


def test_features_for_the_dispatch_table():
    q, k = torch.randn(2, 32, 64, 128, dtype=torch.bfloat16), torch.randn(2, 32, 64, 128, dtype=torch.bfloat16)
    assert ops_qk.qk_norm_rope_features(q, k) == {"dtype": "bf16", "log2_d": 7.0, "log2_rows": 13.0}
    assert "qk_norm_rope" in flashdiff.backends.REGISTRY


# ------------------------------------------------------------------ torch.library, compile
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_opcheck(backend):
    require_backend("cpu", backend)
    q, k, qw, kw, cos, sin = _inputs(torch.float32, 8, "interleaved")
    q, k, qw, kw = (t.detach().requires_grad_(True) for t in (q, k, qw, kw))
    torch.library.opcheck(ops_qk._qk_norm_rope_op, (q, k, qw, kw, cos, sin, 1e-6, True, backend))
    torch.library.opcheck(ops_qk._qk_norm_rope_op, (q.detach(), k.detach()[:, :, :3], None, None, None, None,
                                                    1e-6, False, backend))
    if backend == "triton":  # the backward kernel is an op of its own (compiled training)
        dq, dk = torch.randn(q.shape), torch.randn(k.shape)
        q, k, qw, kw = (t.detach() for t in (q, k, qw, kw))
        torch.library.opcheck(ops_qk._qk_norm_rope_bwd_op, (dq, dk, q, k, qw, kw, cos, sin, 1e-6, False))
        torch.library.opcheck(ops_qk._qk_norm_rope_bwd_op, (dq, dk, q, k, None, None, None, None, 1e-6, True))


def test_fullgraph_compile_matches_eager_with_gradients():
    q_w = torch.nn.Parameter(torch.randn(8))

    def f(x, cos, sin):  # a [B, S, H*D] projection as diffusers' Flux processor holds it
        q = x.unflatten(-1, (-1, 8)).transpose(1, 2)
        return flashdiff.qk_norm_rope(q, q, q_w, None, cos, sin)[0].sum(1)

    x, cos, sin = torch.randn(2, 5, 16), torch.randn(5, 8), torch.randn(5, 8)
    eager = f(x, cos, sin)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, cos, sin)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.square().mean().backward()
    assert q_w.grad is not None and torch.isfinite(q_w.grad).all()
