"""DPMSolverMultistepScheduler: diffusers' DPM-Solver(++) multistep, one fused update per step."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import \
    DPMSolverMultistepScheduler as _DiffusersDPM
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, make_output, pack_table


class DPMSolverMultistepScheduler(FusedScheduler, _DiffusersDPM):
    """diffusers.DPMSolverMultistepScheduler (same config, save/load, set_timesteps, outputs and
    numbers) with a fused step.

    Every algorithm_type (dpmsolver++, dpmsolver, sde-dpmsolver++, sde-dpmsolver), both
    solver_types and solver_order 1 and 2 are affine in (sample, model output, the previous
    converted output, noise): the kernel converts the model output (to x0, or to eps for the
    dpmsolver forms; written to the x0 slot and kept in `model_outputs` as diffusers keeps it) and
    applies the first- or second-order update, the previous converted output coming through the
    prev_x0 slot. The order of each step is decided on the host from the step counter.
    solver_order 3 needs two previous outputs, one more than the kernel reads: diffusers' step.
    """
    _uses_prev_x0 = True

    def _fallback_reason(self):
        if self.config.solver_order == 3:
            return "solver_order=3 combines two previous model outputs; the fused update reads one"
        return None

    def _missing_index(self, timestep):
        return len(self._host_timesteps) - 1  # diffusers' index_for_timestep: no match = the last step

    def _alpha_sigma(self, s):
        if self.config.use_flow_sigmas:
            return 1 - s, s
        alpha = 1 / (s * s + 1).sqrt()
        return alpha, s * alpha

    def _schedule_values(self):
        s = self.sigmas.detach().to("cpu", torch.float64)
        n = len(self._host_timesteps)
        # step i goes σ[i] → σ[i+1]; the second-order term also reads σ[i−1] (row 0: unused)
        self._sig = (s[1:n + 1], s[:n], torch.cat([s[:1], s[:n - 1]]))

    def _conversion(self):
        """(from_x, from_m) of the converted model output (x0 for the ++ forms, else eps), per step."""
        cfg = self.config
        _, s0, _ = self._sig
        alpha, sigma = self._alpha_sigma(s0)
        one, zero = torch.ones_like(s0), torch.zeros_like(s0)
        pred = cfg.prediction_type
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            forms = {"epsilon": (1 / alpha, -sigma / alpha), "sample": (zero, one),
                     "v_prediction": (alpha, -sigma), "flow_prediction": (one, -s0)}
        else:
            forms = {"epsilon": (zero, one), "sample": (1 / sigma, -alpha / sigma),
                     "v_prediction": (sigma, alpha)}
        if pred not in forms:
            raise ValueError(f"prediction_type given as {pred} must be one of `epsilon`, `sample`, "
                             "`v_prediction`, or `flow_prediction` for the DPMSolverMultistepScheduler.")
        return forms[pred]

    def _x0_columns(self, table, key):
        # the thresholding reads x0; the dpmsolver forms convert to eps, so x0 = (x − σ·eps)/α
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return super()._x0_columns(table, key)
        alpha, sigma = self._alpha_sigma(self._sig[1])
        d_x, d_m = self._conversion()
        return 1 / alpha - sigma / alpha * d_x, -sigma / alpha * d_m

    def _slot_from_thresholded(self, key):
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return 0.0, 1.0
        alpha, sigma = self._alpha_sigma(self._sig[1])  # eps = (x − α·x0)/σ
        return 1 / sigma, -alpha / sigma

    def _build_table(self, key):
        (second,) = key
        cfg = self.config
        s_t, s_0, s_1 = self._sig
        a_t, g_t = self._alpha_sigma(s_t)
        a_0, g_0 = self._alpha_sigma(s_0)
        a_1, g_1 = self._alpha_sigma(s_1)
        lam_t, lam_0, lam_1 = a_t.log() - g_t.log(), a_0.log() - g_0.log(), a_1.log() - g_1.log()
        h = lam_t - lam_0
        algo, heun = cfg.algorithm_type, cfg.solver_type == "heun"
        noise = 0.0
        # x_t = c_x·x + c_d0·D0 + c_d1·D1 (+ noise), D0 = m0, D1 = (m0 − m1)/r0 (diffusers' forms)
        if algo == "dpmsolver++":
            c_x, c_d0 = g_t / g_0, -a_t * (torch.exp(-h) - 1)
            c_d1 = a_t * ((torch.exp(-h) - 1) / h + 1) if heun else 0.5 * c_d0
        elif algo == "dpmsolver":
            c_x, c_d0 = a_t / a_0, -g_t * (torch.exp(h) - 1)
            c_d1 = -g_t * ((torch.exp(h) - 1) / h - 1) if heun else 0.5 * c_d0
        elif algo == "sde-dpmsolver++":
            c_x, c_d0 = g_t / g_0 * torch.exp(-h), a_t * (1 - torch.exp(-2 * h))
            c_d1 = a_t * ((1 - torch.exp(-2 * h)) / (-2 * h) + 1) if heun else 0.5 * c_d0
            noise = g_t * (1 - torch.exp(-2 * h)).sqrt()
        else:  # sde-dpmsolver
            c_x, c_d0 = a_t / a_0, -2 * g_t * (torch.exp(h) - 1)
            c_d1 = -2 * g_t * ((torch.exp(h) - 1) / h - 1) if heun else 0.5 * c_d0
            noise = g_t * (torch.exp(2 * h) - 1).sqrt()
        d_x, d_m = self._conversion()
        n = len(s_0)
        if not second:
            return pack_table(n, x0_from_x=d_x, x0_from_m=d_m, prev_from_x=c_x, prev_from_x0=c_d0,
                              prev_from_noise=noise)
        inv_r0 = h / (lam_0 - lam_1)
        return pack_table(n, x0_from_x=d_x, x0_from_m=d_m, prev_from_x=c_x, prev_from_x0=c_d0 + c_d1 * inv_r0,
                          prev_from_prev_x0=-c_d1 * inv_r0, prev_from_noise=noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True, model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """One multistep step (diffusers' arguments and outputs), fused: output conversion and
        update in one kernel, which also writes the converted output the next step reads."""
        if self._fallback_reason() is not None:
            return self._fallback_step(model_output, timestep, sample, model_output_uncond, guidance_scale,
                                       return_dict, generator=generator, variance_noise=variance_noise)
        prev = self._step(model_output, timestep, sample, generator, variance_noise, model_output_uncond,
                          guidance_scale, return_x0=True)[0]
        if not return_dict:
            return (prev,)
        return make_output(SchedulerOutput, prev_sample=prev)

    def _step(self, model_output, timestep, sample, generator=None, variance_noise=None, model_output_uncond=None,
              guidance_scale=1.0, *, return_x0=True):
        cfg = self.config
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        self._check_schedule()
        index = self._counter_index(timestep)
        n = len(self._host_timesteps)
        last_first_order = index == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                               or cfg.final_sigmas_type == "zero")
        second = cfg.solver_order == 2 and self.lower_order_nums >= 1 and not last_first_order
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            # diffusers keeps the first 3 channels (the rest is the learned variance)
            model_output = model_output[:, :3]
            if model_output_uncond is not None:
                model_output_uncond = model_output_uncond[:, :3]
        noise = None
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        # the converted output is always written: the next step's second-order term reads it
        prev, converted = self._update((second,), index, model_output, sample, model_output_uncond,
                                       guidance_scale, noise, self.model_outputs[-1] if second else None,
                                       return_x0=True)
        outputs = self.model_outputs
        outputs[:-1] = outputs[1:]
        outputs[-1] = converted
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index = index + 1
        return prev, None

    def rewind(self):
        super().rewind()
        self.lower_order_nums = 0  # a second pass starts first order again, as a fresh schedule does
        self.model_outputs = [None] * self.config.solver_order


__all__ = ["DPMSolverMultistepScheduler"]
