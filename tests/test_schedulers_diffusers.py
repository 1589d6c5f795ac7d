"""flashdiff.schedulers are diffusers schedulers: config, save/load, set_timesteps options,
output types, and whole trajectories that agree with diffusers' classes to 1e-5 (fp32).

What diffusers' own scheduler tests check (tests/schedulers/test_scheduler_{ddim,ddpm,dpm_multi,
euler,euler_ancestral}.py and the common test_schedulers.py, run with flashdiff's classes in
place of diffusers' by hand, docs/schedulers.md), restated here against diffusers' classes.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.utils import BaseOutput  # noqa: E402

import flashdiff  # noqa: E402
from flashdiff import schedulers as fs  # noqa: E402

NAMES = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
         "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]
SHAPE = (2, 3, 9, 7)
NOISY_KW = {"DDPMScheduler", "EulerAncestralDiscreteScheduler"}  # steps that draw noise every call


def _model(x, i):
    """A deterministic stand-in for a network: depends on the sample and the step."""
    g = torch.Generator().manual_seed(100 + i)
    return 0.6 * torch.tanh(x) + 0.4 * torch.randn(x.shape, generator=g)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _trajectories(name, config, n=None, set_kw=None, step_kw=None, guided=False, channels=3):
    """Both schedulers run free (each on its own samples) from the same noise with twin
    generators; returns the worst relative difference over the whole trajectory."""
    theirs = getattr(diffusers, name)(**config)
    ours = getattr(fs, name).from_config(theirs.config)
    set_kw, step_kw = set_kw or {}, step_kw or {}
    for s in (theirs, ours):
        s.set_timesteps(n, **set_kw) if n is not None else s.set_timesteps(**set_kw)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(SHAPE) * float(theirs.init_noise_sigma if hasattr(theirs, "init_noise_sigma") else 1.0)
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    takes_gen = "generator" in theirs.step.__code__.co_varnames
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        ia = theirs.scale_model_input(xa, t) if hasattr(theirs, "scale_model_input") else xa
        ib = ours.scale_model_input(xb, t) if hasattr(ours, "scale_model_input") else xb
        ma, mb = _model(ia, i), _model(ib, i)
        if channels != 3:
            ma, mb = torch.cat([ma, ma.tanh()], 1), torch.cat([mb, mb.tanh()], 1)
        kwa = dict(step_kw, **({"generator": ga} if takes_gen else {}))
        kwb = dict(step_kw, **({"generator": gb} if takes_gen else {}))
        if guided:
            ua, ub = _model(-ia, i), _model(-ib, i)
            out_a = theirs.step(ua + 3.0 * (ma - ua), t, xa, **kwa)
            out_b = ours.step(mb, ours.timesteps[i], xb, model_output_uncond=ub, guidance_scale=3.0, **kwb)
        else:
            out_a = theirs.step(ma, t, xa, **kwa)
            out_b = ours.step(mb, ours.timesteps[i], xb, **kwb)
        assert type(out_b) is type(out_a)
        for field in out_a.keys():
            worst = max(worst, _rel(out_b[field], out_a[field]))
        xa, xb = out_a.prev_sample, out_b.prev_sample
    return worst, ours


# (class, config, n, set_timesteps kwargs, step kwargs): every option at least once
CASES = [
    ("DDIMScheduler", {}, 20, {}, {}),
    ("DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False, rescale_betas_zero_snr=True,
                           prediction_type="v_prediction", set_alpha_to_one=False), 12, {}, dict(eta=0.7)),
    ("DDIMScheduler", dict(timestep_spacing="linspace", prediction_type="sample"), 10, {},
     dict(eta=0.3, use_clipped_model_output=True)),
    ("DDIMScheduler", dict(thresholding=True, clip_sample=False, sample_max_value=1.5), 15, {}, dict(eta=0.5)),
    ("DDIMScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9), 8, {},
     dict(use_clipped_model_output=True)),
    ("DDIMScheduler", dict(trained_betas=torch.linspace(1e-4, 0.02, 500).tolist(), num_train_timesteps=500,
                           steps_offset=1), 10, {}, {}),
    ("DDPMScheduler", {}, None, dict(num_inference_steps=25), {}),
    ("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing", beta_schedule="sigmoid"),
     None, dict(num_inference_steps=16), {}),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", prediction_type="v_prediction",
                           beta_schedule="squaredcos_cap_v2", clip_sample=False), None,
     dict(timesteps=[900, 700, 450, 300, 120, 40, 0]), {}),
    ("DDPMScheduler", dict(thresholding=True, prediction_type="sample"), None, dict(num_inference_steps=10), {}),
    ("DDPMScheduler", dict(variance_type="fixed_large_log"), None, dict(num_inference_steps=5), {}),  # fallback
    ("DPMSolverMultistepScheduler", {}, 20, {}, {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                         lower_order_final=False), 16, {}, {}),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True, euler_at_final=True), 12, {}, {}),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True, solver_type="heun",
                                         prediction_type="v_prediction"), 14, {}, {}),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True, algorithm_type="sde-dpmsolver++"), 10, {}, {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         prediction_type="sample"), 10, {}, {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                                         final_sigmas_type="sigma_min"), 9, {}, {}),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=2.0), 12, {}, {}),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, algorithm_type="dpmsolver",
                                         final_sigmas_type="sigma_min"), 10, {}, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, timestep_spacing="trailing",
                                         rescale_betas_zero_snr=True), 8, {}, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3), 10, {}, {}),  # fallback
    ("DPMSolverMultistepScheduler", {}, None, dict(timesteps=[999, 800, 600, 400, 200, 50]), {}),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                         flow_shift=3.0), 10, {}, {}),
    ("EulerDiscreteScheduler", {}, 20, {}, {}),
    ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True), 25, {}, {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_type="continuous",
                                    final_sigmas_type="sigma_min", use_exponential_sigmas=True), 12, {}, {}),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True, prediction_type="sample",
                                    interpolation_type="log_linear"), 10, {}, {}),
    ("EulerDiscreteScheduler", {}, 15, {}, dict(s_churn=2.0, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction"), 12, {}, dict(s_churn=1.0)),
    ("EulerDiscreteScheduler", {}, None, dict(sigmas=[14.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.1]), {}),
    ("EulerDiscreteScheduler", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), None,
     dict(timesteps=[999, 750, 500, 250, 10]), {}),
    ("EulerAncestralDiscreteScheduler", {}, 20, {}, {}),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                             rescale_betas_zero_snr=True), 12, {}, {}),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1,
                                             beta_schedule="scaled_linear"), 15, {}, {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 20, {}, {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, time_shift_type="linear"), 10,
     dict(mu=1.2), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True, shift_terminal=0.05), 9, {}, {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_karras_sigmas=True, invert_sigmas=False), 10, {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {}, None, dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1]), {}),
]


def _id(case):
    name, config, n, set_kw, step_kw = case
    bits = [f"{k}={v}" for k, v in {**config, **set_kw, **step_kw}.items() if k != "trained_betas"]
    return name.replace("Scheduler", "") + ("[" + ",".join(bits)[:80] + "]" if bits else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_whole_trajectory_matches_diffusers(case):
    name, config, n, set_kw, step_kw = case
    worst, ours = _trajectories(name, config, n, set_kw, step_kw)
    assert worst <= 1e-5, f"{ours.explain()}: worst relative difference {worst:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_guidance_fused_matches_guided_output(name):
    """Guidance inside the kernel rounds u + g·(c − u) once, in fp32 registers; diffusers gets the
    torch-rounded guided output, and DDIM's 1/√ᾱ amplifies that rounding at high t: 5e-5."""
    worst, ours = _trajectories(name, {}, 10, {}, {}, guided=True)
    assert worst <= 5e-5 and ours.fused_path == "fused"


def test_ddpm_learned_variances_match():
    for variance_type in ("learned", "learned_range"):
        worst, _ = _trajectories("DDPMScheduler", dict(variance_type=variance_type), None,
                                 dict(num_inference_steps=12), channels=6)
        assert worst <= 1e-5, variance_type


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_from_pretrained_round_trip(name, tmp_path):
    cls = getattr(fs, name)
    config = dict(num_train_timesteps=500)
    s = cls(**config, backend="reference")
    assert "backend" not in s.config and s.backend == "reference"
    s.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and _public(loaded.config) == _public(s.config) and loaded.backend is None
    # diffusers' class reads flashdiff's saved config and the other way round
    theirs = getattr(diffusers, name).from_pretrained(tmp_path)
    assert _public(theirs.config) == _public(s.config)
    assert type(cls.from_config(theirs.config)) is cls
    assert set(s.compatibles) >= {getattr(diffusers, name)} - {cls} or name.startswith("FlowMatch")
    assert cls.from_config(s.config, backend="torch").backend == "torch"


@pytest.mark.parametrize("name", NAMES)
def test_is_a_diffusers_scheduler(name):
    cls = getattr(fs, name)
    assert issubclass(cls, getattr(diffusers, name))
    s = cls()
    s.register_to_config(some_key=3)  # ConfigMixin API is diffusers'
    assert s.config.some_key == 3


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_diffusers_outputs(name):
    s = getattr(fs, name)()
    s.set_timesteps(4)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    out = s.step(m, s.timesteps[0], x)
    assert isinstance(out, BaseOutput) and out[0] is out.prev_sample
    s.set_timesteps(4)
    tup = s.step(m, s.timesteps[0], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple()) + (name.startswith("DDIM") and 0)


def test_previous_timestep_is_a_tensor_like_diffusers():
    ours, theirs = fs.DDPMScheduler(), diffusers.DDPMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(10)
    for t in theirs.timesteps:
        a, b = ours.previous_timestep(t), theirs.previous_timestep(t)
        assert isinstance(a, torch.Tensor) and int(a) == int(b)


def test_trained_betas_shorter_than_num_train_timesteps():
    """diffusers builds such a scheduler (the config's num_train_timesteps then only sizes the
    default timesteps); so does this."""
    s = fs.DDIMScheduler(trained_betas=[0.1, 0.2])
    assert s.betas.shape == (2,) and s.config.num_train_timesteps == 1000


def test_set_timesteps_keeps_diffusers_signature():
    import inspect

    for name in NAMES:
        ours, theirs = getattr(fs, name), getattr(diffusers, name)
        assert inspect.signature(ours.set_timesteps) == inspect.signature(theirs.set_timesteps)
        params = inspect.signature(ours.step).parameters
        assert set(inspect.signature(theirs.step).parameters) <= set(params)
        assert {"model_output_uncond", "guidance_scale"} <= set(params)


def test_device_timesteps_use_the_step_counter():
    """A timestep tensor that is not on the host is never read: the step counter places it
    (here a meta tensor stands in for a device one)."""
    s = fs.EulerDiscreteScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    ref = fs.EulerDiscreteScheduler()
    ref.set_timesteps(5)
    for t in s.timesteps:
        m = torch.randn(SHAPE)
        a = s.step(m, t.to("meta"), x).prev_sample
        b = ref.step(m, t, x).prev_sample
        assert torch.equal(a, b)
        x = b


def test_fallback_and_two_pass_paths_are_named():
    assert fs.DDIMScheduler(thresholding=True).fused_path == "two-pass"
    assert fs.DPMSolverMultistepScheduler(solver_order=3).fused_path == "fallback"
    assert "solver_order=3" in fs.DPMSolverMultistepScheduler(solver_order=3).explain()
    assert fs.EulerDiscreteScheduler().fused_path == "fused"


def test_flow_per_token_timesteps_fall_back_to_diffusers():
    ours, theirs = fs.FlowMatchEulerDiscreteScheduler(), diffusers.FlowMatchEulerDiscreteScheduler()
    for s in (ours, theirs):
        s.set_timesteps(6)
    x, m = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    per_token = torch.full((1, 4), float(theirs.timesteps[1]))
    a = ours.step(m, ours.timesteps[1], x, per_token_timesteps=per_token).prev_sample
    b = theirs.step(m, theirs.timesteps[1], x, per_token_timesteps=per_token).prev_sample
    assert torch.equal(a, b)


class _Pipe:
    """The part of a diffusers pipeline patch() reads: components and a scheduler."""


@pytest.mark.parametrize("name", NAMES)
def test_patch_swaps_the_scheduler_and_unpatch_restores_it(name):
    original = getattr(diffusers, name)(num_train_timesteps=800)
    pipe = _Pipe()
    pipe.scheduler = original
    pipe.components = {"scheduler": original}
    report = flashdiff.patch(pipe, attention=False, group_norm=False)
    assert type(pipe.scheduler) is getattr(fs, name)
    assert _public(pipe.scheduler.config) == _public(original.config)
    assert any("scheduler" in r[0] for r in report.replaced)
    flashdiff.unpatch(pipe)
    assert pipe.scheduler is original
