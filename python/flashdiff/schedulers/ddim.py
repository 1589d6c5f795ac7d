"""DDIMScheduler: diffusers' DDIMScheduler whose step is one fused `scheduler_update`."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler as _DiffusersDDIM
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, _host_value, make_output, pack_table, scheduler_update


# Table key marker: one row per training timestep, for steps given a device-tensor timestep.
# diffusers derives ᾱ from the timestep's value (a host read); gathering the row of that value on
# the device gives the same numbers for any timestep, in order or not, without a sync.
_BY_TIMESTEP = "by-timestep"


class DDIMScheduler(FusedScheduler, _DiffusersDDIM):
    """diffusers.DDIMScheduler (same config, save/load, set_timesteps, outputs and numbers) with a
    fused step: guidance, x0, clip, eps and the update in one kernel.

        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(50, device="cuda")
        for t in sched.timesteps:
            x = sched.step(eps_cond, t, x, model_output_uncond=eps_uncond, guidance_scale=5.0).prev_sample

    Dynamic thresholding takes the two-pass path (see `fused_path`).
    """

    def _schedule_values(self):
        n = len(self._host_timesteps)
        ratio = self.config.num_train_timesteps // (self.num_inference_steps or n)
        t = torch.from_numpy(self._host_timesteps.astype("int64"))
        self._alphas = self._alphas_at(t, ratio)

    def _alphas_at(self, t, ratio=None):
        """float32 ᾱ_t and ᾱ_prev (prev = t − T//n; ᾱ_final below 0), as diffusers looks them up."""
        ratio = ratio or self.config.num_train_timesteps // self.num_inference_steps
        prev = t - ratio
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.final_alpha_cumprod)
        return self.alphas_cumprod[t], a_prev

    def _build_table(self, key):
        if len(key) == 3 and key[2] == _BY_TIMESTEP:  # a row for every training timestep (see _step)
            eta, use_clipped, _ = key
            a_t, a_prev = self._alphas_at(torch.arange(self.config.num_train_timesteps))
        elif len(key) == 3:  # an off-schedule timestep (see _step): a one-row table
            eta, use_clipped, t = key
            a_t, a_prev = self._alphas_at(torch.tensor([t]))
        else:
            (eta, use_clipped), (a_t, a_prev) = key, self._alphas
        cfg = self.config
        # the std in float32 as diffusers computes it (ᾱ_t/ᾱ_prev rounds, and 1 − that keeps it)
        var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std = (eta * var ** 0.5).to(torch.float64)
        a_t, a_prev = a_t.to(torch.float64), a_prev.to(torch.float64)
        sqrt_a, sqrt_b = a_t.sqrt(), (1 - a_t).sqrt()
        pred = cfg.prediction_type
        if pred == "epsilon":
            c = dict(x0_from_x=1 / sqrt_a, x0_from_m=-sqrt_b / sqrt_a, eps_from_m=1.0)
        elif pred == "sample":
            c = dict(x0_from_m=1.0, eps_from_x=1 / sqrt_b, eps_from_m=-sqrt_a / sqrt_b)
        elif pred == "v_prediction":
            c = dict(x0_from_x=sqrt_a, x0_from_m=-sqrt_b, eps_from_x=sqrt_b, eps_from_m=sqrt_a)
        else:
            raise ValueError(f"prediction_type given as {pred} must be one of `epsilon`, `sample`, or "
                             "`v_prediction`")
        if use_clipped:  # eps re-derived from the (clipped) x0
            c.update(eps_from_x=1 / sqrt_b, eps_from_m=0.0, eps_from_x0=-sqrt_a / sqrt_b)
        clip = cfg.clip_sample_range if (cfg.clip_sample and not cfg.thresholding) else float("inf")
        return pack_table(len(a_t), clip=clip, prev_from_x0=a_prev.sqrt(),
                          prev_from_eps=(1 - a_prev - std * std).sqrt(), prev_from_noise=std, **c)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Optional[torch.Generator] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True,
             model_output_uncond: Optional[torch.Tensor] = None, guidance_scale=1.0):
        """x_{t-1} from x_t (diffusers' arguments and outputs); `model_output_uncond` +
        `guidance_scale` fuse classifier-free guidance into the same kernel."""
        prev, x0 = self._step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                              variance_noise, model_output_uncond, guidance_scale, return_x0=True)
        if not return_dict:
            return prev, x0
        return make_output(DDIMSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    def _step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
              variance_noise=None, model_output_uncond=None, guidance_scale=1.0, *, return_x0):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        self._check_schedule()
        t_host = _host_value(timestep)
        by_value = t_host is None  # a device tensor: its value picks the row on the device (no sync)
        index = timestep if by_value else self._index_of.get(t_host)  # diffusers looks ᾱ up by value
        eta = float(eta)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        key = (eta, bool(use_clipped_model_output))
        if by_value:  # a [num_train_timesteps, 12] table, built once, gathered at the timestep
            key += (_BY_TIMESTEP,)
        elif index is None:  # off the schedule: a one-row table of its own, cached per timestep
            key, index = key + (int(t_host),), 0
        else:
            self._step_index = index + 1
        return self._update(key, index, model_output, sample, model_output_uncond, guidance_scale, noise,
                            return_x0=return_x0)


__all__ = ["DDIMScheduler", "scheduler_update"]
