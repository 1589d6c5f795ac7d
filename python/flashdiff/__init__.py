"""flashdiff: fused Triton and CUDA C++ kernels for diffusion models.

    import flashdiff
    y = flashdiff.group_norm(x, 32, weight, bias, activation="silu")     # GroupNorm + SiLU, one pass
    o = flashdiff.attention(q, k, v)                                     # fused SDPA
    x = flashdiff.ddim_step(eps_cond, x, a_t, a_prev,                    # DDIM step + CFG, one pass
                            model_output_uncond=eps_uncond, guidance_scale=7.5)
    print(flashdiff.explain("group_norm", x, 32, activation="silu"))     # which backend, and why

Every op has a PyTorch reference in `flashdiff.reference`; `backend=` picks reference | cpu |
triton | cuda, None means the fastest that supports the inputs (FLASHDIFF_BACKEND overrides).
"""
__version__ = "0.1.0"

from . import reference
from .backends import available_backends, backend_status, explain, set_override
from .patching import (
    PatchReport, disable_sdpa_override, enable_sdpa_override, patch, patched, sdpa_override, unpatch,
)
from .ops import (
    attention, ddim_coefs, ddim_step, ddpm_coefs, ddpm_step, dpmpp_2m_coefs, dpmpp_2m_step,
    flow_euler_coefs, flow_euler_step, group_norm, layer_norm, merge_attention, qk_norm_rope, rms_norm,
    scheduler_update,
)

__all__ = [
    "attention", "merge_attention", "group_norm", "layer_norm", "rms_norm", "qk_norm_rope", "scheduler_update",
    "ddim_step", "ddpm_step", "flow_euler_step", "dpmpp_2m_step",
    "ddim_coefs", "ddpm_coefs", "flow_euler_coefs", "dpmpp_2m_coefs",
    "patch", "unpatch", "patched", "PatchReport", "enable_sdpa_override", "disable_sdpa_override",
    "sdpa_override", "reference", "available_backends", "backend_status", "explain", "set_override",
]
