"""End-to-end sampling: 50-step DDIM + CFG with a compact flashdiff model, eager reference vs
fused vs fused + CUDA graph vs torch.compile of the reference (images/s)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import presets as P
from .cases import ddim_cfg_eager
from .core import DTYPE_NAME, Case, Row, Skip, _Compiler, _first_line

def load_model(name: str, device: str, dtype: torch.dtype):
    """A compact model of flashdiff.models by config name (a key of DiT_models or UNet_models;
    "UNet-S" is built class-conditional on 32×32×4 latents like the DiTs), randomly initialised
    (timing does not depend on the weights), in eval mode. Raises Skip when it is missing."""
    try:
        from ..models import DiT_models, UNet_models
    except ImportError as err:
        raise Skip(f"flashdiff.models is not available ({err})") from None
    if name in DiT_models:
        model = DiT_models[name]()
    elif name == "UNet-S":
        model = UNet_models[name](in_channels=4, sample_size=32, num_classes=1000)
    elif name in UNet_models:
        model = UNet_models[name]()
    else:
        raise Skip(f"no model {name!r} in flashdiff.models (DiT_models: {sorted(DiT_models)}, "
                   f"UNet_models: {sorted(UNet_models)})")
    return model.to(device=device, dtype=dtype).eval()


def set_model_backend(model: torch.nn.Module, backend: Optional[str]) -> None:
    """Switch a flashdiff model between the fused ops (None = auto) and the reference."""
    from ..nn import set_backend

    set_backend(model, backend)


def _model_call(model, x, t, y):
    out = model(x, t, y)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[:, : x.shape[1]]  # learned-sigma models output 2·C channels: keep eps


def _ddim_schedule(steps: int, train_steps: int = 1000):
    """DDIM timesteps (diffusers' 'leading' spacing) and ᾱ_t, ᾱ_prev from a linear β schedule,
    in float64, on the host."""
    betas = torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    stride = train_steps // steps
    ts = torch.arange(0, steps, dtype=torch.long).flip(0) * stride
    a_t = ac[ts]
    a_prev = torch.where(ts - stride >= 0, ac[(ts - stride).clamp(min=0)], ac[0])
    return ts, a_t, a_prev


def e2e_cases(preset: str, batch: int, s: P.SamplingCase, dtype: torch.dtype, device: str,
              backends: Sequence[str], compiler: _Compiler) -> Case:
    import flashdiff

    def setup():
        model = load_model(s.model, device, dtype)
        C, size = model.config.in_channels, model.sample_size
        null = model.num_classes  # label num_classes is the null (unconditional) class
        g = torch.Generator(device=device).manual_seed(0)
        ts, a_t, a_prev = _ddim_schedule(s.steps)
        y = torch.randint(0, null, (s.batch,), device=device, generator=g)
        return {
            "model": model,
            "x_T": torch.randn(s.batch, C, size, size, device=device, generator=g).to(dtype),
            "y": torch.cat([y, torch.full_like(y, null)]),  # conditional half, unconditional half
            "t": ts.to(device),
            "a": list(zip(a_t.tolist(), a_prev.tolist())),
            "coefs": flashdiff.ddim_coefs(a_t.to(device), a_prev.to(device), guidance_scale=s.guidance),
        }

    def sample(inp, forward, fused: bool, x=None):
        x = inp["x_T"] if x is None else x
        y, tt, coefs = inp["y"], inp["t"], inp["coefs"]
        for i in range(s.steps):
            t = tt[i].expand(2 * s.batch)
            out = forward(torch.cat([x, x]), t, y)
            cond, uncond = out.chunk(2)
            if fused:
                x = flashdiff.scheduler_update(x, cond, coefs[i], uncond)
            else:
                x = ddim_cfg_eager(x, cond, uncond, *inp["a"][i], s.guidance)
        return x

    def with_backend(inp, backend):
        set_model_backend(inp["model"], backend)
        return lambda x, t, y: _model_call(inp["model"], x, t, y)

    def make_reference(inp):
        fwd = with_backend(inp, "reference")
        return lambda: sample(inp, fwd, fused=False)

    def make_fused(inp):
        if device == "cpu" and "cpu" not in backends or device == "cuda" and not backends:
            raise Skip("no fused backend available here")
        fwd = with_backend(inp, None)
        return lambda: sample(inp, fwd, fused=True)

    def make_graph(inp):
        if device != "cuda":
            raise Skip("CUDA graphs need a GPU")
        fwd = with_backend(inp, None)
        static_x = inp["x_T"].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # autotune and allocate outside the capture
                sample(inp, fwd, True, static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                inp["graph_out"] = sample(inp, fwd, True, static_x)
        except Exception as err:  # noqa: BLE001 - capture failures are results too
            raise Skip(f"CUDA graph capture failed: {_first_line(err)}")
        return graph.replay

    def make_compiled(inp):
        set_model_backend(inp["model"], "reference")
        model = inp["model"]
        fwd = lambda x, t, y: _model_call(model, x, t, y)  # noqa: E731
        x2, t2 = torch.cat([inp["x_T"]] * 2), inp["t"][0].expand(2 * s.batch)
        compiled = compiler.compile(f"e2e {s}", fwd, lambda f: (f(x2, t2, inp["y"]), f(x2, t2, inp["y"])))
        return lambda: sample(inp, compiled, fused=False)

    rows = [Row("fused", "flashdiff", make_fused),
            Row("fused + CUDA graph", "flashdiff", make_graph),
            Row("eager reference", "baseline", make_reference)]
    if compiler.enabled:
        rows.append(Row("torch.compile(ref)", "baseline", make_compiled))
    return Case("e2e", preset, batch, s.label or s.model, str(s), DTYPE_NAME[dtype], "images/s",
                s.batch, setup, rows, reps=2 if device == "cpu" else 5)
