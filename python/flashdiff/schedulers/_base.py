"""What the four schedulers share: config handling, diffusers' noise draw, the beta schedules,
and the step machinery (a [T, 12] coefficient table per step kwargs, a Python step counter).

Every `step` is ONE call of `flashdiff.scheduler_update` with a row of a coefficient table that
`set_timesteps` (or the first step with new kwargs) builds once, on the device, with the
vectorised `*_coefs` builders. A row is a view (`table[i]`), so a step launches one kernel,
reads nothing back to the host, and can be captured in a CUDA graph. `rewind()` restarts the step
counter and keeps the tables, so a capture after its warm-up pass builds and copies nothing.

Schedule precision: the ᾱ (or σ) values are computed exactly as diffusers computes them
(float32 betas and cumprod), because the contract is to match diffusers' numbers; everything
derived from them (the 12 coefficients) is computed in float64 and rounded once to fp32.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..ops.scheduler import scheduler_update

__all__ = ["SchedulerOutput", "randn_tensor", "betas_for_schedule", "FusedScheduler"]


# ------------------------------------------------------------------ outputs
@dataclass
class SchedulerOutput:
    """diffusers' output: attribute access, `out[0]`, `out.to_tuple()`."""
    prev_sample: torch.Tensor

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i):
        return self.to_tuple()[i]


@dataclass
class DDIMSchedulerOutput(SchedulerOutput):
    pred_original_sample: Optional[torch.Tensor] = None


DDPMSchedulerOutput = DDIMSchedulerOutput
FlowMatchEulerDiscreteSchedulerOutput = SchedulerOutput


# ------------------------------------------------------------------ config
class FrozenConfig(dict):
    """A read-only dict with attribute access (like diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _immutable(self, *args, **kwargs):
        raise TypeError("the scheduler config is frozen; build a new scheduler with from_config(config, **changes)")

    __setitem__ = __delitem__ = update = pop = setdefault = _immutable  # type: ignore[assignment]


# ------------------------------------------------------------------ noise (as diffusers draws it)
def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """diffusers.utils.torch_utils.randn_tensor: the same numbers for the same generator(s).

    A CPU generator with a CUDA target draws on the CPU, then copies; a list of generators
    draws one sample per generator (batch dimension first)."""
    device = torch.device(device) if isinstance(device, str) else (device or torch.device("cpu"))
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"cannot generate a {device} tensor from a generator on {gen_type}")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        one = (1,) + tuple(shape[1:])
        draws = [torch.randn(one, generator=generator[i], device=rand_device, dtype=dtype)
                 for i in range(shape[0])]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# ------------------------------------------------------------------ beta schedules (diffusers' float32 math)
def _betas_for_alpha_bar(num_steps, max_beta=0.999, kind="cosine"):
    if kind == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif kind == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise ValueError(f"alpha_transform_type must be 'cosine' or 'laplace', got {kind!r}")
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas):
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas=None,
                       rescale_betas_zero_snr=False, allowed=("linear", "scaled_linear", "squaredcos_cap_v2")):
    """float32 betas [num_train_timesteps], computed the way diffusers computes them."""
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule not in allowed:
        raise NotImplementedError(f"beta_schedule must be one of {allowed}, got {beta_schedule!r}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = _betas_for_alpha_bar(num_train_timesteps, kind="laplace")
    else:  # sigmoid
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset):
    """diffusers' DDIM/DDPM timestep spacing (int64 numpy array, descending)."""
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot be larger than "
                         f"num_train_timesteps ({num_train_timesteps})")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = num_train_timesteps // num_inference_steps
        return (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


# ------------------------------------------------------------------ the shared scheduler machinery
def _hashable(value):
    """A config or schedule value as a hashable key; arrays by content (their repr elides)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return (a.dtype.str, a.shape, a.tobytes())
    return value


class FusedScheduler:
    """Base: diffusers-style config, from_config, step counter, per-kwargs coefficient tables.

    Subclasses define `_build_table(key) -> [T, 12] fp32 tensor on self._device` for a key of
    step kwargs, and their own `set_timesteps` / `step`.
    """
    order = 1
    init_noise_sigma = 1.0
    _unsupported: Dict[str, Any] = {}  # config value that has no affine (fusable) form -> why

    def _register_config(self, local_vars):
        params = inspect.signature(type(self).__init__).parameters
        cfg = {name: local_vars[name] for name in params if name not in ("self", "kwargs", "backend")}
        self.backend = local_vars.get("backend")  # flashdiff backend of the fused step (None = auto)
        for name, (bad, why) in self._unsupported.items():
            value = cfg.get(name)
            if (value in bad) if isinstance(bad, tuple) else value == bad:
                raise NotImplementedError(f"{type(self).__name__}: {name}={value!r} is not supported: {why}")
        self.config = FrozenConfig(cfg)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._tables: Dict[Any, torch.Tensor] = {}
        self._device = torch.device("cpu")

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """Build from a config dict (e.g. a diffusers scheduler's `.config`, or the scheduler
        itself); keys this class does not take (like `_class_name`) are ignored, kwargs win."""
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        config = dict(config or {})
        config.update(kwargs)
        params = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in config.items() if k in params and k != "self"})

    # -- diffusers API odds and ends
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def scale_model_input(self, sample, timestep=None):
        return sample

    def __len__(self):
        return self.config.num_train_timesteps

    # -- step machinery
    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _rows(self, key, guidance_scale=1.0):
        """The rows (views) of the [T, 12] table for these step kwargs and guidance weight,
        built once; a Python list, so picking a step's row costs no tensor indexing."""
        rows = self._tables.get((key, guidance_scale))
        if rows is None:
            table = self._build_table(key).to(self._device).contiguous()
            if guidance_scale != 1.0:
                table[:, 0] = guidance_scale
            rows = self._tables[(key, guidance_scale)] = list(table.unbind(0))
        return rows

    def _table(self, key, guidance_scale=1.0) -> torch.Tensor:
        """The whole [T, 12] coefficient table (the rows' base tensor)."""
        return self._rows(key, guidance_scale)[0]._base

    @staticmethod
    def _host_timestep(timestep):
        """The timestep as a Python number when reading it needs no device sync (a number or a
        CPU tensor), else None (a device tensor: the step counter decides)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" or timestep.numel() != 1:
                return None
            # a CPU scalar: reading it is a plain memory load, not a device sync
            return float(timestep) if timestep.is_floating_point() else int(timestep)
        return timestep

    def _host_index(self, timestep) -> Optional[int]:
        """The schedule index of a host-readable `timestep` (None when unknown or on device)."""
        value = self._host_timestep(timestep)
        return None if value is None else self._index_of.get(value)

    def _counter_index(self, timestep) -> int:
        """diffusers' _step_index: set on the first step (from the timestep when it is on the
        host, else begin_index or 0), then counted in Python."""
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                found = self._host_index(timestep)
                self._step_index = 0 if found is None else found
        if self._step_index >= len(self._host_timesteps):
            raise IndexError(f"{type(self).__name__}: step() called {self._step_index + 1} times for "
                             f"{len(self._host_timesteps)} timesteps; call set_timesteps again")
        return self._step_index

    @staticmethod
    def _guided_row(row, guidance_scale):
        """The row with the guidance weight in slot 0; a Python scale is baked into the cached
        table instead (see callers), so this only runs for a tensor scale (stays on device)."""
        row = row.clone()
        row[0:1].copy_(guidance_scale.reshape(1))
        return row

    def _update(self, table_key, index, model_output, sample, model_output_uncond, guidance_scale,
                noise=None, prev_x0=None, return_x0=False):
        """(prev_sample, x0 or None): one fused update with row `index` of the table for
        `table_key`. x0 is written only when asked: it is one more full-size output."""
        if model_output_uncond is None:
            row = self._rows(table_key)[index]
        elif isinstance(guidance_scale, torch.Tensor):
            row = self._guided_row(self._rows(table_key)[index], guidance_scale)
        else:
            row = self._rows(table_key, float(guidance_scale))[index]
        out = scheduler_update(sample, model_output, row, model_output_uncond, noise, prev_x0,
                               return_x0=return_x0, backend=self.backend)
        return out if return_x0 else (out, None)

    # Families whose public step output carries pred_original_sample (DDIM, DDPM) implement
    # _step(model_output, timestep, sample, **step_kwargs, return_x0=...) -> (prev, x0 or None).
    _step = None

    def _prev_sample(self, model_output, timestep, sample, **step_kwargs) -> torch.Tensor:
        """`step(...).prev_sample` for the sampling loop, which reads nothing else: where the
        public output carries pred_original_sample, this step does not write it (one full-size
        output less); the other families' step writes only what they need anyway."""
        if self._step is not None:
            return self._step(model_output, timestep, sample, return_x0=False, **step_kwargs)[0]
        return self.step(model_output, timestep, sample, return_dict=False, **step_kwargs)[0]

    def rewind(self):
        """Back to the first step of the current schedule, keeping the coefficient tables (and
        the timesteps tensor): a second pass over the schedule, like a CUDA graph capture after
        its warm-up, then builds and copies nothing. set_timesteps instead starts afresh and
        drops the tables."""
        self._require_timesteps()
        self._step_index = None

    def _schedule_key(self):
        """What the coefficient tables depend on (class, config, backend and the schedule that
        set_timesteps made), hashable: equal keys, equal tables. Keys a cache of captured loops."""
        sigmas = getattr(self, "sigmas", None)
        return (type(self), _hashable(dict(self.config)), self.backend, _hashable(self._host_timesteps),
                None if sigmas is None else _hashable(sigmas))

    def _finish_set_timesteps(self, timesteps: np.ndarray, device, dtype=torch.int64):
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._host_timesteps = timesteps
        self._index_of = {}
        for i, t in enumerate(timesteps.tolist()):
            self._index_of.setdefault(t, i)
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device=self._device, dtype=dtype)
        self.num_inference_steps = len(timesteps)
        self._tables = {}
        self._step_index = None
        self._begin_index = None
