"""End-to-end sampling: whole DDIM + CFG sampling runs of real architectures with random
weights (timing does not depend on the weights), timed as a total, per step and in images/s,
in the four rows of presets.E2E_ROWS:

    torch eager            the model as its library builds it (diffusers: its SDPA attention
                           processors; flashdiff models: the "torch" backend), the DDIM step in
                           torch ops
    torch.compile          torch.compile of that model's forward (compile time reported apart),
                           the same loop
    flashdiff patch        diffusers: flashdiff.patch(model); flashdiff models: auto dispatch;
                           the step is the fused flashdiff.scheduler_update over a precomputed
                           coefficient table
    flashdiff patch+graph  the patched model with the whole loop captured in one CUDA graph and
                           replayed (CUDA only)

Models: flashdiff.models' DiT_models and UNet_models (class-conditional; the null class is the
unconditional half) and DIFFUSERS_MODELS (SD 1.5's UNet2DConditionModel; random 77-token text
contexts for both halves), built from their configs directly on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from .. import presets as P
from .cases import ddim_cfg_eager
from .core import DTYPE_NAME, Case, Row, Skip, _Compiler, _first_line

# The flashdiff models' "torch eager" row runs this backend: torch's own fastest path (SDPA,
# F.group_norm, ...), what the same model would run without flashdiff.
EAGER_BACKEND = "torch"

# diffusers models by name: (class name, config). SD 1.5's U-Net is diffusers' default
# UNet2DConditionModel but for the text width (768, CLIP ViT-L; the default is 1280).
DIFFUSERS_MODELS = {
    "SD1.5-UNet": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)),
    # FLUX.1-dev's transformer at 1024 px with its real widths (24 heads × 128, T5 text 4096,
    # pooled CLIP 768, distilled guidance) but 1 double-stream + 2 single-stream blocks of its
    # 19 + 38: a whole-model run would not fit a device budget; per-step time scales by block.
    "Flux-3blocks": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
}
CONTEXT_TOKENS = 77  # CLIP's text length: the cross-attention context of the diffusers U-Nets
FLUX_TEXT_TOKENS = 512  # FLUX.1's T5 context
FLUX_LATENT = (128, 128)  # 1024 px / 8: packed 2×2 into 64×64 = 4096 tokens of 64 channels


def eager_backend() -> str:
    """EAGER_BACKEND, or "reference" in a flashdiff that does not have it (yet)."""
    from ..backends import BACKENDS

    return EAGER_BACKEND if EAGER_BACKEND in BACKENDS else "reference"


def load_model(name: str, device: str, dtype: torch.dtype, overrides: Sequence = ()) -> torch.nn.Module:
    """A model by name (a key of flashdiff.models' DiT_models or UNet_models, or of
    DIFFUSERS_MODELS; "UNet-S" is built class-conditional on 32×32×4 latents like the DiTs),
    config changed by `overrides` ((key, value) pairs), randomly initialised on `device`, in
    eval mode. Raises Skip when the model or its library is missing."""
    try:
        from ..models import DiT_models, UNet_models
    except ImportError as err:
        raise Skip(f"flashdiff.models is not available ({err})") from None
    kw = dict(overrides)
    if name in DiT_models:
        build = lambda: DiT_models[name](**kw)  # noqa: E731
    elif name == "UNet-S":
        build = lambda: UNet_models[name](**{"in_channels": 4, "sample_size": 32, "num_classes": 1000, **kw})  # noqa: E731
    elif name in UNet_models:
        build = lambda: UNet_models[name](**kw)  # noqa: E731
    elif name in DIFFUSERS_MODELS:
        try:
            import diffusers
        except ImportError as err:
            raise Skip(f"diffusers is not installed ({err})") from None
        cls_name, config = DIFFUSERS_MODELS[name]
        build = lambda: getattr(diffusers, cls_name)(**{**config, **kw})  # noqa: E731
    else:
        raise Skip(f"no model {name!r} in flashdiff.models (DiT_models: {sorted(DiT_models)}, "
                   f"UNet_models: {sorted(UNet_models)}) or DIFFUSERS_MODELS ({sorted(DIFFUSERS_MODELS)})")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: ~1e9 parameters take a minute on a CPU
        model = build()
    # diffusers' to() warns at every dtype cast, even when no module is to be kept in fp32
    cast = model.to if getattr(model, "_keep_in_fp32_modules", None) else torch.nn.Module.to.__get__(model)
    return cast(dtype=dtype).eval()


def set_model_backend(model: torch.nn.Module, backend: Optional[str]) -> None:
    """Switch a flashdiff model between the fused ops (None = auto) and a named backend."""
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


# ------------------------------------------------------------------ models as the loop drives them
class _Net:
    """A model with its conditioning for the doubled (conditional, unconditional) batch:
    net(x, t) is the noise prediction; use("eager" | "patch") switches between the model as
    its library builds it and the flashdiff form."""

    def __init__(self, module: torch.nn.Module, cond: torch.Tensor, latent):
        self.module, self.cond, self.latent = module, cond, latent  # latent: (C, H, W)


class _FlashdiffNet(_Net):
    """A flashdiff.models model: class labels, the null class for the unconditional half."""

    @classmethod
    def build(cls, module, batch: int, g: torch.Generator):
        null = module.num_classes
        y = torch.randint(0, null, (batch,), device=g.device, generator=g)
        C, size = module.config.in_channels, module.sample_size
        return cls(module, torch.cat([y, torch.full_like(y, null)]), (C, size, size))

    def __call__(self, x, t):
        return _model_call(self.module, x, t, self.cond)

    def use(self, mode: str) -> None:
        set_model_backend(self.module, eager_backend() if mode == "eager" else None)


class _DiffusersNet(_Net):
    """A diffusers U-Net: text contexts of random numbers (an empty prompt's is not special)."""
    patched = False

    @classmethod
    def build(cls, module, batch: int, g: torch.Generator):
        cfg = module.config
        ctx = torch.randn(2 * batch, CONTEXT_TOKENS, cfg.cross_attention_dim, device=g.device, generator=g)
        return cls(module, ctx.to(module.dtype), (cfg.in_channels, cfg.sample_size, cfg.sample_size))

    def __call__(self, x, t):
        return self.module(x, t, encoder_hidden_states=self.cond, return_dict=False)[0]

    def use(self, mode: str) -> None:
        import flashdiff

        if mode == "patch" and not self.patched:
            flashdiff.patch(self.module)
        elif mode == "eager" and self.patched:
            flashdiff.unpatch(self.module)
        self.patched = mode == "patch"


class _FluxNet(_Net):
    """A diffusers Flux transformer, guidance-distilled: no CFG batch; one forward per step on
    packed latents [B, 4096, 64] with T5-sized text [B, 512, 4096] and pooled [B, 768] of
    random numbers; the sampler is flow-matching Euler (`flow = True`)."""
    patched = False
    flow = True
    use = _DiffusersNet.use

    @classmethod
    def build(cls, module, batch: int, g: torch.Generator):
        cfg = module.config
        h, w = (n // 2 for n in FLUX_LATENT)
        dev = g.device
        cond = {
            "encoder_hidden_states": torch.randn(batch, FLUX_TEXT_TOKENS, cfg.joint_attention_dim, device=dev,
                                                 generator=g).to(module.dtype),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, device=dev, generator=g).to(module.dtype),
            "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, device=dev),
            # (0, row, column) per image token, as diffusers' Flux pipeline prepares them
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1, device=dev), torch.arange(h, device=dev).float(),
                                                  torch.arange(w, device=dev).float(), indexing="ij"),
                                   dim=-1).reshape(h * w, 3),
            "guidance": torch.full((batch,), 3.5, device=dev),
        }
        return cls(module, cond, (h * w, cfg.in_channels))

    def __call__(self, x, t):
        return self.module(x, timestep=t.to(x.dtype) / 1000, return_dict=False, **self.cond)[0]


_NETS = {"FluxTransformer2DModel": _FluxNet}


def _flow_schedule(steps: int):
    """Flow-matching Euler: σ from 1 to 0 in `steps` equal steps (float64, host), timesteps σ·1000."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return sigmas[:-1] * 1000, sigmas


def _compile_refusal(compiler: _Compiler) -> Optional[str]:
    """Why an e2e compile is not started now (None: it is). The budget alone stops new
    compiles only once spent, and one more whole-model compile (~a minute) would overrun a
    run's time: one starts only while the budget has room for one as long as the longest so far."""
    if not compiler.enabled:
        return "torch.compile baselines are off (--compile turns them on)"
    done = [t for k, t in compiler.times.items() if k.startswith("e2e ")]
    if compiler.spent_s >= compiler.budget_s or done and compiler.spent_s + max(done) > compiler.budget_s:
        return (f"compile budget of {compiler.budget_s:.0f} s: {compiler.spent_s:.0f} s spent"
                + (f", and an e2e compile took up to {max(done):.0f} s here" if done else ""))
    return None


def _compile(compiler: _Compiler, key: str, fn, warm, mode: Optional[str]):
    """compiler.compile in `mode` (None: the run's); returns the compiled fn and its compile
    time (s)."""
    why = _compile_refusal(compiler)
    if why:
        raise Skip(why)
    saved = compiler.mode
    compiler.mode = mode or saved
    key = f"{key} ({compiler.mode})"
    try:
        return compiler.compile(key, fn, warm), compiler.times[key]
    finally:
        compiler.mode = saved


# ------------------------------------------------------------------ the case
@dataclass
class SamplingRun(Case):
    """An e2e case: each timed call is a whole sampling run of `steps` steps."""
    steps: int = 1
    compile_s: Dict[str, float] = field(default_factory=dict)  # row name -> its compile time

    def record_fields(self, record: dict) -> dict:
        """What a timed record of this case adds: the steps, the time per step (ms) and, for
        the torch.compile row, its compile time (s; not in the timings)."""
        out = {"steps": self.steps, "per_step_ms": record["median_ms"] / self.steps}
        if record["backend"] in self.compile_s:
            out["compile_s"] = self.compile_s[record["backend"]]
        return out


def e2e_cases(preset: str, batch: int, s: P.SamplingCase, dtype: torch.dtype, device: str,
              backends: Sequence[str], compiler: _Compiler) -> SamplingRun:
    import flashdiff

    label = s.label or s.model

    def setup():
        if s.rows == ("torch.compile",):  # a compile-only case: refused before building the model
            why = _compile_refusal(compiler)
            if why:
                raise Skip(why)
        module = load_model(s.model, device, dtype, s.overrides)
        g = torch.Generator(device=device).manual_seed(0)
        kind = (_NETS.get(DIFFUSERS_MODELS[s.model][0], _DiffusersNet) if s.model in DIFFUSERS_MODELS
                else _FlashdiffNet)
        net = kind.build(module, s.batch, g)
        inp = {"net": net, "x_T": torch.randn(s.batch, *net.latent, device=device, generator=g).to(dtype)}
        if getattr(net, "flow", False):
            ts, sigmas = _flow_schedule(s.steps)
            inp.update(t=ts.to(device), sigma=sigmas.tolist(),
                       coefs=flashdiff.flow_euler_coefs(sigmas[:-1].to(device), sigmas[1:].to(device)))
        else:
            ts, a_t, a_prev = _ddim_schedule(s.steps)
            inp.update(t=ts.to(device), a=list(zip(a_t.tolist(), a_prev.tolist())),
                       coefs=flashdiff.ddim_coefs(a_t.to(device), a_prev.to(device), guidance_scale=s.guidance))
        return inp

    def sample(inp, forward, fused: bool, x=None):
        x = inp["x_T"] if x is None else x
        tt, coefs = inp["t"], inp["coefs"]
        if "sigma" in inp:  # flow matching, no CFG batch (guidance-distilled models)
            sig = inp["sigma"]
            for i in range(s.steps):
                v = forward(x, tt[i].expand(s.batch))
                x = flashdiff.scheduler_update(x, v, coefs[i]) if fused else x + (sig[i + 1] - sig[i]) * v
            return x
        for i in range(s.steps):
            out = forward(torch.cat([x, x]), tt[i].expand(2 * s.batch))
            cond, uncond = out.chunk(2)
            if fused:
                x = flashdiff.scheduler_update(x, cond, coefs[i], uncond)
            else:
                x = ddim_cfg_eager(x, cond, uncond, *inp["a"][i], s.guidance)
        return x

    def eager_net(inp):
        inp["net"].use("eager")
        return inp["net"]

    def patched_net(inp):
        if device == "cpu" and "cpu" not in backends or device == "cuda" and not backends:
            raise Skip("no fused backend available here")
        inp["net"].use("patch")
        return inp["net"]

    def make_eager(inp):
        net = eager_net(inp)
        return lambda: sample(inp, net, fused=False)

    def make_compiled(inp):
        net = eager_net(inp)
        n = s.batch if "sigma" in inp else 2 * s.batch  # the CFG batch, where there is one
        x2, t2 = torch.cat([inp["x_T"]] * (n // s.batch)), inp["t"][0].expand(n)
        compiled, case.compile_s["torch.compile"] = _compile(
            compiler, f"e2e {label} b{s.batch} {DTYPE_NAME[dtype]}", lambda x, t: net(x, t),
            lambda f: (f(x2, t2), f(x2, t2)), s.compile_mode)
        return lambda: sample(inp, compiled, fused=False)

    def make_patch(inp):
        net = patched_net(inp)
        return lambda: sample(inp, net, fused=True)

    def make_graph(inp):
        if device != "cuda":
            raise Skip("CUDA graphs need a GPU")
        net = patched_net(inp)
        static_x = inp["x_T"].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # autotune and allocate outside the capture
                sample(inp, net, True, static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                inp["graph_out"] = sample(inp, net, True, static_x)
        except Exception as err:  # noqa: BLE001 - capture failures are results too
            raise Skip(f"CUDA graph capture failed: {_first_line(err)}")
        return graph.replay

    makers = {"torch eager": ("baseline", make_eager), "torch.compile": ("baseline", make_compiled),
              "flashdiff patch": ("flashdiff", make_patch), "flashdiff patch+graph": ("flashdiff", make_graph)}
    unknown = set(s.rows) - set(makers)
    if unknown:
        raise ValueError(f"e2e rows must be among {P.E2E_ROWS}, got {sorted(unknown)}")
    rows = [Row(name, *makers[name]) for name in (s.rows or P.E2E_ROWS)]
    case = SamplingRun("e2e", preset, batch, label, str(s), DTYPE_NAME[dtype], "images/s", s.batch,
                       setup, rows, reps=2 if device == "cpu" else 5, steps=s.steps)
    return case
