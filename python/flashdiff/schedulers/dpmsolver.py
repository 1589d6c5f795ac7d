"""DPMSolverMultistepScheduler: diffusers' DPM-Solver++ (2M, midpoint), one fused step."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from ..ops.scheduler import dpmpp_2m_coefs
from ._base import FusedScheduler, SchedulerOutput, betas_for_schedule
from .ddim import _THRESHOLDING_WHY, _add_noise


class DPMSolverMultistepScheduler(FusedScheduler):
    """Same constructor, config and numbers as `diffusers.DPMSolverMultistepScheduler` for
    algorithm_type="dpmsolver++", solver_order 1 or 2, solver_type="midpoint" (its defaults).

    Each step converts the model output to x0 and applies the multistep update in one fused
    kernel, which also writes x0; the previous x0 is kept for the second-order term. The order
    of each step (first at the start and, per lower_order_final / final_sigmas_type, at the
    end) is decided on the host from the step counter, so nothing is read back.
    `model_output_uncond` + `guidance_scale` fuse classifier-free guidance.
    """
    _unsupported = {
        "thresholding": (True, _THRESHOLDING_WHY),
        "algorithm_type": (("dpmsolver", "sde-dpmsolver", "sde-dpmsolver++"),
                           "only dpmsolver++ (the default) has a fused form here"),
        "solver_type": ("heun", "only the midpoint solver (the default) has a fused form here"),
        "prediction_type": ("flow_prediction", "flow prediction is not supported; use FlowMatchEulerDiscreteScheduler"),
        "variance_type": (("learned", "learned_range"), "learned variances are not supported"),
        "use_flow_sigmas": (True, "flow sigmas are not supported; use FlowMatchEulerDiscreteScheduler"),
        "use_lu_lambdas": (True, "Lu lambdas are not implemented"),
        "use_exponential_sigmas": (True, "exponential sigmas are not implemented"),
        "use_beta_sigmas": (True, "beta sigmas are not implemented"),
    }

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_lu_lambdas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: Optional[str] = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", backend: Optional[str] = None):
        self._register_config(locals())
        if solver_order not in (1, 2):
            raise NotImplementedError(f"solver_order must be 1 or 2 for the fused step, got {solver_order}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self.betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                        rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self.lower_order_nums = 0
        self._prev_x0 = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None):
        cfg, T = self.config, self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if cfg.use_karras_sigmas:
                raise ValueError("cannot pass timesteps with use_karras_sigmas=True")
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            clipped_idx = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped))
            last = T - clipped_idx
            n = num_inference_steps
            if cfg.timestep_spacing == "linspace":
                timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif cfg.timestep_spacing == "leading":
                ratio = last // (n + 1)
                timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
                timesteps += cfg.steps_offset
            elif cfg.timestep_spacing == "trailing":
                ratio = T / n
                timesteps = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
            else:
                raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', "
                                 f"got {cfg.timestep_spacing!r}")
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # float32, as diffusers
        log_sigmas = np.log(sigmas)
        if cfg.use_karras_sigmas:
            flipped = np.flip(sigmas).copy()
            lo, hi = float(flipped[-1]), float(flipped[0])
            ramp = np.linspace(0, 1, num_inference_steps)
            sigmas = (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            sigma_last = 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self._finish_set_timesteps(np.asarray(timesteps).astype(np.int64), device)
        self.sigmas = torch.from_numpy(sigmas)  # host float32, as diffusers keeps them
        s = self.sigmas.to(torch.float64)
        n = len(timesteps)
        # step i goes σ[i] → σ[i+1]; the second-order term also uses σ[i−1] (row 0: unused).
        self._sig = (s[1:], s[:-1], torch.cat([s[:1], s[:-2]]))
        self._final_first_order = cfg.euler_at_final or (cfg.lower_order_final and n < 15) \
            or cfg.final_sigmas_type == "zero"
        self.lower_order_nums = 0
        self._prev_x0 = None

    def _build_table(self, key):
        (second,) = key
        s_next, s, s_prev = self._sig
        return dpmpp_2m_coefs(s_next, s, s_prev if second else None, self.config.prediction_type)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise=None, return_dict: bool = True,
             model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """One DPM-Solver++ step, fused (x0 conversion + first- or second-order update).
        generator / variance_noise are accepted and unused, as in diffusers for dpmsolver++."""
        self._require_timesteps()
        index = self._counter_index(timestep)
        last = index == self.num_inference_steps - 1
        second = (self.config.solver_order == 2 and self.lower_order_nums >= 1
                  and not (last and self._final_first_order))
        # x0 is always written: the next step's second-order term reads it
        prev, x0 = self._update((second,), index, model_output, sample, model_output_uncond, guidance_scale,
                                prev_x0=self._prev_x0 if second else None, return_x0=True)
        self._prev_x0 = x0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index = index + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def rewind(self):
        super().rewind()
        self.lower_order_nums = 0  # the second pass starts first order again, as a fresh schedule does
        self._prev_x0 = None

    def add_noise(self, original_samples, noise, timesteps):
        return _add_noise(self.alphas_cumprod, original_samples, noise, timesteps)


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' interpolation of a σ back to a (fractional) training timestep."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


__all__ = ["DPMSolverMultistepScheduler"]
