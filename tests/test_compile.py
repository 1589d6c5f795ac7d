"""torch.compile(fullgraph=True) traces through all three op families (custom ops + fakes)."""
import pytest
import torch

import flashdiff


class TinyDenoiser(torch.nn.Module):
    """norm + activation, self-attention and a fused DDIM step with guidance: one of each op."""

    def __init__(self, channels=8, heads=2):
        super().__init__()
        self.heads = heads
        self.weight = torch.nn.Parameter(torch.randn(channels))
        self.bias = torch.nn.Parameter(torch.randn(channels))
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def forward(self, x, uncond, coefs=None):
        N, C, H, W = x.shape
        h = flashdiff.group_norm(x, 4, self.weight, self.bias, activation="silu")   # (N, C, H, W)
        tokens = h.flatten(2).transpose(1, 2)                                          # (N, HW, C)
        q, k, v = self.qkv(tokens).view(N, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = flashdiff.attention(q, k, v)                                               # (N, heads, HW, C/heads)
        eps = a.transpose(1, 2).reshape(N, H * W, C).transpose(1, 2).reshape(N, C, H, W)
        if coefs is None:  # training: the sampler update has no autograd (inference only)
            return eps
        return flashdiff.scheduler_update(x, eps, coefs, model_output_uncond=uncond)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyDenoiser()
    x, uncond = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    coefs = flashdiff.ddim_coefs(0.3, 0.5, guidance_scale=2.0)
    with torch.no_grad():
        eager = model(x, uncond, coefs)
        compiled = torch.compile(model, fullgraph=True, backend=backend)(x, uncond, coefs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_has_gradients():
    torch.manual_seed(0)
    model = TinyDenoiser()
    x, uncond = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, uncond)
    out.square().mean().backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
