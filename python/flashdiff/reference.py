"""The PyTorch definition of every flashdiff op (DESIGN.md decision 2).

Tests, benchmarks and `flashdiff validate` compare every backend against these functions;
no second copy of this math lives anywhere else. They favour clarity over speed.

`upcast` selects the dtype the math runs in, which is also the dtype returned:
  True        float64 (the precise reference of the tolerance rule)
  False       the input's own dtype (the "torch in dtype d" term of the tolerance rule)
  a dtype     that dtype (the `reference` backend uses float32, then casts back)

The scheduler references are written in the textbook / diffusers form, independently of the
coefficient builders in `flashdiff.ops.scheduler`, so a wrong coefficient is caught by tests.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Scalar = Union[float, torch.Tensor]

__all__ = [
    "attention", "attention_lse", "merge_attention", "group_norm", "group_norm_stats", "layer_norm",
    "layer_norm_stats", "rms_norm", "rms_norm_rstd", "scheduler_update",
    "ddim_step", "ddpm_step", "flow_euler_step", "dpmpp_2m_step",
]


def _compute_dtype(upcast, like: torch.dtype) -> torch.dtype:
    if upcast is True:
        return torch.float64
    if upcast is False:
        return like
    return upcast


def _scalar(v: Scalar, dtype, device) -> torch.Tensor:
    return torch.as_tensor(v, dtype=dtype, device=device)


# ---------------------------------------------------------------- attention
def attention(q, k, v, attn_mask=None, scale=None, upcast=True):
    """softmax(q kᵀ · scale + mask) v, per (batch, head). q [B,H,Sq,D], k/v [B,H,Skv,D].

    attn_mask: bool (True = attend) or additive, broadcastable to [B, H, Sq, Skv].
    A query row with no key left to attend outputs zeros (where torch's SDPA gives NaN).
    """
    dt = _compute_dtype(upcast, q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Sq, Skv]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(dt)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out


def attention_lse(q, k, v, attn_mask=None, scale=None, upcast=True):
    """(attention(...), lse): lse [B, H, Sq] = log Σ_j exp(q·k_j·scale + mask_j), natural log,
    over the attended keys; -inf for a row with no key (its output is 0). Returned in the
    compute dtype (float64 with upcast=True)."""
    dt = _compute_dtype(upcast, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(dt)
    # attention() reduces over the keys with amax, which refuses Skv = 0: no keys, zero output
    out = attention(q, k, v, attn_mask, scale, upcast) if k.shape[2] else scores.new_zeros(
        q.shape[:-1] + (v.shape[-1],))
    return out, torch.logsumexp(scores, dim=-1)


def merge_attention(outs, lses, upcast=True):
    """Combine attention over disjoint key sets: (out, lse) of their union.

    lse = log Σ_i exp(lse_i); out = Σ_i exp(lse_i − lse)·out_i. An empty partial (lse_i = -inf,
    or +inf as the fused kernels write it internally) weighs 0, even if its out_i is NaN; a row
    empty in every partial gives out 0 and lse -inf; a NaN lse_i makes the row NaN."""
    dt = _compute_dtype(upcast, outs[0].dtype)
    lse_all = torch.stack([l.to(dt) for l in lses])                           # [n, B, H, Sq]
    lse_all = lse_all.masked_fill(torch.isposinf(lse_all), float("-inf"))
    lse = torch.logsumexp(lse_all, dim=0)                                      # -inf if all empty
    w = torch.exp(lse_all - lse.masked_fill(torch.isneginf(lse), 0.0))        # 0 where empty
    out = sum(torch.where(wi[..., None] == 0, 0.0, wi[..., None] * o.to(dt)) for wi, o in zip(w, outs))
    return out, lse


# ---------------------------------------------------------------- group norm
def _activation(y, activation):
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)  # exact (erf)
    raise ValueError(f"activation must be None, 'silu' or 'gelu', got {activation!r}")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None,
               scale=None, shift=None, upcast=True):
    """y = act(((x − mean)·rstd·weight + bias)·(1 + scale) + shift), stats per (sample, group).

    x [N, C, *spatial]; weight, bias [C]; scale, shift [N, C]. Biased variance, like torch.
    The result has x's memory format (contiguous or channels_last).
    """
    dt = _compute_dtype(upcast, x.dtype)
    N, C = x.shape[:2]
    bcast = (1, C) + (1,) * (x.dim() - 2)
    per_sample = (N, C) + (1,) * (x.dim() - 2)
    mean, rstd = group_norm_stats(x, num_groups, eps, upcast=dt)
    xg = x.to(dt).reshape(N, num_groups, -1)
    y = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if weight is not None:
        y = y * weight.to(dt).reshape(bcast)
    if bias is not None:
        y = y + bias.to(dt).reshape(bcast)
    if scale is not None:
        y = y * (1 + scale.to(dt).reshape(per_sample))
    if shift is not None:
        y = y + shift.to(dt).reshape(per_sample)
    y = _activation(y, activation)
    return _like_layout(y, x)


def group_norm_stats(x, num_groups, eps=1e-5, upcast=True):
    """(mean, rstd), each [N, num_groups]: two-pass statistics with the biased variance."""
    dt = _compute_dtype(upcast, x.dtype)
    xg = x.to(dt).reshape(x.shape[0], num_groups, -1)
    mean = xg.mean(dim=-1)
    var = ((xg - mean[..., None]) ** 2).mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def _like_layout(y, x):
    """y laid out like x: channels-last ([N, *spatial, C] in memory) stays channels-last."""
    perm = (0, *range(2, x.dim()), 1)
    if not x.is_contiguous() and x.permute(perm).is_contiguous():
        inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return y.permute(perm).contiguous().permute(inverse)
    return y.contiguous()


# ---------------------------------------------------------------- layer norm, rms norm
def _per_token(m, x):
    """A modulation tensor broadcast over x's rows: [N, D] with x [N, T, D] applies to every
    token of sample n (DiT/PixArt/SD3/Flux adaLN); a tensor of x's shape applies per token."""
    if m.dim() == 2 and x.dim() == 3:
        return m[:, None, :]
    return m


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-6, scale=None, shift=None,
               activation=None, upcast=True):
    """y = act((x̂·weight + bias)·(1 + scale) + shift), x̂ = (x − mean)·rstd over the last dim.

    The adaLN LayerNorm of DiT, PixArt, SD3 and Flux: x [..., D]; weight, bias [D] (both
    usually None there: elementwise_affine=False); scale, shift [N, D] with x [N, T, D] (one
    modulation per sample, broadcast over its tokens) or x's shape (per token). Statistics
    per row, two-pass, biased variance (as torch.nn.LayerNorm). The result is contiguous.
    """
    if tuple(normalized_shape) != (x.shape[-1],):
        raise ValueError(f"normalized_shape must be ({x.shape[-1]},) (the last dim of x), "
                         f"got {tuple(normalized_shape)}")
    dt = _compute_dtype(upcast, x.dtype)
    mean, rstd = layer_norm_stats(x, eps, upcast=dt)
    y = (x.to(dt) - mean[..., None]) * rstd[..., None]
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    if scale is not None:
        y = y * (1 + _per_token(scale.to(dt), x))
    if shift is not None:
        y = y + _per_token(shift.to(dt), x)
    return _activation(y, activation).contiguous()


def layer_norm_stats(x, eps=1e-6, upcast=True):
    """(mean, rstd) over the last dim, each x.shape[:-1]: two-pass, biased variance."""
    dt = _compute_dtype(upcast, x.dtype)
    xf = x.to(dt)
    mean = xf.mean(dim=-1)
    var = ((xf - mean[..., None]) ** 2).mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def rms_norm(x, weight=None, eps=1e-6, upcast=True):
    """y = x·rsqrt(mean(x²) + eps)·weight over the last dim (the q/k norm of SD3 and Flux).
    x [..., D], weight [D] or None. The result is contiguous."""
    dt = _compute_dtype(upcast, x.dtype)
    y = x.to(dt) * rms_norm_rstd(x, eps, upcast=dt)[..., None]
    if weight is not None:
        y = y * weight.to(dt)
    return y.contiguous()


def rms_norm_rstd(x, eps=1e-6, upcast=True):
    """rsqrt(mean(x²) + eps) over the last dim, x.shape[:-1]."""
    dt = _compute_dtype(upcast, x.dtype)
    return torch.rsqrt(x.to(dt).pow(2).mean(dim=-1) + eps)


def rotary_emb(x, cos, sin, interleaved=True, upcast=True):
    """x·cos + rotate(x)·sin over the last dim (diffusers' apply_rotary_emb, use_real=True).

    x [B, H, S, D], cos/sin [S, D] (broadcast over B, H) or None (x returned as is).
    rotate: interleaved pairs (x[2i], x[2i+1]) -> (−x[2i+1], x[2i]) (Flux, CogVideoX:
    use_real_unbind_dim=-1), else halves (x[:D/2], x[D/2:]) -> (−x[D/2:], x[:D/2])
    (use_real_unbind_dim=-2). The result is contiguous."""
    dt = _compute_dtype(upcast, x.dtype)
    x = x.to(dt)
    if cos is None:
        return x.contiguous()
    if interleaved:
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(dt) + rotated * sin.to(dt)).contiguous()


def qk_norm_rope(q, k, q_weight=None, k_weight=None, cos=None, sin=None, eps=1e-6, interleaved=True,
                 upcast=True):
    """(rotary_emb(rms_norm(q, q_weight)), rotary_emb(rms_norm(k, k_weight))): the q/k norm of
    SD3/Flux then the rotary embedding. q [B, H, S, D], k [B, Hk, S, D] (any Sk without rope),
    weights [D] or None, cos/sin [S, D] or None. No rounding between the norm and the rotation."""
    return tuple(rotary_emb(rms_norm(x, w, eps, upcast), cos, sin, interleaved, upcast)
                 for x, w in ((q, q_weight), (k, k_weight)))


# ---------------------------------------------------------------- scheduler updates
# Order of the generic coefficient vector; csrc/include/flashdiff/params.h (SchedCoef) and
# triton_kernels/scheduler.py index it the same way.
SCHED_COEF_NAMES = (
    "guidance", "x0_from_x", "x0_from_m", "clip",
    "eps_from_x", "eps_from_m", "eps_from_x0",
    "prev_from_x", "prev_from_x0", "prev_from_eps", "prev_from_noise", "prev_from_prev_x0",
)


def scheduler_update(sample, model_output, coefs, model_output_uncond=None, noise=None,
                     prev_x0=None, upcast=True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The generic affine sampler update every family lowers to. Returns (prev_sample, x0).

      m    = u + g·(c − u) if model_output_uncond is given, else c
      x0   = clamp(a_x·x + a_m·m, −clip, clip)
      eps  = e_x·x + e_m·m + e_0·x0
      prev = p_x·x + p_0·x0 + p_e·eps + p_n·noise + p_d·prev_x0
    """
    dt = _compute_dtype(upcast, sample.dtype)
    c = {name: coefs[i].to(dt) for i, name in enumerate(SCHED_COEF_NAMES)}
    x = sample.to(dt)
    m = model_output.to(dt)
    if model_output_uncond is not None:
        u = model_output_uncond.to(dt)
        m = u + c["guidance"] * (m - u)
    x0 = c["x0_from_x"] * x + c["x0_from_m"] * m
    x0 = torch.maximum(torch.minimum(x0, c["clip"]), -c["clip"])
    eps = c["eps_from_x"] * x + c["eps_from_m"] * m + c["eps_from_x0"] * x0
    prev = c["prev_from_x"] * x + c["prev_from_x0"] * x0 + c["prev_from_eps"] * eps
    if noise is not None:
        prev = prev + c["prev_from_noise"] * noise.to(dt)
    if prev_x0 is not None:
        prev = prev + c["prev_from_prev_x0"] * prev_x0.to(dt)
    return prev, x0


def _guided(model_output, model_output_uncond, guidance_scale, dt):
    m = model_output.to(dt)
    if model_output_uncond is None:
        return m
    u = model_output_uncond.to(dt)
    return u + guidance_scale * (m - u)


def _x0_and_eps(m, x, alpha_prod_t, prediction_type):
    """diffusers' conversion of a model output to (x0, eps) at cumulative alpha ᾱ_t."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (x - beta_prod_t.sqrt() * m) / alpha_prod_t.sqrt(), m
    if prediction_type == "sample":
        return m, (x - alpha_prod_t.sqrt() * m) / beta_prod_t.sqrt()
    if prediction_type == "v_prediction":
        return (alpha_prod_t.sqrt() * x - beta_prod_t.sqrt() * m,
                alpha_prod_t.sqrt() * m + beta_prod_t.sqrt() * x)
    raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=0.0, noise=None,
              prediction_type="epsilon", clip_sample_range=None, use_clipped_model_output=False,
              model_output_uncond=None, guidance_scale=1.0, upcast=True):
    """DDIM (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.step. Returns (prev, x0)."""
    dt = _compute_dtype(upcast, sample.dtype)
    x = sample.to(dt)
    a_t, a_prev = _scalar(alpha_prod_t, dt, x.device), _scalar(alpha_prod_t_prev, dt, x.device)
    m = _guided(model_output, model_output_uncond, guidance_scale, dt)
    x0, eps = _x0_and_eps(m, x, a_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std_dev_t = eta * variance.sqrt()
    if use_clipped_model_output:
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - std_dev_t ** 2).sqrt() * eps
    if noise is not None:
        prev = prev + std_dev_t * noise.to(dt)
    return prev, x0


def ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None,
              variance_type="fixed_small", prediction_type="epsilon", clip_sample_range=None,
              model_output_uncond=None, guidance_scale=1.0, upcast=True):
    """DDPM ancestral step (Ho et al. 2020, eq. 6-7), as diffusers' DDPMScheduler.step.

    noise=None means no noise is added (diffusers' last step, t = 0). Returns (prev, x0).
    """
    dt = _compute_dtype(upcast, sample.dtype)
    x = sample.to(dt)
    a_t, a_prev = _scalar(alpha_prod_t, dt, x.device), _scalar(alpha_prod_t_prev, dt, x.device)
    m = _guided(model_output, model_output_uncond, guidance_scale, dt)
    x0, _ = _x0_and_eps(m, x, a_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    current_alpha_t = a_t / a_prev
    current_beta_t = 1 - current_alpha_t
    prev = (a_prev.sqrt() * current_beta_t / (1 - a_t)) * x0 \
        + (current_alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)) * x
    if noise is not None:
        if variance_type in ("fixed_small", "fixed_small_log"):
            std = ((1 - a_prev) / (1 - a_t) * current_beta_t).clamp(min=1e-20).sqrt()
        elif variance_type == "fixed_large":
            std = current_beta_t.sqrt()
        else:
            raise ValueError(f"variance_type must be 'fixed_small', 'fixed_small_log' or 'fixed_large', "
                             f"got {variance_type!r}")
        prev = prev + std * noise.to(dt)
    return prev, x0


def flow_euler_step(model_output, sample, sigma, sigma_next, noise=None,
                    model_output_uncond=None, guidance_scale=1.0, upcast=True):
    """Flow-matching Euler step (x_t = (1 − σ)·x0 + σ·noise, model predicts the velocity).

    Deterministic: prev = x + (σ_next − σ)·v. With noise (diffusers' stochastic_sampling):
    prev = (1 − σ_next)·x0 + σ_next·noise. x0 = x − σ·v. Returns (prev, x0).
    """
    dt = _compute_dtype(upcast, sample.dtype)
    x = sample.to(dt)
    s, s_next = _scalar(sigma, dt, x.device), _scalar(sigma_next, dt, x.device)
    v = _guided(model_output, model_output_uncond, guidance_scale, dt)
    x0 = x - s * v
    if noise is None:
        return x + (s_next - s) * v, x0
    return (1 - s_next) * x0 + s_next * noise.to(dt), x0


def dpmpp_2m_step(model_output, sample, sigma_next, sigma, sigma_prev=None, prev_x0=None,
                  prediction_type="epsilon", model_output_uncond=None, guidance_scale=1.0,
                  upcast=True):
    """DPM-Solver++(2M) (Lu et al. 2022, midpoint form), as diffusers' DPMSolverMultistepScheduler.

    Sigmas are diffusers' σ = sqrt((1 − ᾱ)/ᾱ): σ_next (target), σ (current), σ_prev (previous
    step; None or prev_x0 None = first order). Returns (prev, x0); x0 feeds the next step.
    """
    dt = _compute_dtype(upcast, sample.dtype)
    x = sample.to(dt)

    def alpha_sigma(s):
        s = _scalar(s, dt, x.device)
        alpha = 1 / (s ** 2 + 1).sqrt()
        return alpha, s * alpha

    alpha_s0, sigma_s0 = alpha_sigma(sigma)
    alpha_t, sigma_t = alpha_sigma(sigma_next)
    m = _guided(model_output, model_output_uncond, guidance_scale, dt)
    if prediction_type == "epsilon":
        x0 = (x - sigma_s0 * m) / alpha_s0
    elif prediction_type == "sample":
        x0 = m
    elif prediction_type == "v_prediction":
        x0 = alpha_s0 * x - sigma_s0 * m
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
    lambda_t = alpha_t.log() - sigma_t.log()
    lambda_s0 = alpha_s0.log() - sigma_s0.log()
    h = lambda_t - lambda_s0
    phi = alpha_t * (torch.exp(-h) - 1.0)
    prev = (sigma_t / sigma_s0) * x - phi * x0
    if sigma_prev is not None and prev_x0 is not None:
        alpha_s1, sigma_s1 = alpha_sigma(sigma_prev)
        lambda_s1 = alpha_s1.log() - sigma_s1.log()
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = (1.0 / r0) * (x0 - prev_x0.to(dt))
        prev = prev - 0.5 * phi * d1
    return prev, x0
