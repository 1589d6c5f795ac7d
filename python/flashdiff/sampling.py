"""The sampling loop: model + scheduler for N steps, classifier-free guidance fused into the
scheduler step, optionally captured as one CUDA graph and replayed, a progress bar when
interactive.

    model = flashdiff.models.load_pretrained("digits-unet")
    images = flashdiff.sampling.sample(model, DDIMScheduler(), labels=torch.arange(10),
                                       num_inference_steps=50, guidance_scale=3.0,
                                       generator=torch.Generator().manual_seed(0))

The cond and uncond halves run as one batch of 2N through the model; the scheduler step takes
both outputs and does guidance + update in one kernel (no host sync inside the loop).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from .schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                         FlowMatchEulerDiscreteScheduler, randn_tensor)

SAMPLERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": FlowMatchEulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, backend: Optional[str] = None, model=None, **config):
    """A scheduler by CLI name (ddim | ddpm | euler | dpmpp) with flashdiff's backend switch.
    With `model`, the settings its checkpoint recommends (checkpoint_info["scheduler_config"])
    apply first (keys a scheduler does not take are ignored), then `config`."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    base = dict(getattr(model, "checkpoint_info", {}).get("scheduler_config", {})) if model is not None else {}
    return SAMPLERS[name].from_config({**base, **config}, backend=backend)


# ------------------------------------------------------------------ VP model as a flow model
class _VelocityFromEpsilon:
    """Lets an epsilon-prediction model trained on the VP schedule (ᾱ_t) drive the
    flow-matching Euler sampler (x = (1−σ)·x0 + σ·noise, velocity = noise − x0).

    A flow sample at σ is the VP sample at the ᾱ with √(1−ᾱ)/√ᾱ = σ/(1−σ), divided by
    √ᾱ + √(1−ᾱ). Per step (host math, once per schedule): the VP input scale and the
    fractional training timestep; per call: v = a·eps + b·x_flow (affine, so guidance commutes).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, sigmas: torch.Tensor):
        a = alphas_cumprod.to(torch.float64).numpy()
        r_train = np.sqrt((1 - a) / a)                           # VP σ of each training step
        log_r_train = np.log(r_train)
        s = sigmas.to(torch.float64).numpy()[:-1]
        r = np.clip(s / np.maximum(1 - s, 1e-12), r_train[0], r_train[-1])
        alpha_bar = 1 / (1 + r * r)
        self.t_model = np.interp(np.log(r), log_r_train, np.arange(len(a)))
        sqrt_a, sqrt_b = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
        self.c_in = sqrt_a + sqrt_b                              # x_vp = c_in·x_flow
        # x0 = (x_vp − √(1−ᾱ)·eps)/√ᾱ;  v = eps − x0 = (1 + √(1−ᾱ)/√ᾱ)·eps − (c_in/√ᾱ)·x_flow
        self.v_eps = 1 + sqrt_b / sqrt_a
        self.v_x = -self.c_in / sqrt_a


# ------------------------------------------------------------------ the loop
def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def _null_labels(model, labels):
    null = getattr(model, "num_classes", None)
    if null is None:
        raise ValueError("classifier-free guidance needs a class-conditional model (model.num_classes)")
    return torch.full_like(labels, null)


def _loop(model, scheduler, x, labels, guidance_scale, generator, eta, progress, adapter, context=None):
    """The N steps on a fixed x buffer (used eagerly and inside a CUDA graph capture)."""
    cfg = guidance_scale is not None and guidance_scale != 1.0
    y = torch.cat([labels, _null_labels(model, labels)]) if cfg else labels
    ctx = torch.cat([context, context]) if (cfg and context is not None) else context
    extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if not isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler)):
        extra["generator"] = generator
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.stochastic_sampling:
        extra["generator"] = generator
    timesteps = scheduler.timesteps
    for i in _progress(range(len(timesteps)), progress, "sampling"):
        t = timesteps[i]
        x_in = x
        if adapter is not None:
            x_in = x * float(adapter.c_in[i])
            t_model = torch.full((1,), float(adapter.t_model[i]), device=x.device)
        else:
            t_model = t.reshape(1).to(x.device)
        x_in = torch.cat([x_in, x_in]) if cfg else x_in
        out = model(x_in, t_model.expand(x_in.shape[0]), y, ctx) if ctx is not None \
            else model(x_in, t_model.expand(x_in.shape[0]), y)
        if adapter is not None:
            out = out * float(adapter.v_eps[i]) + (torch.cat([x, x]) if cfg else x) * float(adapter.v_x[i])
        if cfg:
            cond, uncond = out.chunk(2)
            x = scheduler.step(cond, t, x, model_output_uncond=uncond, guidance_scale=guidance_scale,
                               **extra).prev_sample
        else:
            x = scheduler.step(out, t, x, **extra).prev_sample
    return x


@torch.no_grad()
def sample(model, scheduler, labels, num_inference_steps: int = 50, guidance_scale: Optional[float] = 3.0,
           generator: Optional[torch.Generator] = None, device=None, eta: float = 0.0,
           cuda_graph: bool = False, progress: Optional[bool] = None, context=None,
           shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Generate one image per label: (N, C, H, W) in the model's data range.

    labels: class ids (N,) (tensor or list). guidance_scale None or 1 = no guidance.
    generator: draws the initial noise (and the sampler's noise) exactly as diffusers would.
    cuda_graph: capture the whole loop in one CUDA graph, then replay it (CUDA only).
    progress: a tqdm bar (None = when stderr is a terminal).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if shape is None:
        shape = (model.in_channels, model.sample_size, model.sample_size)
    if progress is None:
        progress = sys.stderr.isatty()
    scheduler.set_timesteps(num_inference_steps, device=device)
    adapter = None
    is_flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    if is_flow and getattr(model, "prediction_type", "epsilon") == "epsilon":
        adapter = _VelocityFromEpsilon(DDPMScheduler().alphas_cumprod, scheduler.sigmas)
    dtype = next(model.parameters()).dtype
    x = randn_tensor((len(labels), *shape), generator=generator, device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    if not cuda_graph:
        return _loop(model, scheduler, x, labels, guidance_scale, generator, eta, progress, adapter, context)
    if device.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    if generator is not None and generator.device.type == "cuda":
        raise ValueError("inside a CUDA graph the sampler's noise comes from the default CUDA generator; "
                         "pass a CPU generator (it seeds the initial noise) or None")
    graph = GraphedSampler(model, scheduler, labels, num_inference_steps, guidance_scale, eta, adapter, context)
    return graph(x)


class GraphedSampler:
    """The whole sampling loop captured once as a CUDA graph; each call copies the initial
    noise in and replays it (one launch for N steps of model + fused scheduler updates)."""

    def __init__(self, model, scheduler, labels, num_inference_steps, guidance_scale=3.0, eta=0.0,
                 adapter=None, context=None, warmup: int = 1):
        device = labels.device
        shape = (len(labels), model.in_channels, model.sample_size, model.sample_size)
        self.static_x = torch.zeros(shape, device=device, dtype=next(model.parameters()).dtype)
        rest = (labels, guidance_scale, None, eta, False, adapter, context)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (allocator, kernels' first launch) off the graph
            for _ in range(warmup):
                scheduler.set_timesteps(num_inference_steps, device=device)
                _loop(model, scheduler, self.static_x, *rest)
        torch.cuda.current_stream(device).wait_stream(side)
        scheduler.set_timesteps(num_inference_steps, device=device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = _loop(model, scheduler, self.static_x, *rest)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] → [0, 1], (N, H, W) for one channel."""
    img = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    return img[:, 0] if img.shape[1] == 1 else img


def save_grid(images: torch.Tensor, path: str, nrow: int = 10, scale: int = 8) -> None:
    """images (N, H, W) in [0, 1] → a PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    imgs = images.numpy()
    n, h, w = imgs.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.ones((rows * (h + 1) + 1, ncol * (w + 1) + 1), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = imgs[i]
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def timed(fn, *args, **kwargs):
    """(result, seconds), synchronizing CUDA around the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


__all__ = ["sample", "make_scheduler", "GraphedSampler", "SAMPLERS", "to_images", "save_grid", "timed"]


def pick_threads(threads: int = 0) -> int:
    """Set torch's CPU threads: `threads` > 0 as given; 0 = torch's default unless the machine
    is oversubscribed (load average ≥ cores), then 1 (OpenMP barriers with a descheduled
    thread stall: on a busy 2-core box 5 digit-model steps took 8 s on 2 threads, 0.2 s on 1)."""
    import os

    if threads <= 0:
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores
        threads = 1 if busy else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------ measurements
def bench_scheduler_step(shape=(2, 4, 64, 64), steps: int = 50, repeats: int = 21, threads: int = 1) -> dict:
    """Median µs per DDIM step (whole 50-step schedules, fp32, CPU): flashdiff's fused
    DDIMScheduler vs diffusers' DDIMScheduler, same inputs, same process, runs interleaved so
    a change of machine load hits both."""
    import diffusers

    torch.set_num_threads(threads)
    x, m = torch.randn(shape), torch.randn(shape)
    scheds = {"diffusers": diffusers.DDIMScheduler(), "flashdiff": DDIMScheduler()}
    runs = {name: [] for name in scheds}
    for name, sched in scheds.items():
        sched.set_timesteps(steps)
        for t in list(sched.timesteps)[:10]:  # warm-up
            sched.step(m, t, x)
    for _ in range(repeats):
        for name, sched in scheds.items():
            ts = list(sched.timesteps)
            t0 = time.perf_counter()
            for t in ts:
                sched.step(m, t, x)
            runs[name].append((time.perf_counter() - t0) / len(ts) * 1e6)
    out = {name: float(np.median(r)) for name, r in runs.items()}
    out["speedup"] = out["diffusers"] / out["flashdiff"]
    return out


def bench_unet_sampling(model_name: str = "digits-unet", per_label: int = 10, steps: int = 50,
                        guidance: float = 3.0, repeats: int = 2, threads: int = 1) -> dict:
    """Seconds to sample 10×per_label digits (DDIM, CFG), backend auto vs reference,
    interleaved repeats, best of each."""
    from .models import load_pretrained

    torch.set_num_threads(threads)
    labels = torch.arange(10).repeat_interleave(per_label)
    best = {"auto": math.inf, "reference": math.inf}
    for _ in range(repeats):
        for backend in best:
            be = None if backend == "auto" else backend
            model = load_pretrained(model_name, backend=be)
            _, sec = timed(sample, model, make_scheduler("ddim", be, model), labels, steps, guidance,
                           generator=torch.Generator().manual_seed(0), progress=False)
            best[backend] = min(best[backend], sec)
    best["speedup"] = best["reference"] / best["auto"]
    return best


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m flashdiff.sampling", description="sampling measurements")
    p.add_argument("what", choices=["bench-step", "bench-unet"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="digits-unet")
    args = p.parse_args(argv)
    if args.what == "bench-step":
        r = bench_scheduler_step(threads=args.threads)
        print(f"DDIM step [2, 4, 64, 64] fp32: diffusers {r['diffusers']:.1f} us, flashdiff {r['flashdiff']:.1f} us "
              f"-> {r['speedup']:.2f}x")
    else:
        r = bench_unet_sampling(args.model, threads=args.threads)
        print(f"{args.model}, 100 digits, 50 DDIM steps, CFG 3: auto {r['auto']:.2f}s, reference "
              f"{r['reference']:.2f}s -> {r['speedup']:.2f}x")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
