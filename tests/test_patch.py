"""flashdiff.patch on real diffusers models built from small configs with random weights.

Each model check: the unpatched model in float64 is the reference, the unpatched fp32 model
is "torch in dtype d", the patched fp32 model is y (flashdiff.testing's rule); unpatch must
give bit-identical outputs again. The timing bar is `python tests/test_patch.py --bench`.
"""
import importlib
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashdiff
from flashdiff.patching import FlashdiffAttnProcessor, FlashGroupNorm, patch, patched, unpatch
from flashdiff.testing import assert_close

diffusers = pytest.importorskip("diffusers")

fpatch = importlib.import_module("flashdiff.patching.sdpa")  # the SDPA override module
fattn = importlib.import_module("flashdiff.patching.attention")  # FlashdiffAttnProcessor's routing


# ------------------------------------------------------------------ tiny models
def tiny_unet2d():
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()


def tiny_unet2d_condition(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                          sample_size=16, **kw):
    return diffusers.UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, sample_size=sample_size,
        down_block_types=("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1),
        norm_num_groups=32, **kw).eval()


def tiny_dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32).eval()


def tiny_vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()


def unet2d_inputs(dtype=torch.float32):
    return (torch.randn(2, 3, 8, 8, dtype=dtype), torch.tensor([10, 500]))


def unet_cond_inputs(dtype=torch.float32, mask=False):
    x, t, e = torch.randn(2, 4, 16, 16, dtype=dtype), torch.tensor([10, 500]), torch.randn(2, 7, 32, dtype=dtype)
    kw = {}
    if mask:  # diffusers turns it into an additive bias: the processor's torch fallback path
        kw["encoder_attention_mask"] = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return (x, t, e), kw


def dit_inputs(dtype=torch.float32):
    return (torch.randn(2, 4, 8, 8, dtype=dtype),), {"timestep": torch.tensor([1, 5]),
                                                     "class_labels": torch.tensor([1, 2])}


MODELS = {
    "UNet2DModel": (tiny_unet2d, lambda d: (unet2d_inputs(d), {})),
    "UNet2DConditionModel": (tiny_unet2d_condition, lambda d: unet_cond_inputs(d)),
    "UNet2DConditionModel-mask": (tiny_unet2d_condition, lambda d: unet_cond_inputs(d, mask=True)),
    "UNet2DConditionModel-scale_shift": (lambda: tiny_unet2d_condition(resnet_time_scale_shift="scale_shift"),
                                         lambda d: unet_cond_inputs(d)),
    "DiTTransformer2DModel": (tiny_dit, dit_inputs),
    "AutoencoderKL": (tiny_vae, lambda d: ((torch.randn(1, 3, 16, 16, dtype=d),), {})),
}


def _run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _cast(args, kwargs, dtype):
    cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}


# ------------------------------------------------------------------ models
CASES = [pytest.param(name, torch.float32, id=name) for name in MODELS] + [
    pytest.param(name, torch.bfloat16, id=f"{name}-bf16") for name in ("UNet2DConditionModel", "DiTTransformer2DModel")]


@pytest.mark.parametrize("name, dtype", CASES)
def test_patched_model_matches_and_unpatch_is_exact(name, dtype):
    build, make_inputs = MODELS[name]
    model = build()
    args, kwargs = make_inputs(torch.float32)
    ref = _run(build_like(model, torch.float64), *_cast(args, kwargs, torch.float64))
    model.to(dtype)
    args, kwargs = _cast(args, kwargs, dtype)
    y_torch = _run(model, args, kwargs)
    report = patch(model)
    assert report.replaced, str(report)
    y = _run(model, args, kwargs)
    assert_close(y, ref, y_torch, name)
    assert not torch.equal(y, y_torch) or name == "DiTTransformer2DModel", \
        "patched output is bit-identical: was anything routed through flashdiff?"
    unpatch(model)
    assert torch.equal(_run(model, args, kwargs), y_torch)


def build_like(model, dtype):
    """A copy of `model` with the same weights in `dtype` (the float64 reference)."""
    twin = type(model).from_config(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin.to(dtype)


def test_report_and_structure_unet_condition():
    model = tiny_unet2d_condition()
    originals = {n: m for n, m in model.named_modules()}
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_resnets = sum(type(m) is diffusers.models.resnet.ResnetBlock2D for m in originals.values())
    report = patch(model)
    counts = report.counts()
    # every ResnetBlock2D fused, conv_norm_out + conv_act fused
    assert counts["group_norm+silu"] == n_resnets + 1, str(report)
    assert counts["attention"] == len(procs), str(report)
    assert isinstance(model.conv_norm_out, FlashGroupNorm) and model.conv_norm_out.activation == "silu"
    assert isinstance(model.conv_act, nn.Identity)
    assert model.conv_norm_out.weight is originals["conv_norm_out"].weight  # shared Parameters
    assert model.state_dict().keys() == state.keys()
    text = str(report)
    assert "conv_norm_out" in text and "AttnProcessor2_0 -> FlashdiffAttnProcessor" in text
    assert all(isinstance(m.processor, FlashdiffAttnProcessor) for m in model.modules() if hasattr(m, "set_processor"))
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    unpatch(model)
    assert {n: m for n, m in model.named_modules()} == originals  # the same objects, same places
    assert all(type(m) is type(originals[n]) for n, m in model.named_modules())
    assert all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "set_processor"))
    unpatch(model)  # a second unpatch is a no-op


def test_selective_flags_and_left_alone_reasons():
    model = tiny_unet2d_condition()
    custom = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    custom.set_processor(diffusers.models.attention_processor.AttnProcessor())
    report = patch(model, group_norm=False)
    assert "group_norm" not in report.counts() and "group_norm+silu" not in report.counts()
    assert not any(isinstance(m, FlashGroupNorm) for m in model.modules())
    assert any("AttnProcessor has no flashdiff equivalent" in why for _, _, why in report.left_alone), str(report)
    assert type(custom.processor).__name__ == "AttnProcessor"
    unpatch(model)
    report = patch(model, attention=False)
    assert "attention" not in report.counts()
    unpatch(model)


def test_shared_activation_is_not_replaced():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.act, self.conv = nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 1)

        def forward(self, h):
            h = self.norm(h)
            h = self.act(h)
            return self.act(self.conv(h))  # act used twice: fusion would be wrong

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.act = nn.GroupNorm(4, 8), nn.SiLU()

        def forward(self, h):
            h = self.norm(h)
            h = self.act(h)
            return h

    model = nn.Sequential(Block(), Pair())
    x = torch.randn(2, 8, 5, 3)
    y_torch = model(x).detach()
    report = patch(model)
    assert isinstance(model[0].act, nn.SiLU) and model[0].norm.activation is None
    assert isinstance(model[1].act, nn.Identity) and model[1].norm.activation == "silu"
    assert report.counts() == {"group_norm+silu": 1, "group_norm": 1}, str(report)
    torch.testing.assert_close(model(x), y_torch, atol=1e-5, rtol=1e-5)
    unpatch(model)
    assert torch.equal(model(x), y_torch)


def test_group_norm_falls_back_per_call():
    gn = nn.GroupNorm(2, 4)
    nn.init.normal_(gn.weight)
    fgn = FlashGroupNorm.from_group_norm(gn, "silu", backend="cuda")  # not servable on CPU inputs
    for x in (torch.randn(3, 4), torch.randn(2, 4, 3), torch.randn(1, 4, 2, 2, 2, 2), torch.randn(2, 4, 5, 5)):
        torch.testing.assert_close(fgn(x), F.silu(gn(x)), atol=1e-5, rtol=1e-5)


def test_attention_falls_back_per_call():
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    kpm = torch.tensor([[True] * 5, [True, True, False, False, False]])
    causal = fpatch._TORCH_SDPA(q, k, v, is_causal=True)
    torch.testing.assert_close(fattn._attention_call(q, k, v, kpm[:, None, None, :], backend="cuda"),
                               fpatch._TORCH_SDPA(q, k, v, attn_mask=kpm[:, None, None, :]))
    with fpatch.sdpa_override():
        assert F.scaled_dot_product_attention is fpatch._sdpa_override
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), causal)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :]),
                                   fpatch._TORCH_SDPA(q, k, v, attn_mask=kpm[:, None, None, :]))
        out = F.scaled_dot_product_attention(q, k[:, :1].expand(2, 3, 5, 16), v, dropout_p=0.0)
        assert out.shape == q.shape
        gqa = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        torch.testing.assert_close(gqa, fpatch._TORCH_SDPA(q, k[:, :1], v[:, :1], enable_gqa=True))
    assert F.scaled_dot_product_attention is fpatch._TORCH_SDPA


def test_sdpa_override_routes_only_what_kernels_serve(monkeypatch):
    """The routing rule, with a stand-in kernel backend (on CPU auto never picks one)."""
    routed = []
    monkeypatch.setattr(fpatch, "_auto_backend", lambda q, k, v, m, b: "cuda")
    monkeypatch.setattr(fpatch, "_fd_attention", lambda q, k, v, m, s, backend: routed.append(backend) or
                        fpatch._TORCH_SDPA(q, k, v, attn_mask=m, scale=s))
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    kpm = torch.rand(2, 1, 1, 5) > 0.3
    with fpatch.sdpa_override():
        sdpa = F.scaled_dot_product_attention
        for call, expect in [
            (lambda: sdpa(q, k, v), 1),
            (lambda: sdpa(q, k, v, attn_mask=kpm, scale=0.3), 1),
            (lambda: sdpa(q, k, v, is_causal=True), 0),
            (lambda: sdpa(q, k, v, dropout_p=0.1), 0),
            (lambda: sdpa(q, k, v, attn_mask=torch.randn(2, 3, 5, 5)), 0),  # additive mask
            (lambda: sdpa(q, k, v, attn_mask=torch.rand(2, 3, 5, 5) > 0.5), 0),  # not key-padding
            (lambda: sdpa(q, k[:, :1], v[:, :1], enable_gqa=True), 0),
            (lambda: sdpa(q[0], k[0], v[0]), 0),  # 3-D
            (lambda: sdpa(q.requires_grad_(), k, v), 0),  # cuda backward re-enters torch SDPA
        ]:
            before = len(routed)
            call()
            assert len(routed) - before == expect


def test_sdpa_override_enable_disable():
    assert not fpatch.sdpa_override_enabled()
    fpatch.enable_sdpa_override()
    fpatch.enable_sdpa_override()  # idempotent
    try:
        assert fpatch.sdpa_override_enabled()
        model = tiny_dit()
        args, kwargs = dit_inputs()
        _run(model, args, kwargs)  # diffusers calls F.scaled_dot_product_attention: routed, no recursion
    finally:
        fpatch.disable_sdpa_override()
    assert F.scaled_dot_product_attention is fpatch._TORCH_SDPA
    fpatch.disable_sdpa_override()  # no-op


def test_bad_input():
    with pytest.raises(TypeError, match="obj must be"):
        patch(object())
    with pytest.raises(ValueError, match="backend must be"):
        patch(nn.GroupNorm(2, 4), backend="tpu")


def test_torch_compile_over_patched_model():
    model = tiny_unet2d()
    args, kwargs = unet2d_inputs(), {}
    y_torch = _run(model, args, kwargs)
    with patched(model) as report:
        assert report.counts()["attention"] == 4
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
        y = _run(compiled, args, kwargs)
    torch.testing.assert_close(y, y_torch, atol=1e-4, rtol=1e-4)
    assert torch.equal(_run(model, args, kwargs), y_torch)
    torch._dynamo.reset()


# ------------------------------------------------------------------ pipeline
def tiny_ddim_pipeline():
    unet = tiny_unet2d()
    return diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=100))


def _sample(pipe, steps=3):
    return pipe(batch_size=2, num_inference_steps=steps, output_type="np", return_dict=False,
                generator=torch.Generator().manual_seed(0))[0]


def test_pipeline_end_to_end(monkeypatch):
    pipe = tiny_ddim_pipeline()
    original_unet, original_scheduler = pipe.unet, pipe.scheduler
    ref_pipe = diffusers.DDIMPipeline(unet=build_like(pipe.unet, torch.float64), scheduler=pipe.scheduler)
    # DDIMPipeline draws its noise in the unet's dtype; the fp64 twin must start from the same
    # (fp32-drawn) noise, so the draw is made in fp32 and cast.
    ddim_mod = sys.modules[type(pipe).__module__]
    randn = ddim_mod.randn_tensor
    monkeypatch.setattr(ddim_mod, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                        randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype))
    y_torch = torch.from_numpy(_sample(pipe))
    ref = torch.from_numpy(_sample(ref_pipe))
    assert ref.dtype == torch.float64
    with patched(pipe) as report:
        text = str(report)
        assert "unet.conv_norm_out" in text and "scheduler" in text
        y = torch.from_numpy(_sample(pipe))
    assert_close(y, ref, y_torch, "DDIMPipeline")
    assert pipe.unet is original_unet and pipe.scheduler is original_scheduler
    assert torch.equal(torch.from_numpy(_sample(pipe)), y_torch)


def test_pipeline_scheduler_swap(monkeypatch):
    """The scheduler is replaced by flashdiff.schedulers' class of the same name built from the
    same config, and put back on unpatch. A stand-in module keeps this independent of the
    schedulers' own tests; a missing class leaves the scheduler alone with the reason."""
    class DDIMScheduler(diffusers.DDIMScheduler):
        pass

    fake = types.ModuleType("flashdiff.schedulers")
    fake.DDIMScheduler = DDIMScheduler
    monkeypatch.setitem(sys.modules, "flashdiff.schedulers", fake)
    pipe = tiny_ddim_pipeline()
    original = pipe.scheduler
    report = patch(pipe, attention=False, group_norm=False)
    assert type(pipe.scheduler) is DDIMScheduler and report.counts() == {"scheduler": 1}
    assert pipe.scheduler.config.num_train_timesteps == 100
    unpatch(pipe)
    assert pipe.scheduler is original

    del fake.DDIMScheduler
    report = patch(pipe, attention=False, group_norm=False)
    assert pipe.scheduler is original
    assert any("has no DDIMScheduler" in why for _, _, why in report.left_alone), str(report)
    unpatch(pipe)


# ------------------------------------------------------------------ timing bar (not a test)
def bench(repeats=20):
    """Patched vs unpatched UNet2DConditionModel forward, fp32, CPU, small SD-like config,
    batch 2; medians of `repeats` runs each in one process, interleaved ABBA."""
    import statistics
    import time

    torch.manual_seed(0)
    model = tiny_unet2d_condition(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                                  cross_attention_dim=256, sample_size=32)
    x, t, e = torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), torch.randn(2, 77, 256)
    y_torch = _run(model, (x, t, e), {})
    report = patch(model)
    y = _run(model, (x, t, e), {})
    unpatch(model)
    ref = _run(build_like(model, torch.float64), (x.double(), t, e.double()), {})
    print(assert_close(y, ref, y_torch, "SD-like UNet2DConditionModel"))
    wall = {"unpatched": [], "patched": []}
    cpu = {"unpatched": [], "patched": []}
    for _ in range(2):  # warm-up
        _run(model, (x, t, e), {})
    for i in range(repeats):  # ABBA order, so a drift in machine load hits both alike
        for mode in (("unpatched", "patched") if i % 2 == 0 else ("patched", "unpatched")):
            if mode == "patched":
                patch(model)
            t0, c0 = time.perf_counter(), time.process_time()
            _run(model, (x, t, e), {})
            wall[mode].append((time.perf_counter() - t0) * 1e3)
            cpu[mode].append((time.process_time() - c0) * 1e3)
            unpatch(model)
    print(f"{report.counts()}; threads={torch.get_num_threads()}; cpu backend: "
          f"{flashdiff.backend_status()['cpu'] or 'built'}")
    for label, times in (("wall", wall), ("process CPU", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            q = statistics.quantiles(v, n=5)
            print(f"{label:>12} {k:>10}: median {med[k]:.1f} ms (p20 {q[0]:.1f}, p80 {q[3]:.1f})")
        print(f"{label:>12} unpatched/patched: {med['unpatched'] / med['patched']:.3f}")


if __name__ == "__main__" and "--bench" in sys.argv:
    bench()
