"""EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: diffusers' k-diffusion Euler
samplers (SDXL's defaults), one fused update per step."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import \
    EulerAncestralDiscreteScheduler as _DiffusersEulerA
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler as _DiffusersEuler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, make_output, pack_table

logger = logging.get_logger(__name__)

_INTEGER_TIMESTEP = ("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{}.step()` is not "
                     "supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def _check_timestep(cls_name, timestep):
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(_INTEGER_TIMESTEP.format(cls_name))


class _KarrasEuler(FusedScheduler):
    """What both Euler samplers share: σ-space schedule, the x0 / derivative forms, the step counter."""

    def _missing_index(self, timestep):
        raise IndexError(f"timestep {timestep!r} is not in this scheduler's timesteps")

    def _schedule_values(self):
        self._sig = self.sigmas.detach().to("cpu", torch.float64)

    def _forms(self, sigma, sigma_hat):
        """(x0_from_x, x0_from_m) of diffusers' pred_original_sample per step, or None (no form)."""
        pred = self.config.prediction_type
        if pred == "epsilon":
            return torch.ones_like(sigma), -sigma_hat
        if pred in ("sample", "original_sample"):
            return torch.zeros_like(sigma), torch.ones_like(sigma)
        if pred == "v_prediction":
            return 1 / (sigma * sigma + 1), -sigma / (sigma * sigma + 1).sqrt()
        raise ValueError(f"prediction_type given as {pred} must be one of `epsilon`, or `v_prediction`")

    def _warn_unscaled(self):
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")

    def _index(self, timestep):
        _check_timestep(type(self).__name__, timestep)
        self._warn_unscaled()
        self._check_schedule()
        return self._counter_index(timestep)


class EulerDiscreteScheduler(_KarrasEuler, _DiffusersEuler):
    """diffusers.EulerDiscreteScheduler (same config, save/load, set_timesteps options, outputs and
    numbers) with a fused step. `s_churn` > 0 (Karras' stochastic churn) stays affine: the
    churned sample x + k·noise enters the same update, so it is fused too; the public output's
    pred_original_sample then adds its noise term with one torch op."""

    def _gammas(self, key):
        s_churn, s_tmin, s_tmax, _ = key
        n = len(self._sig) - 1
        top = min(s_churn / n, 2 ** 0.5 - 1)
        return [top if s_tmin <= s <= s_tmax else 0.0 for s in self._sig[:-1].tolist()]

    def _build_table(self, key):
        s_noise = key[3]
        sigma, sigma_next = self._sig[:-1], self._sig[1:]
        gamma = torch.tensor(self._gammas(key), dtype=torch.float64)
        sigma_hat = sigma * (gamma + 1)
        k = s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt()  # the churn's noise scale (0 without churn)
        x0_x, x0_m = self._forms(sigma, sigma_hat)
        dt = sigma_next - sigma_hat
        # derivative (x' − x0)/σ̂ in the eps slot, x' = x + k·noise: prev = x' + dt·derivative
        d_x, d_m = (1 - x0_x) / sigma_hat, -x0_m / sigma_hat
        return pack_table(len(sigma), x0_from_x=x0_x, x0_from_m=x0_m, eps_from_x=d_x, eps_from_m=d_m,
                          prev_from_x=1.0, prev_from_eps=dt, prev_from_noise=k * (1 + dt * d_x))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """One Euler step (diffusers' arguments and outputs), fused, churn included."""
        prev, x0 = self._step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                              model_output_uncond, guidance_scale, return_x0=True)
        if not return_dict:
            return prev, x0
        return make_output(EulerDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    def _step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
              generator=None, model_output_uncond=None, guidance_scale=1.0, *, return_x0):
        index = self._index(timestep)
        key = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        noise = None
        churn = s_churn > 0 and self._gammas(key)[index] > 0
        if churn:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
        prev, x0 = self._update(key, index, model_output, sample, model_output_uncond, guidance_scale, noise,
                                return_x0=return_x0)
        if churn and x0 is not None:  # diffusers' x0 is of the churned sample: add its noise term
            sigma, gamma = self._sig[index:index + 1], self._gammas(key)[index]
            x0_from_x = float(self._forms(sigma, sigma * (gamma + 1))[0][0])
            k = s_noise * float(sigma[0]) * ((gamma + 1) ** 2 - 1) ** 0.5
            x0 = x0 + (x0_from_x * k) * noise
        self._step_index = index + 1
        return prev, x0


class EulerAncestralDiscreteScheduler(_KarrasEuler, _DiffusersEulerA):
    """diffusers.EulerAncestralDiscreteScheduler (same config, save/load, set_timesteps, outputs
    and numbers) with a fused step: the ancestral noise σ_up·noise is one more term of the same
    update. The noise is drawn every step, as diffusers draws it, so generators stay in step.
    prediction_type="sample" is not implemented by diffusers either: its step raises."""

    def _fallback_reason(self):
        if self.config.prediction_type == "sample":
            return "prediction_type='sample' is not implemented by diffusers' Euler ancestral step (it raises)"
        return None

    def _build_table(self, key):
        s_from, s_to = self._sig[:-1], self._sig[1:]
        s_up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2).sqrt()
        s_down = (s_to ** 2 - s_up ** 2).sqrt()
        x0_x, x0_m = self._forms(s_from, s_from)
        return pack_table(len(s_from), x0_from_x=x0_x, x0_from_m=x0_m, eps_from_x=(1 - x0_x) / s_from,
                          eps_from_m=-x0_m / s_from, prev_from_x=1.0, prev_from_eps=s_down - s_from,
                          prev_from_noise=s_up)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """One Euler-ancestral step (diffusers' arguments and outputs), fused."""
        if self._fallback_reason() is not None:
            return self._fallback_step(model_output, timestep, sample, model_output_uncond, guidance_scale,
                                       return_dict, generator=generator)
        prev, x0 = self._step(model_output, timestep, sample, generator, model_output_uncond, guidance_scale,
                              return_x0=True)
        if not return_dict:
            return prev, x0
        return make_output(EulerAncestralDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    def _step(self, model_output, timestep, sample, generator=None, model_output_uncond=None, guidance_scale=1.0,
              *, return_x0):
        index = self._index(timestep)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        out = self._update((), index, model_output, sample, model_output_uncond, guidance_scale, noise,
                           return_x0=return_x0)
        self._step_index = index + 1
        return out


__all__ = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]
