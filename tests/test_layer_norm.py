"""layer_norm (adaLN) and rms_norm on every backend against flashdiff.reference (DESIGN.md rule)."""
import importlib

import pytest
import torch

import flashdiff
from flashdiff import reference
from flashdiff import _ext
from flashdiff.testing import compare, poisoned_outputs

from conftest import DEVICE_BACKENDS, DTYPE_IDS, DTYPES, require_backend

# the op modules (flashdiff.ops.layer_norm the attribute is the function)
ops_layer_norm = importlib.import_module("flashdiff.ops.layer_norm")
ops_rms_norm = importlib.import_module("flashdiff.ops.rms_norm")


def assert_close(y, ref, ref_d, label, interpreted=False):
    """DESIGN.md's rule (flashdiff.testing.compare), with one bf16 ulp of the reference as
    slack for Triton under the interpreter, which rounds fp32 → bf16 by truncation where a
    GPU rounds to nearest (docs/internals.md, "Toolchain facts")."""
    result = compare(y, ref, ref_d)
    slack = float(ref.abs().max()) * 2.0 ** -7 if interpreted and y.dtype == torch.bfloat16 else 0.0
    assert result.nan_mismatch == 0 and result.error <= result.bound + slack, f"{label}: {result} (+ slack {slack:.2e})"


def _interpreted(device, backend):
    return backend == "triton" and device == "cpu" and _ext.triton_interpreter_active()

# x [N, T, D] with the reason each is hostile: rows (N·T) 1, 3, 257; D 1, 7, 64, 72, 1152, 3072, 4097
SHAPES = [
    pytest.param((1, 1, 1), id="D1-single-element"),
    pytest.param((3, 1, 7), id="D7-prime-rows3"),
    pytest.param((1, 257, 64), id="D64-rows257-qk"),
    pytest.param((3, 1, 72), id="D72-one-vector-past"),
    pytest.param((1, 3, 1152), id="D1152-dit-xl"),
    pytest.param((1, 1, 3072), id="D3072-sd3-flux"),
    pytest.param((1, 3, 4097), id="D4097-one-past-4096"),
]


def _mod(kind, x, dtype):
    """scale, shift: None, [N, D] per sample ("sample") or x's shape per token ("token")."""
    if kind is None:
        return None, None
    shape = (x.shape[0], x.shape[-1]) if kind == "sample" else x.shape
    return ((0.5 * torch.randn(shape, device=x.device)).to(dtype),
            torch.randn(shape, device=x.device).to(dtype))


def _ln_inputs(shape, dtype, device, layout="contiguous", affine=True, mod="sample", mean=0.5):
    x = (torch.randn(shape, device=device) * 2 + mean).to(dtype)
    if layout == "transposed":   # [T, N, D] storage seen as [N, T, D]
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":     # rows of a wider tensor
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    D = shape[-1]
    w = torch.randn(D, device=device).to(dtype) if affine else None
    b = torch.randn(D, device=device).to(dtype) if affine else None
    return (x, w, b, *_mod(mod, x, dtype))


def _check_ln(device_backend, dtype, shape, layout="contiguous", activation="silu", affine=True,
              mod="sample"):
    device, backend = device_backend
    require_backend(device, backend)
    x, w, b, s, t = _ln_inputs(shape, dtype, device, layout, affine, mod)
    with poisoned_outputs():
        y = flashdiff.layer_norm(x, (shape[-1],), w, b, 1e-6, s, t, activation, backend=backend)
    args = (x, (shape[-1],), w, b, 1e-6, s, t, activation)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(), "output: contiguous, x's shape and dtype"
    assert not y.isnan().any(), "an output element was never written (poisoned NaN left)"
    assert_close(y, reference.layer_norm(*args, upcast=True), reference.layer_norm(*args, upcast=False),
                 f"{backend} {dtype} {shape} {layout} {activation} mod={mod}", _interpreted(device, backend))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_shapes(device_backend, dtype, shape):
    _check_ln(device_backend, dtype, shape)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("mod", ["sample", "token"])
def test_layer_norm_layouts(device_backend, dtype, layout, mod):
    _check_ln(device_backend, dtype, (2, 5, 72), layout=layout, mod=mod)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("affine, mod", [(False, None), (True, None), (False, "sample"), (True, "token")],
                         ids=["plain", "affine", "adaln", "affine-per-token"])
def test_layer_norm_options(device_backend, dtype, activation, affine, mod):
    _check_ln(device_backend, dtype, (2, 9, 40), activation=activation, affine=affine, mod=mod)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
def test_layer_norm_modulation_alone(device_backend):
    """scale without shift and shift without scale ([N, D] and per token)."""
    device, backend = device_backend
    require_backend(device, backend)
    x = torch.randn(2, 3, 24, device=device)
    for s, t in ((torch.randn(2, 24), None), (None, torch.randn(2, 3, 24))):
        y = flashdiff.layer_norm(x, 24, scale=s, shift=t, backend=backend)
        args = (x, (24,), None, None, 1e-6, s, t)
        assert_close(y, reference.layer_norm(*args, upcast=True), reference.layer_norm(*args, upcast=False), backend,
                     _interpreted(device, backend))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("D", [64, 1152, 4097])
def test_layer_norm_large_mean_is_stable(device_backend, D):
    """1e4 + N(0, 1) rows: E[x²] − E[x]² or fp32 sums of unshifted values lose the spread."""
    device, backend = device_backend
    require_backend(device, backend)
    if backend == "torch":
        pytest.skip("the torch backend is F.layer_norm itself: its CPU kernel misses the rule here "
                    "(1.6e-3 at D=64, 1.8x the bound; torch 2.13), one reason the fused kernels exist")
    for seed in (0, 1):
        torch.manual_seed(seed)
        x = 1e4 + torch.randn(2, 3, D, device=device)
        y = flashdiff.layer_norm(x, D, backend=backend)
        assert_close(y, reference.layer_norm(x, (D,), upcast=True), reference.layer_norm(x, (D,), upcast=False),
                     f"{backend} D={D} seed {seed}")


# ------------------------------------------------------------------ rms_norm
RMS_SHAPES = [
    pytest.param((1,), id="D1-rank1"),
    pytest.param((3, 7), id="D7-rows3"),
    pytest.param((1, 257, 64), id="D64-rows257"),
    pytest.param((2, 3, 5, 72), id="D72-rank4"),
    pytest.param((3, 1152), id="D1152"),
    pytest.param((1, 3072), id="D3072"),
    pytest.param((3, 4097), id="D4097"),
]


def _check_rms(device_backend, dtype, shape, weight=True, layout="contiguous"):
    device, backend = device_backend
    require_backend(device, backend)
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    if layout == "transposed":  # q/k as [B, H, S, D] views of [B, S, H, D]
        x = x.transpose(-2, -3).contiguous().transpose(-2, -3)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    w = torch.randn(shape[-1], device=device).to(dtype) if weight else None
    with poisoned_outputs():
        y = flashdiff.rms_norm(x, w, 1e-6, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert not y.isnan().any(), "an output element was never written (poisoned NaN left)"
    assert_close(y, reference.rms_norm(x, w, 1e-6, upcast=True), reference.rms_norm(x, w, 1e-6, upcast=False),
                 f"rms {backend} {dtype} {shape} {layout}", _interpreted(device, backend))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", RMS_SHAPES)
def test_rms_norm_shapes(device_backend, dtype, shape):
    _check_rms(device_backend, dtype, shape)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout, weight", [("transposed", True), ("sliced", False)])
def test_rms_norm_layouts(device_backend, dtype, layout, weight):
    _check_rms(device_backend, dtype, (2, 5, 3, 40), weight=weight, layout=layout)


# ------------------------------------------------------------------ backward
def _grads(fn, inputs, dy):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wanted, dy.to(out.dtype))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mod, activation", [("sample", "silu"), ("token", "gelu"), (None, None)])
def test_layer_norm_backward(device_backend, dtype, mod, activation):
    device, backend = device_backend
    require_backend(device, backend)
    x, w, b, s, t = _ln_inputs((2, 7, 40), dtype, device, mod=mod)
    inputs = (x, w, b, s, t)
    dy = torch.randn(x.shape, device=device).to(dtype)

    def run(fn, **kw):
        return _grads(lambda *a: fn(a[0], (40,), *a[1:3], 1e-6, *a[3:], activation, **kw), inputs, dy)[1]

    got = run(flashdiff.layer_norm, backend=backend)
    names = [n for n, v in zip(("x", "weight", "bias", "scale", "shift"), inputs) if v is not None]
    for name, g, r, r_d in zip(names, got, run(reference.layer_norm, upcast=True),
                               run(reference.layer_norm, upcast=False)):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close(g, r, r_d, f"d{name} {backend} {dtype} mod={mod}", _interpreted(device, backend))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 7), (4, 4097)], ids=["qk", "D7", "D4097"])
def test_rms_norm_backward(device_backend, dtype, shape):
    device, backend = device_backend
    require_backend(device, backend)
    x = torch.randn(shape, device=device).to(dtype)
    w = torch.randn(shape[-1], device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)

    def run(fn, **kw):
        return _grads(lambda x_, w_: fn(x_, w_, 1e-6, **kw), (x, w), dy)[1]

    for name, g, r, r_d in zip(("x", "weight"), run(flashdiff.rms_norm, backend=backend),
                               run(reference.rms_norm, upcast=True), run(reference.rms_norm, upcast=False)):
        assert_close(g, r, r_d, f"d{name} rms {backend} {dtype} {shape}", _interpreted(device, backend))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, error, match", [
    (lambda x: flashdiff.layer_norm(x, (8, 16)), ValueError, r"normalized_shape must be \(16,\)"),
    (lambda x: flashdiff.layer_norm(x, 15), ValueError, r"normalized_shape must be \(16,\)"),
    (lambda x: flashdiff.layer_norm(x, 16.0), TypeError, "normalized_shape must be an int"),
    (lambda x: flashdiff.layer_norm(x[0, 0, 0], 1), ValueError, "x must have at least 1 dimension"),
    (lambda x: flashdiff.layer_norm(x.long(), 16), TypeError, "x must be a floating tensor"),
    (lambda x: flashdiff.layer_norm([1.0], 16), TypeError, "x must be a torch.Tensor"),
    (lambda x: flashdiff.layer_norm(x, 16, weight=torch.ones(15)), ValueError, r"weight must have shape \(16,\)"),
    (lambda x: flashdiff.layer_norm(x, 16, bias=torch.ones(2, 16)), ValueError, r"bias must have shape \(16,\)"),
    (lambda x: flashdiff.layer_norm(x, 16, scale=torch.ones(16)), ValueError, r"scale must have shape \(2, 16\) or \(2, 8, 16\)"),
    (lambda x: flashdiff.layer_norm(x, 16, shift=torch.ones(3, 16)), ValueError, "shift must have shape"),
    (lambda x: flashdiff.layer_norm(x, 16, scale=torch.ones(2, 16), shift=torch.ones(2, 8, 16)), ValueError,
     "shift must have the shape of scale"),
    (lambda x: flashdiff.layer_norm(x[0], 16, scale=torch.ones(8, 1, 16)), ValueError, r"scale must have shape \(8, 16\)"),
    (lambda x: flashdiff.layer_norm(x, 16, scale=torch.ones(2, 16, dtype=torch.int32)), TypeError,
     "scale must be a floating tensor"),
    (lambda x: flashdiff.layer_norm(x, 16, weight=torch.ones(16, device="meta")), ValueError, "weight is on meta"),
    (lambda x: flashdiff.layer_norm(x, 16, activation="relu"), ValueError, "activation must be one of"),
    (lambda x: flashdiff.layer_norm(x, 16, eps=float("nan")), ValueError, "eps must be finite"),
    (lambda x: flashdiff.layer_norm(x, 16, eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda x: flashdiff.layer_norm(x, 16, backend="tpu"), ValueError, "backend must be one of"),
    (lambda x: flashdiff.layer_norm(x, 16, backend="cuda"), NotImplementedError, "cuda backend runs on CUDA tensors"),
    (lambda x: flashdiff.layer_norm(x.double(), 16, backend="cpu"), NotImplementedError, "dtype torch.float64"),
    (lambda x: flashdiff.rms_norm(x, torch.ones(8)), ValueError, r"weight must have shape \(16,\)"),
    (lambda x: flashdiff.rms_norm(x.int()), TypeError, "x must be a floating tensor"),
    (lambda x: flashdiff.rms_norm(x[0, 0, 0]), ValueError, "x must have at least 1 dimension"),
    (lambda x: flashdiff.rms_norm(x, eps=float("inf")), ValueError, "eps must be finite"),
    (lambda x: flashdiff.rms_norm(x, torch.ones(16, device="meta")), ValueError, "weight is on meta"),
    (lambda x: flashdiff.rms_norm(x.double(), backend="cpu"), NotImplementedError, "dtype torch.float64"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 8, 16))


def test_triton_declines_rows_over_its_maximum():
    pytest.importorskip("triton")
    x = torch.randn(1, 8193)
    for call in (lambda: flashdiff.layer_norm(x, 8193, backend="triton"),
                 lambda: flashdiff.rms_norm(x, backend="triton")):
        with pytest.raises(NotImplementedError, match="over the triton kernel's maximum of 8192"):
            call()


def test_cuda_backend_says_triton_serves_cuda():
    inputs = {"x": torch.randn(2, 4)}
    for op in (ops_layer_norm._dispatch, ops_rms_norm._dispatch):
        assert op.supports["cuda"](**inputs) == "no CUDA kernel yet; the triton backend serves CUDA tensors"


@pytest.mark.parametrize("shape", [(0, 3, 16), (2, 0, 16), (2, 3, 0)])
def test_empty_input_returns_empty(shape, monkeypatch):
    x = torch.randn(shape)
    for impls in (ops_layer_norm._dispatch.impls, ops_rms_norm._dispatch.impls):
        for name in list(impls):
            monkeypatch.setitem(impls, name, lambda *a, **k: pytest.fail("launched on empty input"))
    s = torch.randn(shape[0], shape[2])
    assert flashdiff.layer_norm(x, shape[-1], scale=s, shift=s, activation="silu").shape == x.shape
    assert flashdiff.rms_norm(x, torch.ones(shape[-1])).shape == x.shape


# ------------------------------------------------------------------ torch.compile, opcheck, features
class AdaLNBlock(torch.nn.Module):
    """DiT's modulate(norm(x), shift, scale) and a q/k RMS norm."""

    def __init__(self, D=32, heads=2):
        super().__init__()
        self.ada = torch.nn.Linear(D, 2 * D)
        self.q_weight = torch.nn.Parameter(torch.randn(D // heads))
        self.heads = heads

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        h = flashdiff.layer_norm(x, x.shape[-1], scale=scale, shift=shift, activation="silu")
        q = h.view(*h.shape[:2], self.heads, -1)
        return flashdiff.rms_norm(q, self.q_weight).flatten(2)


def test_fullgraph_compile_matches_eager_with_gradients():
    torch.manual_seed(0)
    block = AdaLNBlock()
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    eager = block(x, c)
    compiled_block = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled = compiled_block(x, c)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.square().mean().backward()
    assert block.q_weight.grad is not None and torch.isfinite(block.q_weight.grad).all()
    assert block.ada.weight.grad is not None and torch.isfinite(block.ada.weight.grad).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    require_backend("cpu", backend)
    x = torch.randn(2, 3, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    s, t = torch.randn(2, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True)
    torch.library.opcheck(ops_layer_norm._layer_norm_op, (x, w, b, 1e-6, s, t, "silu", backend))
    torch.library.opcheck(ops_layer_norm._layer_norm_op, (x.detach()[:, :, :8], None, None, 1e-6, None, None,
                                                          "none", backend))
    torch.library.opcheck(ops_rms_norm._rms_norm_op, (x.transpose(0, 1), w, 1e-6, backend))
    if backend == "triton":  # the backward kernels are ops of their own (compiled training)
        dy = torch.randn(2, 3, 16)
        x, w, b, s, t = (v.detach() for v in (x, w, b, s, t))  # no double backward
        torch.library.opcheck(ops_layer_norm._layer_norm_bwd_op, (dy, x, w, b, 1e-6, s, t, "gelu"))
        torch.library.opcheck(ops_layer_norm._layer_norm_bwd_op, (dy, x, None, None, 1e-6, None, None, "none"))
        torch.library.opcheck(ops_rms_norm._rms_norm_bwd_op, (dy, x, w, 1e-6))


def test_features_for_the_dispatch_table():
    x = torch.randn(2, 256, 1152, dtype=torch.bfloat16)
    f = ops_layer_norm.layer_norm_features(x, scale=torch.randn(2, 1152))
    assert f == {"dtype": "bf16", "modulated": True, "log2_d": 10.17, "log2_rows": 9.0}
    assert ops_rms_norm.rms_norm_features(torch.randn(2, 8, 64, 64))["modulated"] is False
    assert "layer_norm" in flashdiff.backends.REGISTRY and "rms_norm" in flashdiff.backends.REGISTRY


def test_cpu_kernel_threads_over_rows():
    """Above 64K elements the CPU kernel forks over rows; a per-sample modulation row then
    starts inside a thread's range."""
    require_backend("cpu", "cpu")
    for mod in ("sample", "token"):
        _check_ln(("cpu", "cpu"), torch.float32, (3, 129, 257), mod=mod)
    _check_rms(("cpu", "cpu"), torch.bfloat16, (257, 513))
