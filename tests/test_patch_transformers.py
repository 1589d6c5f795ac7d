"""flashdiff.patch on diffusion transformers (Flux, SD3, PixArt, DiT, Sana) built from tiny
random configurations: attention in every block goes through flashdiff.attention (a spy
counts the calls), outputs follow flashdiff.testing's rule against a float64 twin, unpatch
is bit-exact, the swap is scoped to the patched model, and torch.compile(fullgraph=True)
captures the patched model with flashdiff's attention op in the graph."""
import importlib

import pytest
import torch

from flashdiff.patching import patch, unpatch
from flashdiff.testing import assert_close

diffusers = pytest.importorskip("diffusers")
dispatch_mod = importlib.import_module("diffusers.models.attention_dispatch")
fattn = importlib.import_module("flashdiff.patching.attention")
ftrans = importlib.import_module("flashdiff.patching.transformers")


# ------------------------------------------------------------------ tiny models and inputs
def tiny_flux(head_dim=16):
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[head_dim // 4, head_dim // 4, head_dim // 2]).eval()


def flux_inputs(dtype=torch.float32, mask=False):
    g = torch.Generator().manual_seed(1)
    B, S, T = 2, 16, 8
    kw = dict(hidden_states=torch.randn(B, S, 4, generator=g, dtype=dtype),
              encoder_hidden_states=torch.randn(B, T, 32, generator=g, dtype=dtype),
              pooled_projections=torch.randn(B, 32, generator=g, dtype=dtype), timestep=torch.tensor([0.5, 0.9]),
              img_ids=torch.randn(S, 3, generator=g), txt_ids=torch.randn(T, 3, generator=g))
    if mask:  # a key-padding mask over the joint [text, image] sequence, as FluxAttnProcessor takes it
        kw["joint_attention_kwargs"] = {"attention_mask": torch.tensor([[True] * (T + S), [True] * 5 + [False] * 3
                                                                          + [True] * S])}
    return kw


def tiny_sd3(head_dim=16):
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=head_dim, num_attention_heads=2,
        caption_projection_dim=2 * head_dim, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
        qk_norm="rms_norm").eval()


def sd3_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g, dtype=dtype),
                pooled_projections=torch.randn(2, 16, generator=g, dtype=dtype), timestep=torch.tensor([3, 700]))


def tiny_pixart():
    return diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()


def pixart_inputs(dtype=torch.float32, mask=False):
    g = torch.Generator().manual_seed(3)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g, dtype=dtype),
              encoder_hidden_states=torch.randn(2, 6, 32, generator=g, dtype=dtype), timestep=torch.tensor([3, 700]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if mask:
        kw["encoder_attention_mask"] = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return kw


def tiny_dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32).eval()


def dit_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g, dtype=dtype), timestep=torch.tensor([1, 5]),
                class_labels=torch.tensor([1, 2]))


# name: (build, inputs, flashdiff.attention calls per forward)
MODELS = {
    "Flux": (tiny_flux, flux_inputs, 2),                        # 1 double-stream + 1 single-stream block
    "Flux-hd72": (lambda: tiny_flux(72), flux_inputs, 2),
    "Flux-mask": (tiny_flux, lambda d: flux_inputs(d, mask=True), 2),
    "SD3": (tiny_sd3, sd3_inputs, 2),                           # joint attention, 2 blocks
    "SD3-hd64": (lambda: tiny_sd3(64), sd3_inputs, 2),
    "PixArt": (tiny_pixart, pixart_inputs, 4),                  # self + cross, 2 blocks
    "PixArt-mask": (tiny_pixart, lambda d: pixart_inputs(d, mask=True), 2),  # additive bias: cross-attn on torch
    "DiT": (tiny_dit, dit_inputs, 2),
}


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def _cast(kwargs, dtype):
    def cast(v):
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
    return cast(kwargs)


def _twin(model, dtype):
    twin = type(model).from_config(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin.to(dtype)


def _attention_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "processor") and callable(getattr(m, "set_processor", None))}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach flashdiff.attention (through every processor kind)."""
    calls = []
    real = fattn._fd_attention
    monkeypatch.setattr(fattn, "_fd_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(MODELS))
def test_attention_in_every_block_and_unpatch_is_exact(name, spy):
    build, make_inputs, n_calls = MODELS[name]
    torch.manual_seed(0)
    model = build()
    kwargs = make_inputs(torch.float32)
    ref = _run(_twin(model, torch.float64), _cast(kwargs, torch.float64))
    y_torch = _run(model, kwargs)
    procs = {n: m.processor for n, m in _attention_modules(model).items()}
    report = patch(model)
    assert report.counts().get("attention") == len(procs), str(report)
    assert not [x for x in report.left_alone if x[0] == "attention"], str(report)
    y = _run(model, kwargs)
    assert len(spy) == n_calls, (len(spy), str(report))
    assert_close(y, ref, y_torch, name)
    unpatch(model)
    assert all(m.processor is procs[n] for n, m in _attention_modules(model).items())
    spy.clear()
    assert torch.equal(_run(model, kwargs), y_torch) and not spy


def test_report_names_each_processor():
    model = tiny_flux()
    text = str(patch(model))
    assert "transformer_blocks.0.attn: FluxAttnProcessor" in text
    assert "single_transformer_blocks.0.attn: FluxAttnProcessor" in text and "dispatch_attention_fn" in text
    unpatch(model)
    model = tiny_sd3()
    text = str(patch(model))
    assert "transformer_blocks.1.attn: JointAttnProcessor2_0" in text and "F.scaled_dot_product_attention" in text
    unpatch(model)


def test_processor_keeps_diffusers_signature_and_type():
    model = tiny_sd3()
    attn = model.transformer_blocks[0].attn
    original = attn.processor
    patch(model)
    import inspect
    assert isinstance(attn.processor, type(original))
    assert inspect.signature(attn.processor.__call__) == inspect.signature(original.__call__)
    assert attn.processor.__call__.__code__ is type(original).__call__.__code__  # diffusers' code, not a copy
    unpatch(model)


def test_scoped_to_the_patched_model(spy):
    """Another Flux model, and diffusers' module globals, keep diffusers' dispatch."""
    patched_model, other = tiny_flux(), tiny_flux()
    kwargs = flux_inputs()
    y_other = _run(other, kwargs)
    flux_mod = importlib.import_module(type(other.transformer_blocks[0].attn.processor).__module__)
    patch(patched_model)
    try:
        assert flux_mod.dispatch_attention_fn is dispatch_mod.dispatch_attention_fn
        assert torch.equal(_run(other, kwargs), y_other) and not spy
        _run(patched_model, kwargs)
        assert len(spy) == 2
    finally:
        unpatch(patched_model)


def test_other_backends_and_left_alone(spy, monkeypatch):
    """A processor set to a non-native diffusers backend is left alone; a linear-attention
    processor (Sana) is listed with its reason; a call diffusers routes elsewhere at run time
    goes to the original dispatch."""
    model = tiny_flux()
    model.transformer_blocks[0].attn.processor._attention_backend = dispatch_mod.AttentionBackendName.FLEX
    report = patch(model)
    assert report.counts()["attention"] == 1
    assert any("backend 'flex'" in why for _, _, why in report.left_alone), str(report)
    unpatch(model)

    sana = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=8).eval()
    report = patch(sana)
    assert any("SanaAttnProcessor2_0" in what for _, _, what in report.replaced), str(report)
    assert any("SanaLinearAttnProcessor2_0 has no flashdiff equivalent" in why for _, _, why in report.left_alone)
    unpatch(sana)

    q, k, v = (torch.randn(2, 5, 3, 16) for _ in range(3))  # [B, S, H, D]
    routed = ftrans._route_dispatch(dispatch_mod.dispatch_attention_fn, None)
    torch.testing.assert_close(routed(q, k, v), dispatch_mod.dispatch_attention_fn(q, k, v))
    assert len(spy) == 1
    for kw in ({"is_causal": True}, {"backend": dispatch_mod.AttentionBackendName._NATIVE_MATH},
               {"attention_kwargs": {"return_lse": False}}):
        assert torch.equal(routed(q, k, v, **kw), dispatch_mod.dispatch_attention_fn(q, k, v, **kw))
    assert len(spy) == 1


@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_routers_match_torch(head_dim, spy):
    q, k, v = (torch.randn(2, 9, 3, head_dim, dtype=torch.float64) for _ in range(3))
    kpm = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    dispatch = ftrans._route_dispatch(dispatch_mod.dispatch_attention_fn, None)
    sdpa = ftrans._route_sdpa(None)
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    torch.testing.assert_close(dispatch(q, k, v, attn_mask=kpm), dispatch_mod.dispatch_attention_fn(q, k, v, attn_mask=kpm))
    torch.testing.assert_close(sdpa(*bhsd, attn_mask=kpm[:, None, None], scale=0.2),
                               torch.nn.functional.scaled_dot_product_attention(*bhsd, attn_mask=kpm[:, None, None],
                                                                                scale=0.2))
    assert len(spy) == 2


@pytest.mark.parametrize("name", ["Flux", "SD3", "PixArt", "DiT"])
def test_torch_compile_fullgraph(name):
    build, make_inputs, n_calls = MODELS[name]
    model = build()
    kwargs = make_inputs(torch.float32)
    y_torch = _run(model, kwargs)
    ops = []

    def count_ops(gm, example_inputs):  # the captured graph, run as is
        ops.extend(n for n in gm.graph.nodes if n.op == "call_function" and "flashdiff::attention" in str(n.target)
                   or "flashdiff.attention" in str(n.target))
        return gm.forward

    patch(model)
    try:
        torch._dynamo.reset()
        y = _run(torch.compile(model, backend=count_ops, fullgraph=True), kwargs)
    finally:
        unpatch(model)
        torch._dynamo.reset()
    assert len(ops) == n_calls, ops
    torch.testing.assert_close(y, y_torch, atol=1e-5, rtol=1e-5)
