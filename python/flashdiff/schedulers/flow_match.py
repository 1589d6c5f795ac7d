"""FlowMatchEulerDiscreteScheduler: diffusers' flow-matching Euler sampler, one fused step."""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from ..ops.scheduler import flow_euler_coefs
from ._base import FlowMatchEulerDiscreteSchedulerOutput, FusedScheduler, randn_tensor


class FlowMatchEulerDiscreteScheduler(FusedScheduler):
    """Same constructor, config and numbers as `diffusers.FlowMatchEulerDiscreteScheduler`
    (x_t = (1 − σ)·x0 + σ·noise, the model predicts the velocity noise − x0).

    Supported: shift, use_dynamic_shifting (+ mu), shift_terminal, Karras / exponential sigmas,
    invert_sigmas, stochastic_sampling. `model_output_uncond` + `guidance_scale` fuse CFG.
    """
    _unsupported = {"use_beta_sigmas": (True, "beta sigmas need scipy's beta.ppf; not implemented here")}

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: Optional[float] = 0.5, max_shift: Optional[float] = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, invert_sigmas: bool = False,
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False,
                 backend: Optional[str] = None):
        self._register_config(locals())
        if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
            raise ValueError("use at most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        timesteps = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps,
                                                 dtype=np.float32)[::-1].copy())
        sigmas = timesteps / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self._shift = shift
        self.sigmas = sigmas
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float):
        self._shift = shift

    def _time_shift(self, mu, sigma, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[List[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[List[float]] = None):
        cfg, T = self.config, self.config.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is True")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self.sigma_max * T, self.sigma_min * T, num_inference_steps)
            sigmas = timesteps / T
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)
        if cfg.use_dynamic_shifting:
            sigmas = self._time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if cfg.shift_terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            lo, hi = float(sigmas[-1]), float(sigmas[0])
            if cfg.use_karras_sigmas:
                ramp = np.linspace(0, 1, num_inference_steps)
                sigmas = (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0
            else:
                sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        timesteps = torch.from_numpy(timesteps).to(torch.float32) if given_timesteps else sigmas * T
        if cfg.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * T
            sigmas = torch.cat([sigmas, torch.ones(1)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._finish_set_timesteps(timesteps.numpy(), device, dtype=torch.float32)
        self.sigmas = sigmas  # host float32, as diffusers keeps them
        self._sigmas64 = sigmas.to(torch.float64)

    def _host_index(self, timestep):
        """diffusers' index_for_timestep: the second match when a timestep repeats."""
        value = self._host_timestep(timestep)
        if value is None:
            return None
        hits = np.flatnonzero(self._host_timesteps == np.float32(value))
        return None if len(hits) == 0 else int(hits[1] if len(hits) > 1 else hits[0])

    def _build_table(self, key):
        return flow_euler_coefs(self._sigmas64[:-1], self._sigmas64[1:], self.config.stochastic_sampling)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps=None, return_dict: bool = True,
             model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """x at the next σ from the velocity: one fused kernel. s_churn/s_tmin/s_tmax/s_noise are
        accepted and unused, as in diffusers."""
        self._require_timesteps()
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps as timestep, not an integer index")
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps is not supported by the fused step")
        index = self._counter_index(timestep)
        self._step_index = index + 1
        noise = None
        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev, _ = self._update((), index, model_output, sample, model_output_uncond, guidance_scale, noise)
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)

    def scale_noise(self, sample, timestep, noise):
        """Forward process x_t = σ·noise + (1 − σ)·x0 (diffusers' scale_noise), for training."""
        t = timestep.to(torch.float32).reshape(-1)
        sigma = (t / self.config.num_train_timesteps).to(sample.device, sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.dim() - 1)))
        return sigma * noise + (1.0 - sigma) * sample


__all__ = ["FlowMatchEulerDiscreteScheduler"]
