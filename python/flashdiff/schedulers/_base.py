"""The mixin that turns a diffusers scheduler into a fused one (docs/schedulers.md).

`class DDIMScheduler(FusedScheduler, diffusers.DDIMScheduler)`: diffusers keeps the config,
save/load, set_timesteps and every helper; the mixin replaces `step` with ONE call of
`flashdiff.scheduler_update` on a row of a [T, 12] coefficient table. A subclass says how to
build the table from the schedule (`_build_table(key)`, float64, vectorised over the steps) and
which configurations have no affine form (`_fallback_reason()`).

Tables are keyed by (step kwargs, guidance weight, device) and built on the first step that
needs them (or explicitly before a CUDA-graph capture: sampling.GraphedSampler runs a warm-up
pass, then `rewind()`). A row is a view, so a step launches one kernel and reads nothing back to
the host. `set_timesteps` (or a new `timesteps` tensor) drops the tables.

Paths a step can take (`scheduler.fused_path`):
  "fused"      one scheduler_update per step;
  "two-pass"   dynamic thresholding: a per-sample quantile of x0 is not affine, so one fused pass
               writes x0 (and the x0-independent part of eps), torch thresholds it on the device,
               a second fused pass finishes the update. No host sync either way;
  "fallback"   diffusers' own step (the reason says why), which may read device values.
"""
from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from typing import Any, Dict, Optional

import numpy as np
import torch

from .. import _validate as check
from ..ops.scheduler import scheduler_update
from ..reference import SCHED_COEF_NAMES

# Coefficient tables a scheduler keeps (per step kwargs x guidance weight x device): a loop
# needs one or two; a guidance schedule (a new weight every step) would otherwise grow without end.
_MAX_TABLES = 16

__all__ = ["FusedScheduler", "pack_table", "make_output", "COL"]

COL = {name: i for i, name in enumerate(SCHED_COEF_NAMES)}  # column of each coefficient


def pack_table(n: int, **columns) -> torch.Tensor:
    """[n, 12] float64 table from named columns (tensors [n] or numbers; missing = 0, clip = inf)."""
    table = torch.zeros((n, len(SCHED_COEF_NAMES)), dtype=torch.float64)
    table[:, COL["clip"]] = float("inf")
    table[:, COL["guidance"]] = 1.0
    for name, value in columns.items():
        table[:, COL[name]] = value.to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
    return table


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


def _host_value(timestep):
    """The timestep as a Python number when reading it needs no device sync (a number or a CPU
    tensor), else None (a device tensor: the step counter decides)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.device.type != "cpu" or timestep.numel() != 1:
            return None
        return float(timestep) if timestep.is_floating_point() else int(timestep)
    if isinstance(timestep, np.generic):
        return timestep.item()
    return timestep


class FusedScheduler:
    """Mixin placed before a diffusers scheduler class (see the module docstring).

    Adds: the `backend=` constructor keyword (not saved in the config), `model_output_uncond=`
    + `guidance_scale=` on step (classifier-free guidance inside the fused update),
    `fused_path` / `explain()`, and the internal API flashdiff.sampling uses (`_prev_sample`,
    `rewind`, `_schedule_key`, `_tables`, `_host_timesteps`).
    """

    # Does the family read the previous step's x0 through the kernel's prev_x0 slot (DPM-Solver)?
    # The two-pass path then cannot lend that slot to the eps part.
    _uses_prev_x0 = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # diffusers' ConfigMixin reads the constructor's signature to split a config into init
        # kwargs: show it the diffusers signature plus `backend`.
        parent = next((c for c in cls.__mro__[1:] if c.__module__.startswith("diffusers.")), None)
        if parent is None:  # an intermediate mixin (no diffusers class yet)
            return
        sig = inspect.signature(parent.__init__)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params.append(inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None))

        def __init__(self, *args, backend: Optional[str] = None, **kw):
            FusedScheduler._setup(self, backend)
            parent.__init__(self, *args, **kw)

        __init__.__signature__ = sig.replace(parameters=params)
        __init__.__doc__ = parent.__init__.__doc__
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__

        # pipelines inspect set_timesteps' parameters (retrieve_timesteps: sigmas=, timesteps=)
        ts_sig = inspect.signature(parent.set_timesteps)

        @functools.wraps(parent.set_timesteps)
        def set_timesteps(self, *args, **kw):
            """diffusers' set_timesteps (same arguments). It runs on the host, the host copy of the
            schedule (the tables' source) is kept, then the tensors move to `device` as diffusers
            places them: no device read, and the old tables are dropped."""
            bound = ts_sig.bind(self, *args, **kw)
            device = bound.arguments.get("device")
            if "device" in ts_sig.parameters:
                bound.arguments["device"] = None
            out = parent.set_timesteps(*bound.args, **bound.kwargs)
            self._new_schedule()
            if device is not None:
                self._place(torch.device(device))
            return out

        cls.set_timesteps = set_timesteps

    def _setup(self, backend):
        self.backend = backend  # flashdiff backend of the fused update (None = auto)
        self._tables: Dict[Any, list] = {}
        self._host_timesteps = None
        self._schedule_of = None
        self._step_index = None

    # ------------------------------------------------------------------ schedule bookkeeping
    def _new_schedule(self):
        # one device->host read per schedule (never inside a sampling loop)
        self._host_timesteps = self.timesteps.detach().cpu().numpy()
        self._index_of = {}
        for i, t in enumerate(self._host_timesteps.tolist()):
            self._index_of.setdefault(t, i)
        self._schedule_of = self.timesteps
        self._tables = {}
        self._schedule_values()

    def _place(self, device):
        """Move what diffusers' set_timesteps puts on the device (the timesteps; sigmas stay on
        the host in most of diffusers' schedulers)."""
        self.timesteps = self._schedule_of = self.timesteps.to(device)

    def _schedule_values(self):
        """Subclasses: host float64 values the tables are built from (called per schedule)."""

    def _check_schedule(self):
        # a `timesteps` tensor assigned by hand is a new schedule too
        if self._schedule_of is None or self.timesteps is not self._schedule_of:
            self._new_schedule()

    def _schedule_key(self):
        """What the coefficient tables depend on (class, config, backend and the schedule),
        hashable: equal keys, equal tables. Keys sampling's cache of captured loops."""
        self._check_schedule()
        sigmas = getattr(self, "sigmas", None)
        return (type(self), _hashable(dict(self.config)), self.backend, _hashable(self._host_timesteps),
                None if not isinstance(sigmas, torch.Tensor) else _hashable(sigmas))

    def rewind(self):
        """Back to the first step of the current schedule, keeping the coefficient tables: a
        second pass (a CUDA-graph capture after its warm-up) then builds and copies nothing."""
        self._check_schedule()
        self._step_index = None

    # ------------------------------------------------------------------ which path
    def _fallback_reason(self) -> Optional[str]:
        """Why this configuration runs diffusers' own step (None: it is fused)."""
        return None

    @property
    def fused_path(self) -> str:
        """"fused", "two-pass" (dynamic thresholding) or "fallback" (diffusers' step)."""
        if self._fallback_reason() is not None:
            return "fallback"
        return "two-pass" if getattr(self.config, "thresholding", False) else "fused"

    def explain(self) -> str:
        """One line: the path this configuration's step takes, and why."""
        path = self.fused_path
        if path == "fallback":
            return f"{type(self).__name__}: fallback: diffusers' own step, because {self._fallback_reason()}"
        if path == "two-pass":
            return (f"{type(self).__name__}: two-pass: two fused updates per step: dynamic thresholding takes a "
                    "per-sample quantile of x0 (not affine), computed in torch on the device between them")
        return f"{type(self).__name__}: fused: one scheduler_update per step"

    # ------------------------------------------------------------------ step index
    def _index_for(self, timestep) -> int:
        """diffusers' index_for_timestep from the host copy of the schedule (the second match
        when a timestep repeats); None when the value is not in the schedule."""
        value = _host_value(timestep)
        if value is None:
            return None
        hits = np.flatnonzero(self._host_timesteps == value)
        if len(hits) == 0:
            return None
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _counter_index(self, timestep) -> int:
        """diffusers' _step_index: set on the first step (begin_index, else from a host-readable
        timestep, else 0 for a device timestep: no sync), then counted in Python."""
        if self._step_index is None:
            begin = getattr(self, "_begin_index", None)
            if begin is not None:
                self._step_index = begin
            else:
                found = self._index_for(timestep)
                if found is None:  # a device timestep starts at 0 (reading it would sync)
                    found = 0 if _host_value(timestep) is None else self._missing_index(timestep)
                self._step_index = found
        if self._step_index >= len(self._host_timesteps):
            raise IndexError(f"{type(self).__name__}: step() called {self._step_index + 1} times for "
                             f"{len(self._host_timesteps)} timesteps; call set_timesteps again")
        return self._step_index

    def _missing_index(self, timestep) -> int:
        return 0

    # ------------------------------------------------------------------ tables
    def _build_table(self, key) -> torch.Tensor:
        """[T, 12] float64 coefficients for these step kwargs (subclasses)."""
        raise NotImplementedError

    def _rows(self, key, guidance, device, kind="main"):
        """The rows (views) of a table, built once per (kind, key, guidance, device)."""
        k = (kind, key, guidance, device)
        rows = self._tables.get(k)
        if rows is None:
            if len(self._tables) >= _MAX_TABLES:  # a guidance schedule would grow it forever
                self._tables.pop(next(iter(self._tables)))  # oldest first (captured graphs hold theirs)
            if kind == "main":
                table = self._build_table(key)
            else:
                table = self._threshold_tables(self._build_table(key), key)[kind == "pass2"]
            if guidance != 1.0:
                table[:, COL["guidance"]] = guidance
            table = table.to(torch.float32).to(device).contiguous()
            rows = self._tables[k] = list(table.unbind(0))
        return rows

    def _x0_columns(self, table, key):
        """(x0_from_x, x0_from_m) of the raw x0 the thresholding reads (default: the table's)."""
        return table[:, COL["x0_from_x"]], table[:, COL["x0_from_m"]]

    def _slot_from_thresholded(self, key):
        """(from_x, from_x0) of the value the second pass writes to the x0 slot, from x and the
        thresholded x0 (default: x0 itself; DPM-Solver's eps form differs)."""
        return 0.0, 1.0

    def _threshold_tables(self, table, key):
        """(pass1, pass2) of the two-pass path. pass1 writes x0 (raw, unclipped) and, as its
        'prev', E = e_x·x + e_m·m; pass2 gets the thresholded x0 as its model output and adds
        E through the prev_x0 slot (or the previous x0 there, for DPM-Solver, whose rows read no eps)."""
        n = table.shape[0]
        x0_x, x0_m = self._x0_columns(table, key)
        pass1 = pack_table(n, x0_from_x=x0_x, x0_from_m=x0_m, eps_from_x=table[:, COL["eps_from_x"]],
                           eps_from_m=table[:, COL["eps_from_m"]], prev_from_eps=1.0)
        pass2 = table.clone()
        from_x, from_x0 = self._slot_from_thresholded(key)
        pass2[:, COL["guidance"]] = 1.0
        pass2[:, COL["x0_from_x"]] = from_x
        pass2[:, COL["x0_from_m"]] = from_x0
        pass2[:, COL["clip"]] = float("inf")
        pass2[:, COL["eps_from_x"]] = 0.0
        pass2[:, COL["eps_from_m"]] = 0.0
        if not self._uses_prev_x0:
            pass2[:, COL["prev_from_prev_x0"]] = table[:, COL["prev_from_eps"]]
        return pass1, pass2

    def _update(self, key, index, model_output, sample, uncond=None, guidance_scale=1.0, noise=None,
                prev_x0=None, return_x0=False):
        """(prev_sample, x0 or None) for step `index`: one fused update (two on the two-pass path)."""
        tensor_g = isinstance(guidance_scale, torch.Tensor)
        if uncond is not None and not tensor_g:
            check.finite_number("guidance_scale", guidance_scale)
        g = 1.0 if (uncond is None or tensor_g) else float(guidance_scale)
        device = sample.device
        if getattr(self.config, "thresholding", False):
            row1 = _pick(self._rows(key, g, device, "pass1"), index)
            if uncond is not None and tensor_g:
                row1 = _guided_row(row1, guidance_scale)
            eps_part, x0 = scheduler_update(sample, model_output, row1, uncond, None, None,
                                            return_x0=True, backend=self.backend)
            x0 = self._threshold_sample(x0)
            row2 = _pick(self._rows(key, 1.0, device, "pass2"), index)
            slot = prev_x0 if self._uses_prev_x0 else eps_part
            return scheduler_update(sample, x0, row2, None, noise, slot, return_x0=True, backend=self.backend)
        row = _pick(self._rows(key, g, device), index)
        if uncond is not None and tensor_g:
            row = _guided_row(row, guidance_scale)
        out = scheduler_update(sample, model_output, row, uncond, noise, prev_x0, return_x0=return_x0,
                               backend=self.backend)
        return out if return_x0 else (out, None)

    def _prev_sample(self, model_output, timestep, sample, **step_kwargs) -> torch.Tensor:
        """`step(...).prev_sample` for the sampling loop, which reads nothing else: where the
        public output carries pred_original_sample, this step does not write it."""
        return self._step(model_output, timestep, sample, return_x0=False, **step_kwargs)[0]

    def _fallback_step(self, model_output, timestep, sample, uncond, guidance_scale, return_dict, **kwargs):
        """diffusers' own step, guidance applied first in torch (the fallback path)."""
        if uncond is not None:
            model_output = uncond + guidance_scale * (model_output - uncond)
        return super().step(model_output, timestep, sample, return_dict=return_dict, **kwargs)


def make_output(cls, **values):
    """`cls(**values)` for a diffusers BaseOutput dataclass, without its __post_init__ walk over
    the dataclass fields (3 µs, a fifth of a fused step at latent sizes): the same state, the
    values as attributes and the non-None ones as items, in field order."""
    out = cls.__new__(cls)
    for name, value in values.items():
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)
    return out


def _pick(rows, index):
    """Row `index` of a table: a Python int picks a view (no kernel); a device tensor (a
    timestep's position, computed on the device) gathers it on the device, so a step looked up
    by a device timestep's value reads nothing back to the host."""
    if isinstance(index, torch.Tensor):
        return rows[0]._base.index_select(0, index.reshape(1).to(torch.long)).reshape(-1)
    return rows[index]


def _guided_row(row, guidance_scale):
    """The row with a tensor guidance weight in slot 0 (stays on the device; a Python weight is
    baked into the cached table instead)."""
    row = row.clone()
    row[0:1].copy_(guidance_scale.reshape(1))
    return row
