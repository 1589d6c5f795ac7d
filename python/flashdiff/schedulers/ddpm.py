"""DDPMScheduler: diffusers' DDPMScheduler whose step is one fused `scheduler_update`."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler as _DiffusersDDPM
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, _host_value, make_output, pack_table

_LEARNED = ("learned", "learned_range")


class DDPMScheduler(FusedScheduler, _DiffusersDDPM):
    """diffusers.DDPMScheduler (same config, save/load, set_timesteps, outputs and numbers) with a
    fused ancestral step; noise is drawn from `generator` exactly as diffusers draws it.

    Learned variances ("learned", "learned_range": the model's second half of channels) are not
    affine in the noise: torch scales the noise by the predicted std on the device, then the
    fused update adds it with weight 1 (still no host sync). With guidance the variance half
    comes from the conditional output. "fixed_large_log" falls back to diffusers' step (it
    takes the square root of a log variance, so its numbers are diffusers' alone).
    """

    def _fallback_reason(self):
        if self.config.variance_type == "fixed_large_log":
            return "variance_type='fixed_large_log': diffusers' step takes the square root of a log variance"
        return None

    def _schedule_values(self):
        ts = torch.from_numpy(self._host_timesteps.astype("int64"))
        if self.custom_timesteps or self.num_inference_steps:
            prev = torch.cat([ts[1:], ts.new_tensor([-1])])  # diffusers' previous_timestep
        else:
            prev = ts - 1
        # float32 like diffusers: ᾱ_t/ᾱ_prev rounds, and 1 − that (β_t ~ 1e-4) keeps the rounding,
        # so matching diffusers' numbers means rounding where it rounds (float64 from there on)
        a_t = self.alphas_cumprod[ts]
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], torch.ones(()))
        alpha = a_t / a_prev
        beta = 1 - alpha
        var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        self._f32 = (a_t, a_prev, alpha, beta, var)
        self._log_range = (var.log().tolist(), beta.log().tolist())  # learned_range's min/max log variance
        self._log_bounds = {}  # the same per device, for steps at a device-tensor timestep
        self._timesteps_dev = {}

    def _build_table(self, key):
        cfg = self.config
        a_t, a_prev, alpha, beta, var = (v.to(torch.float64) for v in self._f32)
        if cfg.variance_type == "fixed_large":
            std = beta.sqrt()
        elif cfg.variance_type in _LEARNED:
            std = torch.ones_like(beta)  # the noise comes scaled by the predicted std
        else:  # fixed_small, fixed_small_log (the same std) and unknown names, as diffusers
            std = var.sqrt()
        sqrt_a, sqrt_b = a_t.sqrt(), (1 - a_t).sqrt()
        pred = cfg.prediction_type
        if pred == "epsilon":
            x0 = dict(x0_from_x=1 / sqrt_a, x0_from_m=-sqrt_b / sqrt_a)
        elif pred == "sample":
            x0 = dict(x0_from_m=1.0)
        elif pred == "v_prediction":
            x0 = dict(x0_from_x=sqrt_a, x0_from_m=-sqrt_b)
        else:
            raise ValueError(f"prediction_type given as {pred} must be one of `epsilon`, `sample` or "
                             "`v_prediction`  for the DDPMScheduler.")
        # diffusers adds no noise at t = 0 for any variance type: a zero weight there lets a step
        # whose timestep stays on the device (position gathered there, see _step) always pass noise
        std = torch.where(torch.from_numpy(self._host_timesteps.astype("int64")) > 0, std, torch.zeros_like(std))
        clip = cfg.clip_sample_range if (cfg.clip_sample and not cfg.thresholding) else float("inf")
        return pack_table(len(a_t), clip=clip, prev_from_x0=a_prev.sqrt() * beta / (1 - a_t),
                          prev_from_x=alpha.sqrt() * (1 - a_prev) / (1 - a_t), prev_from_noise=std, **x0)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0,
             variance_noise: Optional[torch.Tensor] = None):
        """x_{t-1} from x_t (diffusers' arguments and outputs). Noise (t > 0) is drawn from
        `generator` as diffusers draws it, unless `variance_noise` is given."""
        if self._fallback_reason() is not None or not self._fusable(model_output, sample):
            return self._fallback_step(model_output, timestep, sample, model_output_uncond, guidance_scale,
                                       return_dict, generator=generator)
        prev, x0 = self._step(model_output, timestep, sample, generator, model_output_uncond, guidance_scale,
                              variance_noise, return_x0=True)
        if not return_dict:
            return prev, x0
        return make_output(DDPMSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    def _fusable(self, model_output, sample):
        # diffusers splits off a learned variance only when the output has twice the channels
        if self.variance_type in _LEARNED:
            return model_output.shape[1] == 2 * sample.shape[1]
        return model_output.shape == sample.shape

    def _step(self, model_output, timestep, sample, generator=None, model_output_uncond=None, guidance_scale=1.0,
              variance_noise=None, *, return_x0):
        self._check_schedule()
        t_host = _host_value(timestep)
        if t_host is None:
            # a device tensor: diffusers finds its position in the schedule by value (a host
            # read); this finds it on the device, and the row is gathered there (no sync)
            index = (self._timesteps_on(timestep.device) == timestep).to(torch.int32).argmax()
            noisy = True  # the row's noise weight is 0 at t = 0
        else:
            index = self._index_of.get(t_host)
            if index is None:
                raise ValueError(f"timestep {t_host} is not in this scheduler's timesteps")
            self._step_index = index + 1
            noisy = self._host_timesteps[index] > 0
        predicted_variance = None
        if self.variance_type in _LEARNED:
            c = sample.shape[1]
            model_output, predicted_variance = model_output[:, :c], model_output[:, c:]
            if model_output_uncond is not None:
                model_output_uncond = model_output_uncond[:, :c]
        noise = None
        if noisy:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            if predicted_variance is not None:
                noise = self._learned_std(predicted_variance, index) * noise
        return self._update((), index, model_output, sample, model_output_uncond, guidance_scale, noise,
                            return_x0=return_x0)

    def _timesteps_on(self, device):
        """The schedule's timesteps on `device`, copied there once per schedule."""
        if self.timesteps.device == device:
            return self.timesteps
        ts = self._timesteps_dev.get(device)
        if ts is None:
            ts = self._timesteps_dev[device] = self.timesteps.to(device)
        return ts

    def _learned_std(self, predicted_variance, index):
        """The noise scale of a learned variance, elementwise on the device (diffusers' formulas)."""
        if self.variance_type == "learned":
            return predicted_variance ** 0.5
        if isinstance(index, torch.Tensor):  # a device position: gather the bounds there
            bounds = self._log_bounds.get(index.device)
            if bounds is None:
                bounds = self._log_bounds[index.device] = torch.tensor(self._log_range, device=index.device)
            min_log, max_log = bounds[:, index].to(predicted_variance.dtype).unbind(0)
        else:
            min_log, max_log = self._log_range[0][index], self._log_range[1][index]
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))


__all__ = ["DDPMScheduler"]
