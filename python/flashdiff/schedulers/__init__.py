"""diffusers' schedulers whose `step` is one fused `flashdiff.scheduler_update` call.

Each class SUBCLASSES diffusers' class of the same name (docs/schedulers.md): the same
constructor, config, save_pretrained / from_pretrained, set_timesteps options, outputs and
numbers; only `step` is replaced. Two additions to `step`: `model_output_uncond=` +
`guidance_scale=` fuse classifier-free guidance into the update; one to the constructor:
`backend=` (not saved in the config) picks the flashdiff backend. `scheduler.fused_path` /
`scheduler.explain()` say which path a configuration's step takes. Needs diffusers (the
`models` extra): `pip install 'flashdiff[models]'`.
"""
try:
    import diffusers  # noqa: F401
except ImportError as err:  # flashdiff itself imports without diffusers; this package does not
    raise ImportError("flashdiff.schedulers subclasses diffusers' schedulers and needs diffusers: "
                      "pip install 'flashdiff[models]' (or pip install diffusers)") from err

from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": FlowMatchEulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}

__all__ = ["DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FusedScheduler", "SchedulerOutput",
           "randn_tensor", "SCHEDULERS"]
