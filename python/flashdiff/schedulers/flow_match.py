"""FlowMatchEulerDiscreteScheduler: diffusers' flow-matching Euler sampler, one fused step."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import \
    FlowMatchEulerDiscreteScheduler as _DiffusersFlow
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..ops.scheduler import flow_euler_coefs
from ._base import FusedScheduler, make_output
from .euler import _check_timestep


class FlowMatchEulerDiscreteScheduler(FusedScheduler, _DiffusersFlow):
    """diffusers.FlowMatchEulerDiscreteScheduler (same config, save/load, set_timesteps options,
    outputs and numbers) with a fused step (x_t = (1 − σ)·x0 + σ·noise, the model predicts the
    velocity). stochastic_sampling is fused too (x0 and the re-noising in one update);
    `per_token_timesteps` (a σ per token) has no per-step row: that call runs diffusers' step.
    s_churn / s_tmin / s_tmax / s_noise are accepted and unused, as in diffusers."""

    init_noise_sigma = 1.0  # flow samples start at pure noise (diffusers' class has no such attribute)

    def _missing_index(self, timestep):
        raise IndexError(f"timestep {timestep!r} is not in this scheduler's timesteps")

    def _schedule_values(self):
        self._sig = self.sigmas.detach().to("cpu", torch.float64)

    def _place(self, device):
        super()._place(device)
        self.sigmas = self.sigmas.to(device)  # diffusers' flow set_timesteps keeps them on the device

    def _build_table(self, key):
        return flow_euler_coefs(self._sig[:-1], self._sig[1:], self.config.stochastic_sampling).to(torch.float64)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True, model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """x at the next σ from the velocity (diffusers' arguments and outputs): one fused kernel."""
        if per_token_timesteps is not None:
            return self._fallback_step(model_output, timestep, sample, model_output_uncond, guidance_scale,
                                       return_dict, generator=generator, per_token_timesteps=per_token_timesteps)
        prev = self._step(model_output, timestep, sample, generator=generator,
                          model_output_uncond=model_output_uncond, guidance_scale=guidance_scale, return_x0=False)[0]
        if not return_dict:
            return (prev,)
        return make_output(FlowMatchEulerDiscreteSchedulerOutput, prev_sample=prev)

    def _step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
              generator=None, model_output_uncond=None, guidance_scale=1.0, *, return_x0):
        _check_timestep(type(self).__name__, timestep)
        self._check_schedule()
        index = self._counter_index(timestep)
        noise = None
        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        out = self._update((), index, model_output, sample, model_output_uncond, guidance_scale, noise,
                           return_x0=return_x0)
        self._step_index = index + 1
        return out


__all__ = ["FlowMatchEulerDiscreteScheduler"]
