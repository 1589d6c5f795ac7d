"""diffusers-compatible schedulers whose `step` is one fused `flashdiff.scheduler_update` call.

Same constructor arguments, `from_config`, `set_timesteps`, `.timesteps` and `step(...)`
keywords as diffusers, the same numbers (fp32), and two additions to `step`:
`model_output_uncond=` + `guidance_scale=` fuse classifier-free guidance into the update.
The per-step coefficients are a [T, 12] table built once per schedule on the device, so a
step reads no value back to the host and a whole loop can be captured in a CUDA graph.
"""
from ._base import SchedulerOutput, randn_tensor
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": FlowMatchEulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}

__all__ = ["DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
           "SchedulerOutput", "randn_tensor", "SCHEDULERS"]
