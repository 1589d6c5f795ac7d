"""The compact DiT on flashdiff.layer_norm: its adaLN blocks (nn.AdaLayerNorm) call the fused
LayerNorm + modulation, and the shipped digits DiT samples what it sampled when AdaLayerNorm
was lowered to a one-group group norm over [N·T, D, 1].

tests/fixtures/digits_dit_ddim5.pt was written by `python tests/test_norm_models.py --write`
at commit 912f710, before the change (the group-norm lowering): 5 DDIM steps with guidance 3
of the digits DiT from one fixed noise, in fp32 (auto and reference backends) and fp64
(reference). Do not regenerate it with the new code: it is the "before" of the comparison.
"""
import math
import os
import sys

import pytest
import torch

from flashdiff import models
from flashdiff.nn import AdaLayerNorm
from flashdiff.ops.group_norm import group_norm
from flashdiff.sampling import make_scheduler
from flashdiff.testing import assert_close

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "digits_dit_ddim5.pt")
LABELS = [0, 3, 7, 9]


@torch.no_grad()
def sample_digits(backend, dtype, steps=5, guidance=3.0):
    """DDIM (eta 0: deterministic) with classifier-free guidance; the noise is drawn in fp32
    and cast, so every dtype starts from the same x."""
    model = models.load_pretrained("digits-dit", backend=backend).to(dtype)
    sched = make_scheduler("ddim", model=model, backend="reference")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(LABELS), 1, 8, 8, generator=g).to(dtype)
    y = torch.tensor(LABELS + [model.num_classes] * len(LABELS))
    for t in sched.timesteps:
        cond, uncond = model(torch.cat([x, x]), t.expand(2 * len(LABELS)), y).chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def group_norm_lowering(self, x, shift=None, scale=None):
    """AdaLayerNorm.forward as it was: LayerNorm as group norm with one group on [N·T, D, 1]
    (a token is a sample), the modulation expanded to every token."""
    N, T, D = x.shape

    def per_token(m):
        return None if m is None else m[:, None, :].expand(N, T, D).reshape(N * T, D)

    y = group_norm(x.reshape(N * T, D, 1), 1, None, None, self.eps, None, per_token(scale), per_token(shift),
                   backend=self.backend)
    return y.view(N, T, D)


def _skip_without_checkpoint():
    if not os.path.exists(models.checkpoint_path("digits-dit")):
        pytest.skip("digits-dit checkpoint not trained here")


@pytest.fixture(scope="module")
def before():
    _skip_without_checkpoint()
    return torch.load(FIXTURE)


@pytest.mark.parametrize("backend", [None, "cpu", "torch", "reference"])
def test_samples_match_the_group_norm_lowering(before, backend):
    """Fused layer_norm samples against the fp64 samples of the old lowering, by the rule
    (torch-in-dtype: the old reference path in fp32)."""
    y = sample_digits(backend, torch.float32)
    assert_close(y, before["reference_fp64"], before["reference_fp32"], f"digits DiT, backend {backend}")
    # and as close to the old fused path's samples as those were to the fp64 reference
    assert (y - before["auto_fp32"]).abs().max() <= 2 * (before["auto_fp32"].double() - before["reference_fp64"]).abs().max() + 1e-5


def test_fp64_reference_is_the_same_math(before):
    """The fp64 reference of the new path (layer_norm) is the old one (group norm) to rounding."""
    torch.testing.assert_close(sample_digits("reference", torch.float64), before["reference_fp64"],
                               atol=1e-12, rtol=0)


def test_live_lowering_matches(monkeypatch):
    """Without the fixture: the same sampling with AdaLayerNorm put back on group norm."""
    _skip_without_checkpoint()
    y = sample_digits(None, torch.float32)
    ref = sample_digits("reference", torch.float64)
    monkeypatch.setattr(AdaLayerNorm, "forward", group_norm_lowering)
    assert_close(y, ref, sample_digits(None, torch.float32), "layer_norm vs group-norm lowering")


def test_ada_layer_norm_calls_layer_norm_with_unexpanded_modulation(monkeypatch):
    """One flashdiff.layer_norm call per norm, scale/shift [N, D] passed as they are (views of
    the chunked modulation: no per-token copy)."""
    from flashdiff.nn import norm as nn_norm

    seen = []
    real = nn_norm.layer_norm
    monkeypatch.setattr(nn_norm, "layer_norm", lambda x, *a, **k: seen.append((x, k)) or real(x, *a, **k))
    norm = AdaLayerNorm(16)
    x = torch.randn(2, 5, 16)
    mod = torch.randn(2, 32)
    shift, scale = mod.chunk(2, dim=1)
    y = norm(x, shift, scale)
    assert len(seen) == 1 and seen[0][1]["scale"] is scale and seen[0][1]["shift"] is shift
    ref = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(norm(x), real(x, (16,), eps=1e-6))  # no modulation: plain LayerNorm


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_bench_cases_and_tune_classes(op):
    """`flashdiff bench` has the norm cases (auto, the backends, torch eager, a copy), their
    outputs agree with torch eager; `flashdiff tune` times every implementation of the op."""
    from flashdiff import bench, presets
    from flashdiff.bench import tune

    compiler = bench._Compiler(False, "default", 0.0)
    for _, b, shape in presets.expand(["tiny"], op):
        case = bench.CASE_BUILDERS[op]("tiny", b, shape, torch.float32, "cpu", ["cpu"], compiler)
        records = bench._run_case(case, "cpu", bench.BenchOptions(quick=True), {}, lambda msg: None)
        assert {r["backend"] for r in records} == {"auto", "cpu", "torch eager", "copy"}
        assert all(r.get("check") in (None, "ok") and "median_ms" in r for r in records), records
    classes = tune.shape_classes(op, True, "cpu", ["tiny"])
    entry = tune.tune_class(op, classes[0][0], classes[0][1](torch.float32, torch.device("cpu"), torch.Generator()),
                            torch.device("cpu"), True, lambda msg: None)
    assert set(entry["times_ms"]) >= {"cpu", "torch"} and entry["best"] in ("cpu", "torch")
    assert entry["features"]["log2_d"] == math.log2(classes[0][1](torch.float32, "cpu", torch.Generator())["x"].shape[-1])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    torch.save({"auto_fp32": sample_digits(None, torch.float32),
                "reference_fp32": sample_digits("reference", torch.float32),
                "reference_fp64": sample_digits("reference", torch.float64)}, FIXTURE)
    print("wrote", FIXTURE)
