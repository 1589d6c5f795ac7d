"""Scheduler swap: a pipeline's scheduler becomes flashdiff's of the same class name."""
from __future__ import annotations

import importlib

from .report import PatchReport, _State

# flashdiff's classes subclass diffusers' of the same name, so from_config(config) gives the
# same scheduler (config, numbers) with a fused step; unpatch puts the original object back.
_SCHEDULER_NAMES = ("DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def _patch_scheduler(pipe, state: _State, report: PatchReport) -> None:
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        return
    name = type(sched).__name__
    if type(sched).__module__.split(".")[0] == "flashdiff":
        report.left_alone.append(("scheduler", "scheduler", f"{name} is already flashdiff's"))
        return
    try:
        mod = importlib.import_module("flashdiff.schedulers")
    except ImportError as err:
        report.left_alone.append(("scheduler", "scheduler", f"flashdiff.schedulers is unavailable ({err})"))
        return
    cls = getattr(mod, name, None) if name in _SCHEDULER_NAMES else None
    if cls is None:
        report.left_alone.append(("scheduler", "scheduler", f"flashdiff.schedulers has no {name}"))
        return
    try:
        new = cls.from_config(sched.config)
    except Exception as err:  # any config the flashdiff scheduler rejects leaves the original in place
        report.left_alone.append(("scheduler", "scheduler", f"{cls.__name__}.from_config failed: "
                                  f"{type(err).__name__}: {err}"))
        return
    state.scheduler = (pipe, "scheduler", sched)
    setattr(pipe, "scheduler", new)
    report.replaced.append(("scheduler", "scheduler", f"{name} -> flashdiff.schedulers.{cls.__name__}"))
