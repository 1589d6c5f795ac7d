"""Public ops: validation, dispatch, torch.library registration and autograd, one file per op."""
from .attention import attention
from .group_norm import group_norm
from .layer_norm import layer_norm
from .merge_attention import merge_attention
from .qk_norm_rope import qk_norm_rope
from .rms_norm import rms_norm
from .scheduler import (
    ddim_coefs, ddim_step, ddpm_coefs, ddpm_step, dpmpp_2m_coefs, dpmpp_2m_step,
    flow_euler_coefs, flow_euler_step, scheduler_update,
)

__all__ = [
    "attention", "merge_attention", "group_norm", "layer_norm", "rms_norm", "qk_norm_rope", "scheduler_update",
    "ddim_step", "ddpm_step", "flow_euler_step", "dpmpp_2m_step",
    "ddim_coefs", "ddpm_coefs", "flow_euler_coefs", "dpmpp_2m_coefs",
]
