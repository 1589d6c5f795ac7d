"""DDIMScheduler: diffusers' DDIMScheduler, whose step is one fused `scheduler_update`."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.scheduler import ddim_coefs, scheduler_update
from ._base import DDIMSchedulerOutput, FusedScheduler, betas_for_schedule, randn_tensor, spaced_timesteps

_THRESHOLDING_WHY = "dynamic thresholding takes a per-sample quantile, which is not an affine update"


class DDIMScheduler(FusedScheduler):
    """Same constructor, config and numbers as `diffusers.DDIMScheduler` (Song et al. 2021).

        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(50, device="cuda")
        for t in sched.timesteps:
            x = sched.step(eps_cond, t, x, model_output_uncond=eps_uncond, guidance_scale=5.0).prev_sample

    `model_output_uncond` + `guidance_scale` fuse classifier-free guidance into the step.
    `backend` picks the flashdiff backend of the fused update (None = auto).
    """
    _unsupported = {"thresholding": (True, _THRESHOLDING_WHY)}

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False,
                 backend: Optional[str] = None):
        self._register_config(locals())
        self.betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                        trained_betas, rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # float32, as diffusers
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None):
        timesteps = spaced_timesteps(self.config.timestep_spacing, self.config.num_train_timesteps,
                                     num_inference_steps, self.config.steps_offset)
        self._finish_set_timesteps(timesteps, device)
        # ᾱ_t and ᾱ_prev per step, float64 from diffusers' float32 values.
        ratio = self.config.num_train_timesteps // num_inference_steps
        a = self.alphas_cumprod.to(torch.float64)
        t = torch.from_numpy(timesteps)
        prev = t - ratio
        self._a_t = a[t]
        self._a_prev = torch.where(prev >= 0, a[prev.clamp(min=0)], self.final_alpha_cumprod.to(torch.float64))

    def _build_table(self, key):
        eta, use_clipped = key
        return ddim_coefs(self._a_t, self._a_prev, eta, self.config.prediction_type,
                          self.config.clip_sample_range if self.config.clip_sample else None, use_clipped)

    def _offschedule_row(self, t, eta, use_clipped, guidance_scale):
        """A timestep outside the schedule (diffusers allows any t): host math, one small copy."""
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        a = self.alphas_cumprod
        a_prev = a[t - ratio] if t - ratio >= 0 else self.final_alpha_cumprod
        return ddim_coefs(float(a[t]), float(a_prev), eta, self.config.prediction_type,
                          self.config.clip_sample_range if self.config.clip_sample else None, use_clipped,
                          guidance_scale if not isinstance(guidance_scale, torch.Tensor) else 1.0,
                          device=self._device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True, model_output_uncond: Optional[torch.Tensor] = None,
             guidance_scale=1.0):
        """x_{t-1} from x_t: one fused kernel (guidance, x0, clip, eps and the update)."""
        prev, x0 = self._step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                              variance_noise, model_output_uncond, guidance_scale, return_x0=True)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
              variance_noise=None, model_output_uncond=None, guidance_scale=1.0, *, return_x0):
        """step's work: (prev_sample, x0, or None unless return_x0)."""
        self._require_timesteps()
        t_host = self._host_timestep(timestep)
        if t_host is None:  # a device tensor: the step counter (no sync)
            index = self._counter_index(timestep)
        else:  # diffusers looks ᾱ up by timestep; so does this, off the schedule too (-1)
            index = self._index_of.get(t_host, -1)
        eta = float(eta)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        if index >= 0:
            self._step_index = index + 1
            return self._update((eta, bool(use_clipped_model_output)), index, model_output, sample,
                                model_output_uncond, guidance_scale, noise, return_x0=return_x0)
        row = self._offschedule_row(int(t_host), eta, bool(use_clipped_model_output), guidance_scale)
        if model_output_uncond is not None and isinstance(guidance_scale, torch.Tensor):
            row = self._guided_row(row, guidance_scale)
        out = scheduler_update(sample, model_output, row, model_output_uncond, noise, None,
                               return_x0=return_x0, backend=self.backend)
        return out if return_x0 else (out, None)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise (diffusers' add_noise, for training)."""
        return _add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample, noise, timesteps):
        a = self.alphas_cumprod.to(sample.device, sample.dtype)[timesteps.to(sample.device)]
        a = a.reshape(-1, *([1] * (sample.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * sample


def _add_noise(alphas_cumprod, original_samples, noise, timesteps):
    a = alphas_cumprod.to(original_samples.device, original_samples.dtype)[timesteps.to(original_samples.device)]
    a = a.reshape(-1, *([1] * (original_samples.dim() - 1)))
    return a.sqrt() * original_samples + (1 - a).sqrt() * noise


__all__ = ["DDIMScheduler"]
