"""flashdiff.patch(norms=True) on diffusion transformers (tiny random Flux, SD3 with
qk_norm="rms_norm", PixArt, DiT; the configurations of test_patch_transformers): the adaLN
modulation and the plain LayerNorm / RMSNorm modules reach flashdiff.layer_norm /
flashdiff.rms_norm (spies count the calls), outputs follow flashdiff.testing's rule against a
float64 twin, state_dict is unchanged, unpatch is bit-exact, torch.compile(fullgraph=True)
captures the ops; per-call fallbacks and what is left alone, with reasons."""
import importlib

import pytest
import torch
import torch.nn as nn

from flashdiff.patching import patch, unpatch
from flashdiff.testing import assert_close

diffusers = pytest.importorskip("diffusers")
normalization = importlib.import_module("diffusers.models.normalization")
fnorms = importlib.import_module("flashdiff.patching.norms")
from test_patch_transformers import MODELS, _cast, _run, _twin  # noqa: E402  (the tiny models and inputs)

# name: {report kind: count} with attention and group norm off (norms only)
EXPECTED = {
    "Flux": {"layer_norm+mod": 5, "rms_norm": 6},   # norm1(+_context), single norm, norm_out, the block's norm2s
    "SD3": {"layer_norm+mod": 7, "rms_norm": 8},    # qk_norm="rms_norm": norm_q/k/added_q/added_k per block
    "PixArt": {"layer_norm+mod": 3},                # both blocks' norm1/norm2 (AdaLayerNormSingle's modulation), norm_out
    "DiT": {"layer_norm+mod": 3, "layer_norm": 2},  # AdaLayerNormZero per block, the output layer; norm3 alone
}
NAMES = ["Flux", "SD3", "PixArt", "DiT"]


@pytest.fixture
def spy(monkeypatch):
    """Calls that reach flashdiff.layer_norm / flashdiff.rms_norm from the patched modules, with
    whether a modulation was passed."""
    calls = []
    real_ln, real_rms = fnorms._fd_layer_norm, fnorms._fd_rms_norm
    monkeypatch.setattr(fnorms, "_fd_layer_norm",
                        lambda x, *a, **k: calls.append(("ln", k.get("scale") is not None)) or real_ln(x, *a, **k))
    monkeypatch.setattr(fnorms, "_fd_rms_norm", lambda x, *a, **k: calls.append(("rms", False)) or real_rms(x, *a, **k))
    return calls


def _build(name):
    build, make_inputs, _ = MODELS[name]
    torch.manual_seed(0)
    return build(), make_inputs


@pytest.mark.parametrize("name", NAMES)
def test_norms_routed_close_and_unpatch_exact(name, spy):
    model, make_inputs = _build(name)
    kwargs = make_inputs(torch.float32)
    ref = _run(_twin(model, torch.float64), _cast(kwargs, torch.float64))
    y_torch = _run(model, kwargs)
    state, params = model.state_dict(), dict(model.named_parameters())
    report = patch(model, attention=False, group_norm=False, norms=True)
    assert report.counts() == EXPECTED[name], str(report)
    patched_state, patched_params = model.state_dict(), dict(model.named_parameters())
    assert list(patched_state) == list(state) and all(torch.equal(patched_state[k], state[k]) for k in state)
    assert patched_params.keys() == params.keys() and all(patched_params[k] is params[k] for k in params)
    y = _run(model, kwargs)
    assert ("ln", True) in spy, str(report)  # at least one fused LayerNorm + modulation
    if "rms_norm" in EXPECTED[name]:
        assert ("rms", False) in spy
    assert_close(y, ref, y_torch, name)
    unpatch(model)
    spy.clear()
    assert torch.equal(_run(model, kwargs), y_torch) and not spy
    assert all(type(m).__module__.split(".")[0] != "flashdiff" for m in model.modules())


@pytest.mark.parametrize("name", ["Flux", "PixArt"])
def test_bf16_within_rule(name):
    model, make_inputs = _build(name)
    kwargs = make_inputs(torch.float32)
    ref = _run(_twin(model, torch.float64), _cast(kwargs, torch.float64))
    model = model.to(torch.bfloat16)
    kw16 = _cast(kwargs, torch.bfloat16)
    y_torch = _run(model, kw16)
    with_all = patch(model, norms=True)  # with attention and group norm too
    try:
        assert {"layer_norm+mod", "attention"} <= set(with_all.counts()), str(with_all)
        assert_close(_run(model, kw16), ref, y_torch, f"{name} bf16")
    finally:
        unpatch(model)
    assert torch.equal(_run(model, kw16), y_torch)


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph(name):
    model, make_inputs = _build(name)
    kwargs = make_inputs(torch.float32)
    y_torch = _run(model, kwargs)
    ops = []

    def count_ops(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "flashdiff" in str(n.target))
        return gm.forward

    patch(model, norms=True)
    try:
        torch._dynamo.reset()
        y = _run(torch.compile(model, backend=count_ops, fullgraph=True), kwargs)
    finally:
        unpatch(model)
        torch._dynamo.reset()
    assert any("layer_norm" in op for op in ops), ops
    assert any("attention" in op for op in ops), ops
    torch.testing.assert_close(y, y_torch, atol=1e-5, rtol=1e-5)


def test_rewrite_keeps_diffusers_code():
    """Only the modulation statement changes: the rewritten forward compiles from diffusers' own
    file and lines, and a class whose forward has no adaLN statement is not rewritten."""
    sub, attrs, why = fnorms._modulated_class(normalization.AdaLayerNormZero)
    assert attrs == ("norm",) and not why
    orig = normalization.AdaLayerNormZero.forward
    assert sub.forward.__code__.co_filename == orig.__code__.co_filename
    assert sub.forward.__code__.co_firstlineno == orig.__code__.co_firstlineno
    assert fnorms._HELPER in sub.forward.__code__.co_names and "chunk" in sub.forward.__code__.co_names
    assert fnorms._modulated_class(normalization.RMSNorm)[0] is None


def test_modulation_fallback_is_diffusers_expression():
    """Modulations of a shape the op does not take, and RMSNorm, get diffusers' expression itself."""
    owner = type("Owner", (), {"_flashdiff_backend": None})()
    ln = nn.LayerNorm(8, elementwise_affine=False)
    x = torch.randn(2, 3, 8)
    scale, shift = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    assert_close(fnorms._modulated_norm(owner, ln, x, scale, shift),
                 (ln(x.double()) * (1 + scale.double()) + shift.double()), ln(x) * (1 + scale) + shift)
    odd = torch.randn(1, 3, 1)  # broadcasts in torch, not an [N, D] modulation
    assert torch.equal(fnorms._modulated_norm(owner, ln, x, odd, odd), ln(x) * (1 + odd) + odd)
    rms = normalization.RMSNorm(8, eps=1e-6)
    assert torch.equal(fnorms._modulated_norm(owner, rms, x, scale, shift), rms(x) * (1 + scale) + shift)


def test_plain_norms_and_left_alone(spy):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(16)                                 # routed, affine
            self.fp32 = normalization.FP32LayerNorm(16, elementwise_affine=False)  # routed
            self.rms = normalization.RMSNorm(16, eps=1e-5)             # routed
            self.ln2d = nn.LayerNorm((4, 16))                          # two dims: left
            self.rms_bias = normalization.RMSNorm(16, eps=1e-5, bias=True)  # bias: left
            self.hooked = nn.LayerNorm(16)                             # hooked: left
            self.torch_rms = nn.RMSNorm(16)                            # eps=None: left

        def forward(self, x):
            return (self.ln(x) + self.fp32(x) + self.rms(x) + self.ln2d(x) + self.rms_bias(x) + self.hooked(x)
                    + self.torch_rms(x))

    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    net.hooked.register_forward_hook(lambda *a: None)
    x = torch.randn(3, 4, 16)
    y_torch = net(x)
    weight = net.ln.weight
    report = patch(net, norms=True)
    assert report.counts() == {"layer_norm": 2, "rms_norm": 1}, str(report)
    left = {where: why for kind, where, why in report.left_alone}
    assert "last 2 dims" in left["ln2d"] and "bias" in left["rms_bias"] and "hooks" in left["hooked"]
    assert "eps=None" in left["torch_rms"]
    assert isinstance(net.ln, nn.LayerNorm) and isinstance(net.rms, normalization.RMSNorm)
    assert net.ln.weight is weight and dict(net.named_parameters())["ln.weight"] is weight
    y = net(x)
    assert sorted(spy) == [("ln", False), ("ln", False), ("rms", False)]
    torch.testing.assert_close(y, y_torch, atol=1e-5, rtol=1e-5)
    # per call: float64 (not a kernel dtype) runs the original forward
    spy.clear()
    with torch.no_grad():
        net.double()
        assert net.ln(x.double()).dtype == torch.float64 and not spy
        net.float()
    unpatch(net)
    assert torch.equal(net(x), y_torch) and type(net.ln) is nn.LayerNorm


def test_continuous_rms_norm_left_with_reason():
    """AdaLayerNormContinuous(norm_type="rms_norm"): no fused RMSNorm + modulation op, so its
    modulation stays diffusers'; the RMSNorm itself goes to flashdiff.rms_norm."""
    m = normalization.AdaLayerNormContinuous(16, 8, elementwise_affine=True, eps=1e-6, norm_type="rms_norm")
    x, c = torch.randn(2, 5, 16), torch.randn(2, 8)
    y_torch = m(x, c)
    report = patch(m, norms=True)
    assert report.counts() == {"rms_norm": 1}, str(report)
    assert any("no fused RMSNorm + modulation" in why for _, _, why in report.left_alone), str(report)
    torch.testing.assert_close(m(x, c), y_torch, atol=1e-5, rtol=1e-5)
    unpatch(m)
    assert torch.equal(m(x, c), y_torch)


def test_explicit_backend_and_default_off():
    model, make_inputs = _build("DiT")
    assert "layer_norm+mod" not in patch(model).counts()  # norms are opt in
    unpatch(model)
    report = patch(model, norms=True, backend="reference")
    assert report.counts()["layer_norm+mod"] == 3
    assert all(getattr(m, "_flashdiff_backend", "reference") == "reference" for m in model.modules()
               if type(m).__module__ == fnorms.__name__)
    y = _run(model, make_inputs(torch.float32))
    unpatch(model)
    torch.testing.assert_close(y, _run(model, make_inputs(torch.float32)), atol=1e-5, rtol=1e-5)
