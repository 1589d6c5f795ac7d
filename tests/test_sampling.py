"""The sampling loop (CPU smoke tests, fused vs reference, seeds), the CLI handlers, and the
CUDA-graph capture (GPU only)."""
import argparse
import os

import numpy as np
import pytest
import torch

from flashdiff import models
from flashdiff.models import DiT_models, UNet_models
from flashdiff.nn import set_backend
from flashdiff.sampling import GraphedSampler, make_scheduler, sample

SAMPLERS = ["ddim", "ddpm", "euler", "dpmpp"]


def _tiny(kind="unet"):
    torch.manual_seed(0)
    model = (UNet_models["UNet-digits"]() if kind == "unet" else DiT_models["DiT-digits"](depth=1)).eval()
    with torch.no_grad():  # leave the zero init: outputs must depend on the input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_sampling_smoke_cpu(kind, sampler):
    model = _tiny(kind)
    out = sample(model, make_scheduler(sampler), labels=[0, 3, 9], num_inference_steps=4, guidance_scale=2.5,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_seed_determinism_and_fused_vs_reference():
    model = _tiny()
    kw = dict(labels=list(range(10)), num_inference_steps=6, guidance_scale=3.0, progress=False)
    a = sample(model, make_scheduler("ddim"), generator=torch.Generator().manual_seed(1), **kw)
    b = sample(model, make_scheduler("ddim"), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    set_backend(model, "reference")
    ref = sample(model, make_scheduler("ddim", backend="reference"), generator=torch.Generator().manual_seed(1), **kw)
    assert float((a - ref).abs().max()) < 1e-3


def test_no_guidance_runs_single_batch():
    model = _tiny()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    sample(model, make_scheduler("ddim"), labels=[1, 2], num_inference_steps=3, guidance_scale=None, progress=False)
    assert calls == [2, 2, 2]
    calls.clear()
    sample(model, make_scheduler("ddim"), labels=[1, 2], num_inference_steps=3, guidance_scale=2.0, progress=False)
    assert calls == [4, 4, 4]  # cond + uncond in one batch


def _cli(argv):
    from flashdiff.commands import sample_demo

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sample_demo.add_sample_parser(sub)
    sample_demo.add_demo_parser(sub)
    sample_demo.add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("name", models.PRETRAINED)
def test_sample_cli_writes_npz_and_grid(tmp_path, name):
    if not os.path.exists(models.checkpoint_path(name)):
        pytest.skip("checkpoint not trained yet")
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    assert _cli(["sample", "--model", name, "--sampler", "dpmpp", "--steps", "5", "--labels", "1,7",
                 "--num-per-label", "2", "--out", str(out), "--grid", str(grid), "--device", "cpu"]) == 0
    data = np.load(out)
    assert data["images"].shape == (4, 8, 8) and data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["labels"].tolist() == [1, 1, 7, 7] and grid.stat().st_size > 0


def test_demo_cli(tmp_path, capsys):
    if not os.path.exists(models.checkpoint_path("digits-unet")):
        pytest.skip("checkpoint not trained yet")
    grid = tmp_path / "grid.png"
    assert _cli(["demo", "--steps", "4", "--num-per-label", "1", "--grid", str(grid), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "agreement" in text and grid.exists()


def test_make_scheduler_applies_checkpoint_settings():
    model = _tiny()
    model.checkpoint_info = {"scheduler_config": {"clip_sample": False}}
    assert make_scheduler("ddim", model=model).config.clip_sample is False
    assert make_scheduler("ddim", model=model, clip_sample=True).config.clip_sample is True
    assert make_scheduler("dpmpp", model=model, backend="reference").backend == "reference"  # key ignored
    with pytest.raises(ValueError, match="sampler"):
        make_scheduler("heun")


def test_bad_cli_labels():
    with pytest.raises(SystemExit):
        _cli(["sample", "--labels", "1,x"])


@pytest.mark.gpu
def test_cuda_graph_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _tiny().cuda()
    labels = torch.arange(10, device="cuda")
    for sampler in ("ddim", "dpmpp"):
        torch.manual_seed(0)
        x = torch.randn(10, 1, 8, 8, device="cuda")
        eager_sched = make_scheduler(sampler)
        eager_sched.set_timesteps(8, device="cuda")
        from flashdiff.sampling import _loop

        with torch.no_grad():
            eager = _loop(model, eager_sched, x.clone(), labels, 3.0, None, 0.0, False, None)
            graphed = GraphedSampler(model, make_scheduler(sampler), labels, 8, 3.0)
            out1 = graphed(x)
            out2 = graphed(x)  # replays reuse the captured loop
        torch.testing.assert_close(out1, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out2, out1)


@pytest.mark.gpu
def test_sample_cuda_graph_is_cached_and_matches_eager():
    """sample(cuda_graph=True) captures once per settings, replays after that, matches the eager
    loop for samplers without per-step noise, and samples the `shape` it is given."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from flashdiff.sampling import _GRAPHS, clear_cuda_graphs

    model = _tiny().cuda()
    kw = dict(labels=list(range(10)), num_inference_steps=8, guidance_scale=3.0, progress=False, device="cuda")
    try:
        for sampler in ("ddim", "euler", "dpmpp"):  # deterministic once the initial noise is drawn
            eager = sample(model, make_scheduler(sampler), generator=torch.Generator().manual_seed(0), **kw)
            graphed = [sample(model, make_scheduler(sampler), generator=torch.Generator().manual_seed(0),
                              cuda_graph=True, **kw) for _ in range(2)]
            torch.testing.assert_close(graphed[0], eager, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(graphed[1], graphed[0])
        assert len(_GRAPHS[model]) == 3  # the second call of each replayed the first one's graph
        out = sample(model, make_scheduler("ddpm"), shape=(1, 16, 16), cuda_graph=True, **kw)
        assert out.shape == (10, 1, 16, 16) and torch.isfinite(out).all()
    finally:
        clear_cuda_graphs(model)
