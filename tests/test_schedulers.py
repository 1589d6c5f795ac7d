"""flashdiff.schedulers against diffusers: whole trajectories, every scheduler and prediction type.

At each step both schedulers get the same sample and model output (diffusers' trajectory, so
multistep state stays comparable), and the outputs must agree to a relative error of 1e-5 in
fp32; the free-running trajectories must end within 1e-4. Noise is drawn from twin generators,
so equality also checks that flashdiff draws it the way diffusers does.
"""
import math

import pytest
import torch

from flashdiff import schedulers as fs

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 9, 7)  # 378 elements: odd sizes
PREDICTIONS = ["epsilon", "sample", "v_prediction"]

# (class name, config, set_timesteps n, step kwargs), labelled
CASES = [
    pytest.param("DDIMScheduler", {}, 20, {}, id="ddim-default"),
    pytest.param("DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False),
                 13, dict(eta=0.8), id="ddim-trailing-eta"),
    pytest.param("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, clip_sample=False), 25,
                 dict(eta=0.3, use_clipped_model_output=True), id="ddim-sd-clipped-eps"),
    pytest.param("DDIMScheduler", dict(timestep_spacing="linspace", rescale_betas_zero_snr=True, clip_sample=False,
                                       beta_schedule="squaredcos_cap_v2"), 11, {}, id="ddim-linspace-zsnr-cos"),
    pytest.param("DDPMScheduler", {}, 20, {}, id="ddpm-default"),
    pytest.param("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False),
                 17, {}, id="ddpm-large-trailing"),
    pytest.param("DDPMScheduler", dict(variance_type="fixed_small_log", steps_offset=1, beta_schedule="sigmoid"),
                 10, {}, id="ddpm-smalllog-sigmoid"),
    pytest.param("DPMSolverMultistepScheduler", {}, 10, {}, id="dpmpp-2m-short"),
    pytest.param("DPMSolverMultistepScheduler", {}, 20, {}, id="dpmpp-2m-long"),
    pytest.param("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                                     lower_order_final=False), 16, {}, id="dpmpp-2m-karras"),
    pytest.param("DPMSolverMultistepScheduler", dict(solver_order=1, timestep_spacing="trailing"), 12, {},
                 id="dpmpp-1-trailing"),
    pytest.param("DPMSolverMultistepScheduler", dict(euler_at_final=True, timestep_spacing="leading",
                                                     steps_offset=1), 18, {}, id="dpmpp-euler-final"),
]
FLOW_CASES = [
    pytest.param(dict(), 12, {}, id="flow-default"),
    pytest.param(dict(shift=3.0), 28, {}, id="flow-shift3"),
    pytest.param(dict(shift=3.0, stochastic_sampling=True), 9, {}, id="flow-stochastic"),
    pytest.param(dict(use_dynamic_shifting=True), 10, dict(mu=0.7), id="flow-dynamic-mu"),
    pytest.param(dict(shift_terminal=0.1, use_karras_sigmas=True), 10, {}, id="flow-terminal-karras"),
    pytest.param(dict(invert_sigmas=True), 8, {}, id="flow-inverted"),
]


def _model(x, i):
    """A deterministic stand-in for a network: depends on the sample and the step."""
    g = torch.Generator().manual_seed(1000 + i)
    return 0.7 * torch.tanh(x) + 0.5 * torch.randn(x.shape, generator=g)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _compare(ours, theirs, n, step_kw, set_kw=None, guided=False):
    set_kw = set_kw or {}
    ours.set_timesteps(n, **set_kw)
    theirs.set_timesteps(n, **set_kw)
    assert torch.equal(ours.timesteps.to(theirs.timesteps.dtype), theirs.timesteps)
    x = torch.randn(SHAPE)
    gen_ours, gen_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_free = x.clone()
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        m = _model(x, i)
        kw_theirs = dict(step_kw)
        if "generator" in theirs.step.__code__.co_varnames:
            kw_theirs["generator"] = gen_theirs
        kw_ours = {**step_kw, **({"generator": gen_ours} if "generator" in kw_theirs else {})}
        if guided:  # ours fuses u + g·(c − u); diffusers gets the guided output
            u = _model(-x, i)
            ref = theirs.step(u + 4.0 * (m - u), t, x, **kw_theirs)
            out = ours.step(m, ours.timesteps[i], x, model_output_uncond=u, guidance_scale=4.0, **kw_ours)
        else:
            ref = theirs.step(m, t, x, **kw_theirs)
            out = ours.step(m, ours.timesteps[i], x, **kw_ours)
        worst = max(worst, _rel(out.prev_sample, ref.prev_sample))
        if getattr(ref, "pred_original_sample", None) is not None:
            worst = max(worst, _rel(out.pred_original_sample, ref.pred_original_sample))
        x = ref.prev_sample
    assert worst <= 1e-5, f"worst per-step relative error {worst:.2e}"
    return x


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name, config, n, step_kw", CASES)
def test_matches_diffusers(name, config, n, step_kw, prediction):
    theirs = getattr(diffusers, name)(prediction_type=prediction, **config)
    ours = getattr(fs, name).from_config(theirs.config)
    _compare(ours, theirs, n, step_kw)


@pytest.mark.parametrize("config, n, set_kw", FLOW_CASES)
def test_flow_matches_diffusers(config, n, set_kw):
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ours = fs.FlowMatchEulerDiscreteScheduler.from_config(theirs.config)
    _compare(ours, theirs, n, {}, set_kw)


@pytest.mark.parametrize("name, config", [
    ("DDIMScheduler", dict(clip_sample=False)), ("DDPMScheduler", {}), ("DPMSolverMultistepScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0)),
], ids=["ddim", "ddpm", "dpmpp", "flow"])
def test_guidance_is_fused(name, config):
    theirs = getattr(diffusers, name)(**config)
    ours = getattr(fs, name).from_config(theirs.config)
    _compare(ours, theirs, 8, {}, guided=True)


def test_free_running_trajectories_end_close():
    """Each scheduler follows its own samples for a whole run: the ends agree to 1e-4."""
    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"):
        theirs, ours = getattr(diffusers, name)(), getattr(fs, name)()
        theirs.set_timesteps(25)
        ours.set_timesteps(25)
        xa = xb = torch.randn(SHAPE)
        for i, t in enumerate(theirs.timesteps):
            xa = theirs.step(_model(xa, i), t, xa).prev_sample
            xb = ours.step(_model(xb, i), ours.timesteps[i], xb).prev_sample
        assert _rel(xb, xa) <= 1e-4, name


def test_tensor_guidance_scale_and_variance_noise():
    ours, theirs = fs.DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x, c, u, n = (torch.randn(SHAPE) for _ in range(4))
    t = theirs.timesteps[3]
    ref = theirs.step(u + 2.5 * (c - u), t, x, eta=0.5, variance_noise=n).prev_sample
    out = ours.step(c, t, x, eta=0.5, variance_noise=n, model_output_uncond=u,
                    guidance_scale=torch.tensor(2.5)).prev_sample
    assert _rel(out, ref) <= 1e-5


def test_list_of_generators_like_diffusers():
    ours, theirs = fs.DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    t = theirs.timesteps[0]
    assert _rel(ours.step(m, t, x, generator=gens()).prev_sample,
                theirs.step(m, t, x, generator=gens()).prev_sample) <= 1e-5


def test_off_schedule_ddim_timestep():
    """diffusers' DDIM accepts any integer timestep: so does this one."""
    ours, theirs = fs.DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    assert _rel(ours.step(m, 537, x).prev_sample, theirs.step(m, 537, x).prev_sample) <= 1e-5


def test_step_is_one_fused_update(monkeypatch):
    """Every step calls flashdiff.scheduler_update exactly once, with a row of the table."""
    from flashdiff.schedulers import _base, ddim

    calls = []
    real = _base.scheduler_update

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(_base, "scheduler_update", spy)
    monkeypatch.setattr(ddim, "scheduler_update", spy)
    for cls in (fs.DDIMScheduler, fs.DDPMScheduler, fs.DPMSolverMultistepScheduler, fs.FlowMatchEulerDiscreteScheduler):
        s = cls()
        s.set_timesteps(6)
        x = torch.randn(SHAPE)
        calls.clear()
        for t in s.timesteps:
            x = s.step(torch.randn(SHAPE), t, x, model_output_uncond=torch.randn(SHAPE), guidance_scale=2.0).prev_sample
        assert len(calls) == 6, cls.__name__
        assert all(c.shape == (12,) and c._base is not None for c in calls), "coefs must be views of the table"


def test_from_config_ignores_foreign_keys_and_takes_overrides():
    cfg = dict(diffusers.DDIMScheduler(beta_schedule="scaled_linear").config)
    cfg["some_future_key"] = 1
    s = fs.DDIMScheduler.from_config(cfg, prediction_type="v_prediction", backend="reference")
    assert s.config.beta_schedule == "scaled_linear" and s.config.prediction_type == "v_prediction"
    assert s.backend == "reference" and "backend" not in s.config


@pytest.mark.parametrize("cls, kw, path", [
    (fs.DDIMScheduler, {}, "fused"),
    (fs.DDIMScheduler, dict(thresholding=True), "two-pass"),
    (fs.DDPMScheduler, dict(variance_type="learned_range"), "fused"),
    (fs.DDPMScheduler, dict(variance_type="fixed_large_log"), "fallback"),
    (fs.DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "fused"),
    (fs.DPMSolverMultistepScheduler, dict(solver_order=3), "fallback"),
    (fs.EulerAncestralDiscreteScheduler, dict(prediction_type="sample"), "fallback"),
])
def test_fused_path_says_which_and_why(cls, kw, path):
    s = cls(**kw)
    assert s.fused_path == path
    assert f": {path}: " in s.explain()


def test_unknown_beta_schedule_raises_like_diffusers():
    with pytest.raises(NotImplementedError, match="nope"):
        fs.DDIMScheduler(beta_schedule="nope")


def test_bad_use():
    s = fs.DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.randn(SHAPE), 10, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(2000)
    f = fs.FlowMatchEulerDiscreteScheduler()
    f.set_timesteps(3)
    with pytest.raises(ValueError, match="integer"):
        f.step(torch.randn(SHAPE), 5, torch.randn(SHAPE))
    for t in f.timesteps:
        f.step(torch.randn(SHAPE), t, torch.randn(SHAPE))
    with pytest.raises(IndexError, match="set_timesteps"):
        f.step(torch.randn(SHAPE), f.timesteps[0].cuda() if torch.cuda.is_available() else torch.tensor(0.5),
               torch.randn(SHAPE))


def test_reference_backend_agrees_with_fused():
    for backend in ("reference", None):
        s = fs.DPMSolverMultistepScheduler(backend=backend)
        s.set_timesteps(8)
        torch.manual_seed(3)
        x = torch.randn(SHAPE)
        for i, t in enumerate(s.timesteps):
            x = s.step(_model(x, i), t, x).prev_sample
        if backend == "reference":
            ref = x
    assert _rel(x, ref) <= 1e-5 and math.isfinite(float(x.abs().max()))


def test_guidance_must_be_finite_and_the_table_cache_is_bounded():
    """A NaN/inf guidance_scale used to pass and give NaN samples; every distinct float guidance
    cached a new [T, 12] table forever (a guidance schedule leaked)."""
    import pytest
    import torch

    from flashdiff.schedulers import DDIMScheduler
    from flashdiff.schedulers import _base

    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            s.step(x, s.timesteps[0], x, model_output_uncond=x, guidance_scale=bad)
    for i in range(3 * _base._MAX_TABLES):
        s.step(x, s.timesteps[0], x, model_output_uncond=x, guidance_scale=1.0 + 0.01 * i)
        s._step_index = None
    assert len(s._tables) <= _base._MAX_TABLES


def test_ddim_device_timestep_is_looked_up_by_value_like_diffusers(monkeypatch):
    """diffusers' DDIM derives ᾱ from the timestep's value. A device-tensor timestep used to be
    ignored (a step counter decided); now its row is gathered on the device. The device path is
    forced here on CPU tensors (no GPU in CI) by making every timestep look device-resident;
    out-of-order timesteps (as an img2img or a custom loop passes) match diffusers' step."""
    import diffusers
    import torch

    from flashdiff.schedulers import DDIMScheduler
    from flashdiff.schedulers import ddim as fd_ddim

    monkeypatch.setattr(fd_ddim, "_host_value", lambda t: None)
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in (ours.timesteps[7], ours.timesteps[0], torch.tensor(333), ours.timesteps[19]):  # any order, off-schedule too
        m = torch.randn(2, 4, 8, 8, generator=g)
        a = ours.step(m, t, x).prev_sample
        b = theirs.step(m, t, x).prev_sample
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_ddpm_device_timestep_is_found_by_value_like_diffusers(monkeypatch):
    """As for DDIM: diffusers' DDPM finds a timestep's place in the schedule by its value; a
    device timestep used to follow the step counter. Device path forced on CPU tensors; diffusers
    adds no noise at t = 0, and the table's row there has a zero noise weight."""
    import diffusers
    import torch

    from flashdiff.schedulers import DDPMScheduler
    from flashdiff.schedulers import ddpm as fd_ddpm

    monkeypatch.setattr(fd_ddpm, "_host_value", lambda t: None)
    for variance_type in ("fixed_small", "fixed_large", "learned_range"):
        ours, theirs = DDPMScheduler(variance_type=variance_type), diffusers.DDPMScheduler(variance_type=variance_type)
        for s in (ours, theirs):
            s.set_timesteps(10)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 8, 8, generator=g)
        c = 8 if variance_type.startswith("learned") else 4
        for i in (6, 0, 9, 3):
            t = ours.timesteps[i]
            m = torch.randn(2, c, 8, 8, generator=g)
            # a fresh generator per step and scheduler: the same noise where diffusers draws it
            a = ours.step(m, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
            b = theirs.step(m, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=f"{variance_type} step {i}")
