"""The fused sampler updates on every backend against the per-family references.

The references in flashdiff.reference are written in the papers'/diffusers' form, apart from
the coefficient builders, so these tests check the builders and the kernels together.
"""
import math
import re
from pathlib import Path

import pytest
import torch

import flashdiff
from flashdiff import reference
from flashdiff.testing import assert_close, poisoned_outputs

from conftest import DEVICE_BACKENDS, DTYPE_IDS, DTYPES, require_backend

SHAPE = (2, 4, 9, 7)  # 504 elements: not a multiple of any vector width
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def _tensors(dtype, device, shape=SHAPE):
    return [torch.randn(shape, device=device).to(dtype) for _ in range(5)]


def _run_family(family, backend, x, m, u, n, d, prediction, cfg, noisy):
    """(op output, reference args) for one family; kwargs shared by the op and its reference."""
    guidance = dict(model_output_uncond=u, guidance_scale=4.5) if cfg else {}
    if family == "ddim":
        kw = dict(eta=0.6 if noisy else 0.0, noise=n if noisy else None, prediction_type=prediction,
                  clip_sample_range=1.5, **guidance)
        return flashdiff.ddim_step, reference.ddim_step, (m, x, 0.31, 0.55), kw
    if family == "ddim-clipped-eps":
        kw = dict(eta=0.3, noise=n, prediction_type=prediction, clip_sample_range=1.0,
                  use_clipped_model_output=True, **guidance)
        return flashdiff.ddim_step, reference.ddim_step, (m, x, 0.2, 0.9999), kw
    if family == "ddpm":
        kw = dict(noise=n if noisy else None, prediction_type=prediction, clip_sample_range=1.0, **guidance)
        return flashdiff.ddpm_step, reference.ddpm_step, (m, x, 0.4, 0.62), kw
    if family == "flow-euler":
        kw = dict(noise=n if noisy else None, **guidance)
        return flashdiff.flow_euler_step, reference.flow_euler_step, (m, x, 0.8, 0.65), kw
    if family == "dpmpp-2m":
        kw = dict(prediction_type=prediction, **guidance)
        if noisy:  # second order, with the previous step's x0
            kw.update(sigma_prev=2.9, prev_x0=d)
        return flashdiff.dpmpp_2m_step, reference.dpmpp_2m_step, (m, x, 0.7, 1.6), kw
    raise AssertionError(family)


FAMILIES = ["ddim", "ddim-clipped-eps", "ddpm", "flow-euler", "dpmpp-2m"]
# flow matching predicts a velocity only: its one case runs under the "epsilon" label
FAMILY_PREDICTIONS = [(f, p) for f in FAMILIES for p in PREDICTIONS if f != "flow-euler" or p == "epsilon"]


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("family, prediction", FAMILY_PREDICTIONS, ids=lambda v: v)
@pytest.mark.parametrize("cfg, noisy", [(False, False), (True, True)], ids=["plain", "cfg+noise"])
def test_family_step(device_backend, dtype, family, prediction, cfg, noisy):
    device, backend = device_backend
    require_backend(device, backend)
    x, m, u, n, d = _tensors(dtype, device)
    op, ref_fn, args, kw = _run_family(family, backend, x, m, u, n, d, prediction, cfg, noisy)
    with poisoned_outputs():
        prev, x0 = op(*args, **kw, return_x0=True, backend=backend)
    ref_prev, ref_x0 = ref_fn(*args, **kw, upcast=True)
    ref_prev_d, ref_x0_d = ref_fn(*args, **kw, upcast=False)
    label = f"{family} {prediction} {backend} {dtype} cfg={cfg} noisy={noisy}"
    assert prev.dtype == dtype and prev.shape == x.shape
    assert_close(prev, ref_prev, ref_prev_d, label + " prev")
    assert_close(x0, ref_x0, ref_x0_d, label + " x0")
    with poisoned_outputs():  # no x0 output: unclipped families take the CPU's folded form
        prev_only = op(*args, **kw, return_x0=False, backend=backend)
    assert_close(prev_only, ref_prev, ref_prev_d, label + " prev (return_x0=False)")


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (1, 4, 17, 19), (2, 4, 64, 64)],
                         ids=["single", "tiny-odd", "prime", "sd-latent"])
@pytest.mark.parametrize("flags", range(16), ids=lambda f: f"flags{f:04b}")
@pytest.mark.parametrize("clip", [0.8, float("inf")], ids=["clip", "noclip"])
def test_generic_update_every_flag(device_backend, shape, flags, clip):
    """uncond / noise / prev_x0 / x0-output each present or absent, clipping or not: every
    kernel variant (the CPU folds the update when nothing clips and x0 is not written)."""
    device, backend = device_backend
    require_backend(device, backend)
    x, m, u, n, d = _tensors(torch.float32, device, shape)
    coefs = torch.randn(12, device=device)
    coefs[3] = clip
    u, n, d = (t if flags >> i & 1 else None for i, t in enumerate((u, n, d)))
    return_x0 = bool(flags >> 3 & 1)
    with poisoned_outputs():
        out = flashdiff.scheduler_update(x, m, coefs, u, n, d, return_x0=return_x0, backend=backend)
    prev, x0 = out if return_x0 else (out, None)
    ref = reference.scheduler_update(x, m, coefs, u, n, d, upcast=True)
    ref_d = reference.scheduler_update(x, m, coefs, u, n, d, upcast=False)
    assert_close(prev, ref[0], ref_d[0], "prev")
    if return_x0:
        assert_close(x0, ref[1], ref_d[1], "x0")


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("return_x0", [False, True])
@pytest.mark.parametrize("where", ["sample", "model_output"])
def test_inf_inputs_match_the_reference(device_backend, return_x0, where):
    """An inf in x or m meets inf - inf in the update (NaN in the reference), whichever form
    a backend computes it in: the CPU's folded form (no clip, no x0 output) must agree."""
    device, backend = device_backend
    require_backend(device, backend)
    x, m, u, *_ = _tensors(torch.float32, device, (17,))
    (x if where == "sample" else m)[3] = float("inf")
    (x if where == "sample" else m)[9] = float("-inf")
    coefs = flashdiff.ddim_coefs(0.5, 0.7, guidance_scale=3.0)
    with poisoned_outputs():
        out = flashdiff.scheduler_update(x, m, coefs, u, return_x0=return_x0, backend=backend)
    prev = out[0] if return_x0 else out
    ref = reference.scheduler_update(x, m, coefs, u, upcast=True)[0]
    ref_d = reference.scheduler_update(x, m, coefs, u, upcast=False)[0]
    assert_close(prev, ref, ref_d, f"{backend} inf in {where}, return_x0={return_x0}")


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
def test_nan_propagates_through_clip(device_backend):
    device, backend = device_backend
    require_backend(device, backend)
    x, m, *_ = _tensors(torch.float32, device)
    m[0, 0, 0, 0] = float("nan")
    prev = flashdiff.ddim_step(m, x, 0.3, 0.5, clip_sample_range=1.0, backend=backend)
    assert torch.isnan(prev[0, 0, 0, 0]) and torch.isfinite(prev.flatten()[1:]).all()


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
def test_channels_last_and_strided_operands(device_backend):
    device, backend = device_backend
    require_backend(device, backend)
    x, m, u, n, _ = _tensors(torch.float32, device, (2, 4, 6, 5))
    x = x.contiguous(memory_format=torch.channels_last)
    m = torch.cat([m, m], dim=-1)[..., ::2]  # strided: copied by the op
    prev = flashdiff.ddim_step(m, x, 0.3, 0.5, eta=1.0, noise=n, model_output_uncond=u, guidance_scale=2.0,
                               backend=backend)
    ref, _ = reference.ddim_step(m, x, 0.3, 0.5, eta=1.0, noise=n, model_output_uncond=u, guidance_scale=2.0)
    ref_d, _ = reference.ddim_step(m, x, 0.3, 0.5, eta=1.0, noise=n, model_output_uncond=u, guidance_scale=2.0,
                                   upcast=False)
    assert_close(prev, ref, ref_d, "channels_last")


# ------------------------------------------------------------------ coefficient builders
def test_coefficient_order_matches_the_kernels():
    header = Path(__file__).resolve().parents[1] / "csrc" / "include" / "flashdiff" / "params.h"
    if not header.exists():
        pytest.skip("csrc/ not present (installed package tested out of tree)")
    body = re.search(r"enum SchedCoef : int \{(.*?)\};", header.read_text(), re.S).group(1)
    names = re.findall(r"\bk(\w+?)(?: = 0)?,", body)
    snake = [re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower().replace("x0", "x0") for n in names]
    expected = [n.replace("_", "") for n in reference.SCHED_COEF_NAMES]
    assert [s.replace("_", "") for s in snake] == expected


def test_tensor_schedules_build_a_table_equal_to_host_math():
    a = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    a_prev = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)
    table = flashdiff.ddim_coefs(a, a_prev, eta=0.5, prediction_type="v_prediction", guidance_scale=3.0)
    rows = [flashdiff.ddim_coefs(float(a[i]), float(a_prev[i]), eta=0.5, prediction_type="v_prediction",
                                 guidance_scale=3.0) for i in range(3)]
    assert table.shape == (3, 12)
    torch.testing.assert_close(table, torch.stack(rows))
    s = torch.tensor([3.0, 1.0, 0.5]), torch.tensor([1.0, 0.5, 0.0]), torch.tensor([6.0, 3.0, 1.0])
    table = flashdiff.dpmpp_2m_coefs(s[1], s[0], s[2])
    rows = [flashdiff.dpmpp_2m_coefs(float(s[1][i]), float(s[0][i]), float(s[2][i])) for i in range(3)]
    torch.testing.assert_close(table, torch.stack(rows))


def test_dpmpp_final_step_to_sigma_zero_returns_x0():
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    prev, x0 = flashdiff.dpmpp_2m_step(m, x, 0.0, 0.5, sigma_prev=1.0, prev_x0=torch.randn(2, 3), backend="reference")
    torch.testing.assert_close(prev, x0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, error, match", [
    (lambda x, m: flashdiff.ddim_step(m, x, float("nan"), 0.5), ValueError, "alpha_prod_t must be finite"),
    (lambda x, m: flashdiff.ddim_step(m, x, 1.0, 0.5), ValueError, r"alpha_prod_t must be in \(0, 1\)"),
    (lambda x, m: flashdiff.ddim_step(m, x, 0.3, math.inf), ValueError, "alpha_prod_t_prev must be finite"),
    (lambda x, m: flashdiff.ddim_step(m, x, 0.3, 0.5, eta=0.5), ValueError, "pass noise"),
    (lambda x, m: flashdiff.ddim_step(m, x, 0.3, 0.5, prediction_type="eps"), ValueError, "prediction_type"),
    (lambda x, m: flashdiff.ddim_step(m, x, 0.3, 0.5, guidance_scale=float("nan"),
                                      model_output_uncond=m), ValueError, "guidance_scale must be finite"),
    (lambda x, m: flashdiff.ddim_step(m[0], x, 0.3, 0.5), ValueError, "model_output must have shape"),
    (lambda x, m: flashdiff.ddim_step(m.half(), x, 0.3, 0.5), TypeError, "model_output has dtype"),
    (lambda x, m: flashdiff.ddim_step(m, x.int(), 0.3, 0.5), TypeError, "sample must be a floating tensor"),
    (lambda x, m: flashdiff.ddim_step(m, x, 0.3, 0.5, noise=x.to("meta"), eta=1.0), ValueError, "noise is on meta"),
    (lambda x, m: flashdiff.ddpm_step(m, x, 0.3, 0.5, variance_type="learned"), ValueError, "variance_type"),
    (lambda x, m: flashdiff.flow_euler_step(m, x, float("inf"), 0.5), ValueError, "sigma must be finite"),
    (lambda x, m: flashdiff.dpmpp_2m_step(m, x, 0.5, 1.0, sigma_prev=2.0), ValueError, "go together"),
    (lambda x, m: flashdiff.dpmpp_2m_step(m, x, 0.5, 0.0), ValueError, "sigma must be > 0"),
    (lambda x, m: flashdiff.scheduler_update(x, m, torch.zeros(11)), ValueError, "coefs must be a tensor of shape"),
    (lambda x, m: flashdiff.ddim_step(m, x, 0.3, 0.5, backend="cuda"), NotImplementedError, "CUDA tensors"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))


def test_checks_hold_once_the_fast_path_is_warm(monkeypatch):
    """After one validated call, scheduler_update skips its full checks for calls alike it
    (ops/scheduler._fast_impl): every way a later call can differ must still be caught, or
    still computed right."""
    x, m, u = (torch.randn(2, 4, 3, 3) for _ in range(3))
    coefs = flashdiff.ddim_coefs(0.3, 0.5, guidance_scale=2.0)
    expected = flashdiff.scheduler_update(x, m, coefs, u)  # validates, picks the backend
    for call, error, match in [
        (lambda: flashdiff.scheduler_update(x, m[0], coefs, u), ValueError, "model_output must have shape"),
        (lambda: flashdiff.scheduler_update(x, None, coefs, u), TypeError, "model_output must be a torch.Tensor"),
        (lambda: flashdiff.scheduler_update(x, m.int(), coefs, u), TypeError, "model_output must be a floating"),
        (lambda: flashdiff.scheduler_update(x, m, coefs, u.double()), TypeError, "model_output_uncond has dtype"),
        (lambda: flashdiff.scheduler_update(x, m, coefs, u.to("meta")), ValueError, "model_output_uncond is on meta"),
        (lambda: flashdiff.scheduler_update(x, m, coefs, u, noise=x[:1]), ValueError, "noise must have shape"),
        (lambda: flashdiff.scheduler_update(x, m, coefs[:11], u), ValueError, "coefs must be a tensor of shape"),
        (lambda: flashdiff.scheduler_update(x, m, coefs[None], u), ValueError, "coefs must be a tensor of shape"),
        (lambda: flashdiff.scheduler_update(x, m, coefs.int(), u), TypeError, "coefs must be floating"),
        (lambda: flashdiff.scheduler_update(x, m, coefs.to("meta"), u), ValueError, "coefs is on meta"),
        (lambda: flashdiff.scheduler_update(x.to("meta"), m, coefs, u), ValueError, "is on cpu but sample is on meta"),
    ]:
        with pytest.raises(error, match=match):
            call()
    # layouts and dtypes the fast path passes by go through the full path, same values
    for prev in (flashdiff.scheduler_update(x, torch.stack([m, m], -1)[..., 0], coefs, u),
                 flashdiff.scheduler_update(x, m, coefs.double(), u),
                 flashdiff.scheduler_update(x, m, torch.stack([coefs, coefs], 1)[:, 0], u),
                 flashdiff.scheduler_update(x.contiguous(memory_format=torch.channels_last), m, coefs, u)):
        torch.testing.assert_close(prev, expected)
    # the backend override is part of what the fast path remembers
    dispatch = flashdiff.backends.REGISTRY["scheduler_update"][0]
    reference_impl, used = dispatch.impls["reference"], []
    monkeypatch.setitem(dispatch.impls, "reference", lambda *a: used.append(1) or reference_impl(*a))
    flashdiff.set_override("reference")
    try:
        torch.testing.assert_close(flashdiff.scheduler_update(x, m, coefs, u), expected)
    finally:
        flashdiff.set_override(None)
    assert used


def test_host_schedule_memo_keeps_its_checks():
    """Builders memoize host-number schedules; a hit must not skip a check (True == 1.0)
    nor ever stand for a tensor's values."""
    assert flashdiff.ddim_coefs(0.3, 0.5, 1.0) is flashdiff.ddim_coefs(0.3, 0.5, 1.0)
    with pytest.raises(TypeError, match="eta must be a real number"):
        flashdiff.ddim_coefs(0.3, 0.5, True)
    with pytest.raises(ValueError, match="eta must be finite"):
        flashdiff.ddim_coefs(0.3, 0.5, float("nan"))
    with pytest.raises(TypeError, match="alpha_prod_t must be a real number"):
        flashdiff.ddim_coefs([0.3], 0.5)  # unhashable: the builder names it
    a = torch.tensor(0.3, dtype=torch.float64)
    before = flashdiff.ddim_coefs(a, 0.5)
    a.fill_(0.4)
    torch.testing.assert_close(flashdiff.ddim_coefs(a, 0.5), flashdiff.ddim_coefs(0.4, 0.5))
    assert not torch.equal(before, flashdiff.ddim_coefs(a, 0.5))


def test_empty_latents():
    x = torch.randn(0, 4, 8, 8)
    assert flashdiff.ddim_step(x, x, 0.3, 0.5).shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_gradients_flow_through_the_update(backend):
    """scheduler_update used to drop gradients silently (its output did not require grad)."""
    require_backend("cpu", backend)
    torch.manual_seed(3)
    shape = (2, 3, 5, 7)
    x, c, u, n, p = (torch.randn(shape, dtype=torch.float64 if backend == "reference" else torch.float32,
                                 requires_grad=True) for _ in range(5))
    coefs = flashdiff.ddim_coefs(0.4, 0.6, eta=0.5, clip_sample_range=1.5, guidance_scale=2.0).to(x.dtype)
    coefs = coefs.clone().requires_grad_(True)
    prev, x0 = flashdiff.scheduler_update(x, c, coefs, u, n, p, return_x0=True, backend=backend)
    assert prev.requires_grad and x0.requires_grad
    w1, w2 = torch.randn(shape), torch.randn(shape)
    ((prev * w1).sum() + (x0 * w2).sum()).backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (x, c, coefs, u, n, p)]
    rp, rx0 = reference.scheduler_update(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5])
    ((rp * w1.double()).sum() + (rx0 * w2.double()).sum()).backward()
    for got, want in zip((x, c, coefs, u, n, p), leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_fast_path_does_not_swallow_autograd():
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    coefs = flashdiff.ddim_coefs(0.4, 0.6)
    with torch.no_grad():
        flashdiff.scheduler_update(x, c, coefs)  # warms the fast path for this signature
    c.requires_grad_(True)
    y = flashdiff.scheduler_update(x, c, coefs)
    assert y.requires_grad
    y.sum().backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()


@pytest.mark.parametrize("call, match", [
    (lambda: flashdiff.ddim_coefs(0.5, 0.6, eta=2.0), "eta"),                       # was: math domain error
    (lambda: flashdiff.ddim_coefs(torch.tensor(0.0), torch.tensor(0.5)), "alpha_prod_t"),  # was: inf coefficients
    (lambda: flashdiff.ddim_coefs(torch.tensor([0.5, 1.0]), torch.tensor([0.6, 0.7])), "alpha_prod_t"),
    (lambda: flashdiff.dpmpp_2m_coefs(0.3, 0.5, 0.5), "sigma_prev"),                # was: ZeroDivisionError
    (lambda: flashdiff.dpmpp_2m_coefs(0.3, 0.5, 0.0), "sigma_prev"),                # was: math domain error
    (lambda: flashdiff.dpmpp_2m_coefs(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.5])), "sigma_prev"),
])
def test_bad_schedule_values_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_host_schedules_reach_a_gpu_without_blocking_the_host(monkeypatch):
    """Coefficients built from Python numbers for a CUDA sample go through pinned memory and a
    non-blocking copy (a pageable copy blocks the host until the stream drains). Checked by
    recording what _pack asks of torch, since this machine may have no GPU."""
    import flashdiff.ops.scheduler as S

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            calls.append(("to", str(args[0]), kwargs.get("non_blocking")))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    S._pack(device="cuda:0", guidance=2.0, x0_from_x=1.0)
    assert calls == ["pin", ("to", "cuda:0", True)]
