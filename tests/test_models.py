"""The compact DiT and U-Net: fused path vs reference path with the same weights (the
tolerance rule of flashdiff.testing), adaLN-Zero init, checkpoints, bad input."""
import os

import pytest
import torch

import flashdiff
from flashdiff import models
from flashdiff.models import DiT_models, UNet_models
from flashdiff.nn import Attention, GroupNormAct, set_backend
from flashdiff.testing import assert_close

# Small configs covering every layer kind, labelled.
CONFIGS = [
    pytest.param(lambda: DiT_models["DiT-digits"](), (3, 1, 8, 8), None, id="dit-digits"),
    pytest.param(lambda: DiT_models["DiT-S/2"](input_size=6, in_channels=3, hidden_size=48, depth=2, num_heads=3,
                                                num_classes=5, context_dim=20),
                 (2, 3, 6, 6), 20, id="dit-cross-odd-heads"),
    pytest.param(lambda: UNet_models["UNet-digits"](), (3, 1, 8, 8), None, id="unet-digits"),
    pytest.param(lambda: UNet_models["UNet-S"](sample_size=12, in_channels=2, model_channels=12, channel_mult=(1, 2),
                                               num_res_blocks=1, attention_resolutions=(6,), num_heads=2,
                                               num_groups=3, num_classes=4, context_dim=10),
                 (2, 2, 12, 12), 10, id="unet-cross-groups3"),
]


def _randomize(model, std=0.2):
    """Zero-initialised layers would make the comparison vacuous: perturb every weight."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g) / max(1, p.shape[-1] ** 0.5) * 4)
    return model


def _inputs(shape, ctx_dim, num_classes, dtype=torch.float32):
    N = shape[0]
    x = torch.randn(shape, dtype=dtype)
    t = torch.tensor([0, 999, 500][:N] + [17] * max(0, N - 3))[:N]
    y = torch.arange(N) % (num_classes + 1)  # includes the null class
    ctx = None if ctx_dim is None else torch.randn(N, 5, ctx_dim, dtype=dtype)
    return x, t, y, ctx


def _run(model, x, t, y, ctx):
    with torch.no_grad():
        return model(x, t, y, ctx) if ctx is not None else model(x, t, y)


@pytest.mark.parametrize("make, shape, ctx_dim", CONFIGS)
def test_fused_matches_reference(make, shape, ctx_dim):
    model = _randomize(make()).eval()
    x, t, y, ctx = _inputs(shape, ctx_dim, model.num_classes)
    fused = _run(model, x, t, y, ctx)                                   # backend auto (cpu kernels)
    set_backend(model, "reference")
    ref32 = _run(model, x, t, y, ctx)                                   # reference in fp32
    ref64 = _run(model.double(), x.double(), t, y, None if ctx is None else ctx.double())
    assert fused.shape == x.shape and fused.abs().max() > 0.05          # not a vacuous comparison
    assert_close(fused, ref64, ref32, "model output")


@pytest.mark.parametrize("make, shape, ctx_dim", CONFIGS)
def test_backward_runs_on_fused_path(make, shape, ctx_dim):
    model = _randomize(make()).train()
    x, t, y, ctx = _inputs(shape, ctx_dim, model.num_classes)
    out = model(x, t, y, ctx) if ctx is not None else model(x, t, y)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_adaln_zero_and_zero_output_init():
    dit = DiT_models["DiT-digits"]().eval()
    for block in dit.blocks:
        assert block.adaLN_modulation[-1].weight.abs().max() == 0
    x, t, y, _ = _inputs((2, 1, 8, 8), None, 10)
    assert _run(dit, x, t, y, None).abs().max() == 0
    unet = UNet_models["UNet-digits"]().eval()
    assert _run(unet, x, t, y, None).abs().max() == 0


def test_named_configs_build():
    assert set(DiT_models) >= {"DiT-digits", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"}
    s = DiT_models["DiT-S/2"](depth=1)  # one block is enough to check the widths
    assert s.config.hidden_size == 384 and s.config.num_heads == 6 and s.grid == 16


def test_backend_switch_reaches_every_layer():
    model = UNet_models["UNet-digits"](backend="reference")
    layers = [m for m in model.modules() if isinstance(m, (GroupNormAct, Attention))]
    assert layers and all(m.backend == "reference" for m in layers)
    set_backend(model, None)
    assert all(m.backend is None for m in layers) and model.backend is None


def test_checkpoint_roundtrip(tmp_path):
    model = _randomize(DiT_models["DiT-digits"]()).eval()
    path = str(tmp_path / "m.safetensors")
    models.save_checkpoint(model, path, extra={"note": "x"})
    loaded = models.load_checkpoint(path, backend="reference")
    x, t, y, _ = _inputs((2, 1, 8, 8), None, 10)
    assert torch.equal(_run(model, x, t, y, None), _run(set_backend(loaded, None), x, t, y, None))
    assert loaded.checkpoint_info["note"] == "x"


@pytest.mark.parametrize("name", models.PRETRAINED)
def test_pretrained_checkpoints_load(name):
    path = models.checkpoint_path(name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not trained yet (python -m flashdiff.train --model {name})")
    assert os.path.getsize(path) < 4 * 2 ** 20, "shipped checkpoints stay small"
    model = models.load_pretrained(name)
    assert model.num_classes == 10 and model.sample_size == 8 and not model.training
    assert "python -m flashdiff.train" in model.checkpoint_info["command"]
    assert model.checkpoint_info["scheduler_config"] == {"clip_sample": False}


def test_bad_input():
    dit = DiT_models["DiT-digits"]()
    with pytest.raises(ValueError, match="x must be"):
        dit(torch.randn(1, 1, 6, 6), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="patch_size"):
        DiT_models["DiT-digits"](input_size=7)
    cross = DiT_models["DiT-digits"](context_dim=4)
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormAct(3, 8)
    with pytest.raises(ValueError, match="unknown model|must be one of"):
        models.load_pretrained("digits-vae")
    assert flashdiff.nn.normalization(12, 32).num_groups == 12
