"""The sampling loop: model + scheduler for N steps, classifier-free guidance fused into the
scheduler step, optionally captured as one CUDA graph and replayed, a progress bar when
interactive.

    model = flashdiff.models.load_pretrained("digits-unet")
    images = flashdiff.sampling.sample(model, DDIMScheduler(), labels=torch.arange(10),
                                       num_inference_steps=50, guidance_scale=3.0,
                                       generator=torch.Generator().manual_seed(0))

The cond and uncond halves run as one batch of 2N through the model; the scheduler step takes
both outputs and does guidance + update in one kernel (no host sync inside the loop).

Capture safety (tests/test_capture_safety.py): once the scheduler's coefficient tables exist,
a pass of the loop copies nothing from the host, reads no device value and builds no table,
so it can be captured as a CUDA graph. The one exception is noise a stochastic sampler draws
from a CPU `generator` for a device sample: diffusers draws it on the CPU, so each noisy step
copies it over (a host->device copy per step, eager only). The graphed loop never does that:
its noise comes from the device's default generator.
"""
from __future__ import annotations

import functools
import itertools
import math
import sys
import time
import weakref
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
        s = sigmas.to("cpu", torch.float64).numpy()[:-1]  # diffusers keeps flow sigmas on the device
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
    """The N steps from x on a scheduler whose timesteps are set (used eagerly and inside a
    CUDA graph capture). `generator` draws the noise of stochastic samplers (None = the
    device's default generator; a CPU one for a device sample copies each step's noise)."""
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
        # _prev_sample: step(...).prev_sample without writing the pred_original_sample nothing reads
        if cfg:
            cond, uncond = out.chunk(2)
            x = scheduler._prev_sample(cond, t, x, model_output_uncond=uncond, guidance_scale=guidance_scale,
                                       **extra)
        else:
            x = scheduler._prev_sample(out, t, x, **extra)
    return x


@torch.no_grad()
def sample(model, scheduler, labels, num_inference_steps: int = 50, guidance_scale: Optional[float] = 3.0,
           generator: Optional[torch.Generator] = None, device=None, eta: float = 0.0,
           cuda_graph: bool = False, progress: Optional[bool] = None, context=None,
           shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Generate one image per label: (N, C, H, W) in the model's data range.

    labels: class ids (N,) (tensor or list). guidance_scale None or 1 = no guidance.
    generator: draws the initial noise (and the sampler's noise) exactly as diffusers would.
        A CPU generator with a CUDA sample makes each noisy step (DDPM, DDIM with eta > 0,
        stochastic flow) draw on the CPU and copy to the device, as diffusers does.
    cuda_graph: capture the whole loop in one CUDA graph, then replay it (CUDA only). The graph
        is cached per (model, scheduler settings, shape, steps, guidance, eta): a later call
        with the same settings only replays it (see GraphedSampler; clear_cuda_graphs frees
        them). `generator` then seeds the initial noise only: the sampler's noise inside the
        graph comes from the default CUDA generator.
    shape: (C, H, W) of one sample; None = (model.in_channels, model.sample_size, model.sample_size).
    progress: a tqdm bar (None = when stderr is a terminal).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if shape is None:
        shape = (model.in_channels, model.sample_size, model.sample_size)
    shape = tuple(shape)
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
    if device.type not in _GRAPH_DEVICE_TYPES:
        raise ValueError("cuda_graph=True needs a CUDA device")
    if generator is not None and generator.device.type == "cuda":
        raise ValueError("inside a CUDA graph the sampler's noise comes from the default CUDA generator; "
                         "pass a CPU generator (it seeds the initial noise) or None")
    key = (scheduler._schedule_key(), getattr(model, "prediction_type", None), tuple(x.shape), x.dtype, x.device,
           num_inference_steps, guidance_scale, float(eta),
           None if context is None else (tuple(context.shape), context.dtype),
           # weights moved or reloaded into new storage: the old graph would read the old memory
           tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))
    graphs = _GRAPHS.setdefault(model, {})
    graph = graphs.pop(key, None)  # re-inserted below: the dict stays in least-recently-used order
    if graph is None:
        while len(graphs) >= GRAPHS_PER_MODEL:
            graphs.pop(next(iter(graphs)))
        graph = GraphedSampler(model, scheduler, labels, num_inference_steps, guidance_scale, eta, adapter,
                               context, shape=shape)
    graphs[key] = graph
    return graph(x, labels, context)


# sample(cuda_graph=True)'s captured loops: model -> {settings: GraphedSampler}, least recently
# used first. Weak keys: a model that is dropped frees its graphs and their memory pools.
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
GRAPHS_PER_MODEL = 4  # each graph holds its own memory pool (activations of a whole loop)
_GRAPH_DEVICE_TYPES = ("cuda",)  # tests/test_capture_safety.py adds a stand-in device


def clear_cuda_graphs(model=None) -> None:
    """Drop sample(cuda_graph=True)'s cached graphs (of `model`, or all), freeing their memory."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(model, None)


class GraphedSampler:
    """The whole sampling loop captured once as a CUDA graph; each call copies the initial
    noise (and labels, context) in and replays it: one launch for N steps of model + fused
    scheduler updates.

    Capture order: set_timesteps, then `warmup` eager passes on a side stream (they load the
    kernels and build every coefficient table on the device), then scheduler.rewind() (the step
    counter back to 0, the tables kept), then the capture. Calling set_timesteps instead would
    drop the tables and the first captured step would build one on the host and copy it over,
    which a capture does not allow. Noise inside the graph comes from the default CUDA
    generator (each replay draws fresh noise). The graph keeps the captured scheduler tensors
    alive, so later use of `scheduler` does not change it; it replays the model as captured.
    """

    @torch.no_grad()
    def __init__(self, model, scheduler, labels, num_inference_steps, guidance_scale=3.0, eta=0.0,
                 adapter=None, context=None, warmup: int = 1, shape: Optional[Sequence[int]] = None):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (it builds the coefficient tables before capture), got {warmup}")
        device = labels.device
        if shape is None:
            shape = (model.in_channels, model.sample_size, model.sample_size)
        self.static_x = torch.zeros((len(labels), *shape), device=device, dtype=next(model.parameters()).dtype)
        # the graph reads labels and context from these buffers: a call may bring new ones
        self.static_labels = labels.clone()
        self.static_context = None if context is None else context.clone()
        scheduler.set_timesteps(num_inference_steps, device=device)
        run = functools.partial(_loop, model, scheduler, self.static_x, self.static_labels, guidance_scale,
                                None, eta, False, adapter, self.static_context)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (allocator, kernels' first launch, tables) off the graph
            for _ in range(warmup):
                scheduler.rewind()
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        scheduler.rewind()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = run()
        # the graph reads these tensors' memory; a later set_timesteps on the scheduler drops its references
        self._captured_schedule = (scheduler.timesteps, dict(scheduler._tables))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, labels=None, context=None) -> torch.Tensor:
        """Sample from initial noise x (labels, context: None = those of the capture)."""
        self.static_x.copy_(x)
        if labels is not None:
            self.static_labels.copy_(torch.as_tensor(labels, dtype=torch.long, device=self.static_labels.device))
        if context is not None:
            if self.static_context is None:
                raise ValueError("this graph was captured without context")
            self.static_context.copy_(context)
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


__all__ = ["sample", "make_scheduler", "GraphedSampler", "clear_cuda_graphs", "SAMPLERS", "to_images",
           "save_grid", "timed"]


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


if __name__ == "__main__":  # the measurements live in flashdiff.bench.sampling_bench now
    from .bench.sampling_bench import main

    sys.exit(main())
