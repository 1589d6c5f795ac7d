"""DDPMScheduler: diffusers' DDPMScheduler, whose step is one fused `scheduler_update`."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from ..ops.scheduler import ddpm_coefs
from ._base import DDPMSchedulerOutput, FusedScheduler, betas_for_schedule, randn_tensor, spaced_timesteps
from .ddim import _THRESHOLDING_WHY, _add_noise

_LEARNED_WHY = "a learned variance comes from the model output, so the update is not affine in fixed coefficients"


class DDPMScheduler(FusedScheduler):
    """Same constructor, config and numbers as `diffusers.DDPMScheduler` (Ho et al. 2020),
    ancestral sampling with noise drawn from `generator` exactly as diffusers draws it.

    `model_output_uncond` + `guidance_scale` fuse classifier-free guidance into the step.
    Without set_timesteps it steps through every training timestep (as diffusers does).
    """
    _unsupported = {"thresholding": (True, _THRESHOLDING_WHY),
                    "variance_type": (("fixed_large_log", "learned", "learned_range"), _LEARNED_WHY)}

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, backend: Optional[str] = None):
        self._register_config(locals())
        self.betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                        rescale_betas_zero_snr,
                                        allowed=("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid"))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # float32, as diffusers
        self.variance_type = variance_type
        self.custom_timesteps = False
        self._set_schedule(np.arange(num_train_timesteps)[::-1].copy().astype(np.int64), None)
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None):
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.int64)
            if np.any(np.diff(timesteps) >= 0):
                raise ValueError("custom timesteps must be in descending order")
            if timesteps[0] >= self.config.num_train_timesteps or timesteps[-1] < 0:
                raise ValueError(f"custom timesteps must lie in [0, {self.config.num_train_timesteps})")
            self.custom_timesteps = True
        else:
            timesteps = spaced_timesteps(self.config.timestep_spacing, self.config.num_train_timesteps,
                                         num_inference_steps, self.config.steps_offset)
            self.custom_timesteps = False
        self._set_schedule(timesteps, device)

    def _set_schedule(self, timesteps, device):
        self._finish_set_timesteps(timesteps, device)
        # diffusers' previous_timestep: the next entry of the schedule, -1 (ᾱ = 1) after the last.
        a = self.alphas_cumprod.to(torch.float64)
        t = torch.from_numpy(timesteps)
        prev = torch.cat([t[1:], t.new_tensor([-1])])
        self._a_t = a[t]
        self._a_prev = torch.where(prev >= 0, a[prev.clamp(min=0)], torch.ones((), dtype=torch.float64))

    def _build_table(self, key):
        return ddpm_coefs(self._a_t, self._a_prev, self.variance_type, self.config.prediction_type,
                          self.config.clip_sample_range if self.config.clip_sample else None)

    def previous_timestep(self, timestep):
        index = self._host_index(timestep)
        if index is None:
            raise ValueError(f"timestep {timestep!r} is not in this schedule")
        return int(self._host_timesteps[index + 1]) if index + 1 < len(self._host_timesteps) else -1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, model_output_uncond: Optional[torch.Tensor] = None,
             guidance_scale=1.0, variance_noise: Optional[torch.Tensor] = None):
        """x_{t-1} from x_t: one fused kernel. Noise (for t > 0) is drawn from `generator` as
        diffusers draws it, unless `variance_noise` is given."""
        prev, x0 = self._step(model_output, timestep, sample, generator, model_output_uncond, guidance_scale,
                              variance_noise, return_x0=True)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _step(self, model_output, timestep, sample, generator=None, model_output_uncond=None, guidance_scale=1.0,
              variance_noise=None, *, return_x0):
        """step's work: (prev_sample, x0, or None unless return_x0)."""
        t_host = self._host_timestep(timestep)
        if t_host is None:
            index = self._counter_index(timestep)
        else:
            index = self._index_of.get(t_host)
            if index is None:
                raise ValueError(f"timestep {t_host} is not in this scheduler's timesteps")
        self._step_index = index + 1
        noise = None
        if self._host_timesteps[index] > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        return self._update((), index, model_output, sample, model_output_uncond, guidance_scale, noise,
                            return_x0=return_x0)

    def add_noise(self, original_samples, noise, timesteps):
        return _add_noise(self.alphas_cumprod, original_samples, noise, timesteps)


__all__ = ["DDPMScheduler"]
