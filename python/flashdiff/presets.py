"""Benchmark shape presets named after real diffusion models (one place for the suite and the CLI).

    from flashdiff import presets
    presets.get("sd15").attention(batch=8)   # [AttentionShape(...), ...] at batch 8
    presets.names(device="cuda")              # ['sd15', 'sdxl', 'dit-xl-256', ...]

Each preset lists, per op family, the shapes that model runs at one batch size; GPU presets are
benchmarked at batch 1 and 8 (`Preset.batches`). Shapes are per call as the model issues them
at that batch (classifier-free guidance would double the network's batch; the sampler step
sees the un-doubled latents and the two model outputs).

Where the numbers come from:
  sd15        SD 1.5 U-Net at 512 px: 64×64×4 latents; channels 320/640/1280 at 64²/32²/16²,
              8 heads (head_dim 40/80/160), cross-attention to 77 CLIP tokens; GroupNorm(32)+SiLU.
  sdxl        SDXL U-Net at 1024 px: 128×128×4 latents; attention at 64² (640 ch, 10 heads) and
              32² (1280 ch, 20 heads), head_dim 64, cross-attention to 77 tokens.
  dit-xl-256  DiT-XL/2 at 256 px: 32×32×4 latents, patch 2 → 256 tokens, 16 heads of 72;
              adaLN LayerNorm [B, 256, 1152] (and as the old group-norm lowering, [B·256, 1152, 1]).
  dit-xl-512  DiT-XL/2 at 512 px: 64×64×4 latents → 1024 tokens.
  flux-1024   FLUX.1 at 1024 px: 24 heads of 128 over 4096 image + 512 text tokens = 4608;
              16-channel 128×128 latents, flow-matching Euler step without CFG (guidance-distilled).
              Norms: adaLN LayerNorm of the joint stream [B, 4608, 3072]; RMSNorm on q/k
              [B, 24, 4608, 128].
  sd3-1024    SD3 medium at 1024 px: D 1536 = 24 heads of 64; 4096 image tokens (+ 333 text:
              77 CLIP + 256 T5, 4429 joint). Norms: adaLN LayerNorm [B, 4096, 1536]; RMSNorm on
              q/k [B, 24, 4429, 64] (qk_norm="rms_norm", SD3.5).
  e2e         50-step DDIM+CFG sampling with the compact DiT-S/2, DiT-B/2 and UNet-S of
              flashdiff.models at 32×32×4 latents, batch 1 and 8.
  e2e-gpu     10-step DDIM+CFG sampling of the real architectures, random weights: flashdiff's
              DiT-XL/2 at 256 px (32×32×4 latents, 1000 classes + the null class) and diffusers'
              UNet2DConditionModel with SD 1.5's config at 512 px (64×64×4 latents, 77×768 text
              context), batch 1 and 8. ~150 s on an H200 with its torch.compile rows (see _e2e_gpu).
  cpu         the CPU bars of the foundation issue (norm [2,320,64,64], [1,640,32,32],
              [2,1280,16,16]; DDIM+CFG on [2,4,64,64] and [8,4,128,128]), small attention, and
              50-step sampling of the 8×8 digit models (DiT-S/2 takes seconds per step there).
  tiny        seconds-long smoke test (tests, --quick sanity checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


# ------------------------------------------------------------------ shape records
@dataclass(frozen=True)
class AttentionShape:
    """q [B, H, Sq, D], k/v [B, H, Skv, D]; `masked_keys` > 0: a key-padding mask [B, 1, 1, Skv]
    masking that many trailing keys of every sample (a padded prompt)."""
    B: int
    H: int
    Sq: int
    Skv: int
    D: int
    label: str = ""
    masked_keys: int = 0

    @property
    def flops(self) -> int:
        """Forward FLOPs: two matmuls, 2·Sq·Skv·D each, per (batch, head)."""
        return 4 * self.B * self.H * self.Sq * self.Skv * self.D

    def __str__(self) -> str:
        kv = f"{self.Skv}" if self.Skv == self.Sq else f"{self.Skv} (cross)"
        mask = f" mask-{self.masked_keys}" if self.masked_keys else ""
        return f"B{self.B} H{self.H} S{self.Sq}/{kv} D{self.D}{mask}"


@dataclass(frozen=True)
class NormShape:
    """x [N, C, *spatial]; GroupNorm(groups) + activation, optional per-sample scale/shift."""
    shape: Tuple[int, ...]
    groups: int = 32
    activation: Optional[str] = "silu"
    modulate: bool = False
    label: str = ""
    channels_last: bool = False  # x stored [N, *spatial, C] (what channels_last convnets hand over)

    def __str__(self) -> str:
        return (f"{list(self.shape)} G{self.groups}" + (" +scale/shift" if self.modulate else "")
                + (" channels_last" if self.channels_last else ""))


@dataclass(frozen=True)
class StepShape:
    """Latents of one sampler step. family: 'ddim' (epsilon, eta 0) or 'flow' (Euler, velocity)."""
    shape: Tuple[int, ...]
    family: str = "ddim"
    cfg: bool = True
    label: str = ""

    def __str__(self) -> str:
        return f"{list(self.shape)} {self.family}" + ("+cfg" if self.cfg else "")


@dataclass(frozen=True)
class RowNormShape:
    """A norm over the last dim of x `shape`: layer_norm (adaLN: no affine, per-sample
    scale/shift [shape[0], D] when `modulate`) or rms_norm (q/k norm: a [D] weight)."""
    shape: Tuple[int, ...]
    modulate: bool = False
    label: str = ""

    def __str__(self) -> str:
        return f"{list(self.shape)}" + (" +scale/shift" if self.modulate else "")


E2E_ROWS = ("torch eager", "torch.compile", "flashdiff patch", "flashdiff patch+graph")


@dataclass(frozen=True)
class SamplingCase:
    """End-to-end sampling: `steps` DDIM steps with classifier-free guidance of a randomly
    initialised model at its own latent size. `model`: a key of flashdiff.models' DiT_models or
    UNet_models, or of bench.e2e.DIFFUSERS_MODELS (a diffusers class and config, e.g.
    "SD1.5-UNet"); `overrides` change its config (tiny test models). `rows`: the rows of
    E2E_ROWS to time (empty: all). `phase`: presets.expand lists the cases of a later phase
    after every batch's cases of an earlier one (the long torch.compile rows go last, so a time
    budget skips them first). `compile_mode`: the torch.compile mode of this case (None: the run's)."""
    model: str
    batch: int
    steps: int = 50
    guidance: float = 4.0
    label: str = ""
    overrides: Tuple[Tuple[str, Any], ...] = ()
    rows: Tuple[str, ...] = ()
    phase: int = 0
    compile_mode: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.model} b{self.batch} {self.steps} steps"


# ------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    device: str                      # "cuda", "cpu" or "any": where it is run by default
    batches: Tuple[int, ...]
    _attention: Callable[[int], List[AttentionShape]] = field(default=lambda b: [], repr=False)
    _group_norm: Callable[[int], List[NormShape]] = field(default=lambda b: [], repr=False)
    _scheduler: Callable[[int], List[StepShape]] = field(default=lambda b: [], repr=False)
    _e2e: Callable[[int], List[SamplingCase]] = field(default=lambda b: [], repr=False)
    _layer_norm: Callable[[int], List[RowNormShape]] = field(default=lambda b: [], repr=False)
    _rms_norm: Callable[[int], List[RowNormShape]] = field(default=lambda b: [], repr=False)

    def attention(self, batch: int) -> List[AttentionShape]:
        return self._attention(batch)

    def group_norm(self, batch: int) -> List[NormShape]:
        return self._group_norm(batch)

    def scheduler(self, batch: int) -> List[StepShape]:
        return self._scheduler(batch)

    def e2e(self, batch: int) -> List[SamplingCase]:
        return self._e2e(batch)

    def layer_norm(self, batch: int) -> List[RowNormShape]:
        return self._layer_norm(batch)

    def rms_norm(self, batch: int) -> List[RowNormShape]:
        return self._rms_norm(batch)

    def cases(self, op: str, batch: int) -> list:
        return {"attention": self.attention, "group_norm": self.group_norm, "layer_norm": self.layer_norm,
                "rms_norm": self.rms_norm, "scheduler": self.scheduler, "e2e": self.e2e}[op](batch)


def _sd15_attention(b):
    out = []
    for s, d in ((4096, 40), (1024, 80), (256, 160)):
        out.append(AttentionShape(b, 8, s, s, d, f"sd15 self {int(s ** .5)}² hd{d}"))
        out.append(AttentionShape(b, 8, s, 77, d, f"sd15 cross hd{d}"))
    # a 57-token prompt padded to 77 with its padding masked out (diffusers passes the mask)
    out.append(AttentionShape(b, 8, 4096, 77, 40, "sd15 cross hd40 padded prompt", masked_keys=20))
    return out


def _sdxl_attention(b):
    return [AttentionShape(b, 10, 4096, 4096, 64, "sdxl self 64²"),
            AttentionShape(b, 10, 4096, 77, 64, "sdxl cross 64²"),
            AttentionShape(b, 20, 1024, 1024, 64, "sdxl self 32²"),
            AttentionShape(b, 20, 1024, 77, 64, "sdxl cross 32²"),
            AttentionShape(b, 10, 4096, 77, 64, "sdxl cross 64² padded prompt", masked_keys=20)]


def _cpu_attention(b):
    # Small enough for a 2-core CPU: SD-like head dims at 32×32 tokens, DiT-XL/2 at 256 px.
    return [AttentionShape(1, 8, 1024, 1024, 40, "sd15-like self 32² hd40"),
            AttentionShape(1, 8, 1024, 77, 80, "sd15-like cross hd80"),
            AttentionShape(1, 16, 256, 256, 72, "dit-xl-256 b1")]


PRESETS: Dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


_add(Preset(
    "sd15", "Stable Diffusion 1.5 U-Net, 512 px (64×64×4 latents)", "cuda", (1, 8),
    _attention=_sd15_attention,
    _group_norm=lambda b: [NormShape((b, 320, 64, 64), label="sd15 320@64²"),
                           NormShape((b, 640, 32, 32), label="sd15 640@32²"),
                           NormShape((b, 1280, 16, 16), label="sd15 1280@16²"),
                           NormShape((b, 1280, 8, 8), label="sd15 1280@8²"),
                           NormShape((b, 320, 64, 64), modulate=True, label="sd15 320@64² adagn")],
    _scheduler=lambda b: [StepShape((b, 4, 64, 64), "ddim", True, "sd15 ddim+cfg")],
))
_add(Preset(
    "sdxl", "SDXL U-Net, 1024 px (128×128×4 latents)", "cuda", (1, 8),
    _attention=_sdxl_attention,
    _group_norm=lambda b: [NormShape((b, 320, 128, 128), label="sdxl 320@128²"),
                           NormShape((b, 640, 64, 64), label="sdxl 640@64²"),
                           NormShape((b, 1280, 32, 32), label="sdxl 1280@32²")],
    _scheduler=lambda b: [StepShape((b, 4, 128, 128), "ddim", True, "sdxl ddim+cfg")],
))
_add(Preset(
    "dit-xl-256", "DiT-XL/2 at 256 px (32×32×4 latents, 256 tokens, 16 heads × 72)", "cuda", (1, 8),
    _attention=lambda b: [AttentionShape(b, 16, 256, 256, 72, "dit-xl/2 256px")],
    # adaLN as the compact DiT ran it before flashdiff.layer_norm: LayerNorm lowered to group norm
    # over [N·T, D, 1] (kept: the shipped H200 table's group norm classes come from these rows)
    _group_norm=lambda b: [NormShape((b * 256, 1152, 1), groups=1, activation=None, modulate=True,
                                     label="dit-xl/2 adaLN 256px")],
    _scheduler=lambda b: [StepShape((b, 4, 32, 32), "ddim", True, "dit-xl-256 ddim+cfg")],
    _layer_norm=lambda b: [RowNormShape((b, 256, 1152), True, "dit-xl/2 adaLN 256px")],
))
_add(Preset(
    "dit-xl-512", "DiT-XL/2 at 512 px (64×64×4 latents, 1024 tokens, 16 heads × 72)", "cuda", (1, 8),
    _attention=lambda b: [AttentionShape(b, 16, 1024, 1024, 72, "dit-xl/2 512px")],
    _group_norm=lambda b: [NormShape((b * 1024, 1152, 1), groups=1, activation=None, modulate=True,
                                     label="dit-xl/2 adaLN 512px")],
    _scheduler=lambda b: [StepShape((b, 4, 64, 64), "ddim", True, "dit-xl-512 ddim+cfg")],
    _layer_norm=lambda b: [RowNormShape((b, 1024, 1152), True, "dit-xl/2 adaLN 512px")],
))
_add(Preset(
    "flux-1024", "FLUX.1 at 1024 px (4096 image + 512 text tokens, 24 heads × 128)", "cuda", (1, 8),
    _attention=lambda b: [AttentionShape(b, 24, 4608, 4608, 128, "flux joint 1024px"),
                          # T5 text padded to 512: a 128-token prompt masks 384 keys
                          AttentionShape(b, 24, 4608, 4608, 128, "flux joint 1024px padded prompt",
                                         masked_keys=384)],
    _scheduler=lambda b: [StepShape((b, 16, 128, 128), "flow", False, "flux flow-euler")],
    _layer_norm=lambda b: [RowNormShape((b, 4608, 3072), True, "flux adaLN joint 1024px")],
    _rms_norm=lambda b: [RowNormShape((b, 24, 4608, 128), False, "flux q/k norm 1024px")],
))
_add(Preset(
    "sd3-1024", "SD3 medium at 1024 px (D 1536, 24 heads × 64, 4096 image + 333 text tokens)", "cuda", (1, 8),
    _attention=lambda b: [AttentionShape(b, 24, 4429, 4429, 64, "sd3 joint 1024px")],
    _layer_norm=lambda b: [RowNormShape((b, 4096, 1536), True, "sd3 adaLN 1024px")],
    _rms_norm=lambda b: [RowNormShape((b, 24, 4429, 64), False, "sd3.5 q/k norm 1024px")],
))
_add(Preset(
    "e2e", "50-step DDIM+CFG sampling, compact DiT-S/2, DiT-B/2 and UNet-S (32×32×4 latents)", "cuda", (8, 1),
    # Batch 8 first (the bar: DiT-S/2 at batch 8); batch 1 for DiT-S/2 only.
    _e2e=lambda b: ([SamplingCase("DiT-S/2", b), SamplingCase("DiT-B/2", b), SamplingCase("UNet-S", b)]
                    if b > 1 else [SamplingCase("DiT-S/2", b)]),
))


def _e2e_gpu(b: int) -> List[SamplingCase]:
    """Phase 0: the eager, patch and patch+graph rows of both models (seconds each). Then the
    torch.compile rows, mode "default" (max-autotune of a whole model takes many minutes):
    batch 8 first (phase 1: a compiled model is the strongest baseline at throughput), then
    batch 1 (phase 2); the SD 1.5 U-Net first (diffusers + torch.compile is the common setup).
    Expected on an H200: ~35 s for phase 0 (models built on the GPU, ~7 sampling runs per row);
    a compile takes ~40-70 s on 16 cores, and e2e starts one only while the compile budget
    has room for another as long as the longest so far: with --compile-budget 75, one (two
    when the first took under ~37 s). ~110-150 s in all, ceilings and imports included."""
    dit = SamplingCase("DiT-XL/2", b, steps=10, guidance=4.0, label="DiT-XL/2 256px")
    unet = SamplingCase("SD1.5-UNet", b, steps=10, guidance=7.5, label="SD1.5 UNet 512px")
    # Flux-shaped transformer (3 of FLUX.1's 57 blocks at full width, 1024 px; guidance-distilled:
    # no CFG batch, flow-matching Euler); its eager rows run after the two above (phase 0 too).
    flux = SamplingCase("Flux-3blocks", b, steps=10, guidance=1.0, label="Flux 3 blocks 1024px")
    eager_rows = tuple(r for r in E2E_ROWS if r != "torch.compile")
    return ([replace(c, rows=eager_rows) for c in (dit, unet, flux)] +
            [replace(c, rows=("torch.compile",), phase=1 if b > 1 else 2, compile_mode="default")
             for c in (unet, dit)])


_add(Preset(
    "e2e-gpu", "10-step sampling: DiT-XL/2 256 px and SD 1.5 U-Net 512 px (DDIM+CFG), a Flux-shaped "
    "transformer 1024 px (flow Euler); random weights", "cuda",
    (1, 8), _e2e=_e2e_gpu,
))
_add(Preset(
    "cpu", "the foundation issue's CPU bars at SD shapes, small attention, digit-model sampling", "cpu", (1,),
    _attention=lambda b: _cpu_attention(b),
    _group_norm=lambda b: [NormShape((2, 320, 64, 64), label="sd15 320@64² b2"),
                           NormShape((1, 640, 32, 32), label="sd15 640@32² b1"),
                           NormShape((2, 1280, 16, 16), label="sd15 1280@16² b2"),
                           NormShape((2, 320, 64, 64), label="sd15 320@64² b2 NHWC", channels_last=True)],
    _scheduler=lambda b: [StepShape((2, 4, 64, 64), "ddim", True, "sd15 latents b2"),
                          StepShape((8, 4, 128, 128), "ddim", True, "sdxl latents b8")],
    # DiT-S/2 takes seconds per step on 2 cores: the CPU samples the digit models (8×8×1),
    # ten images (one per label), as `flashdiff demo` does.
    _e2e=lambda b: [SamplingCase("DiT-digits", 10), SamplingCase("UNet-digits", 10)],
    # DiT-XL/2's adaLN row width at 256 tokens (one sample), a small SD3-width one, and q/k
    # norm rows at Flux's head dim: milliseconds each on 2 cores.
    _layer_norm=lambda b: [RowNormShape((1, 256, 1152), True, "dit-xl/2 adaLN b1"),
                           RowNormShape((2, 256, 1536), True, "sd3-width adaLN b2")],
    _rms_norm=lambda b: [RowNormShape((1, 24, 256, 128), False, "flux-width q/k norm 256 tok")],
))
_add(Preset(
    "tiny", "seconds-long smoke test", "any", (1,),
    _attention=lambda b: [AttentionShape(1, 2, 64, 64, 32, "tiny self"),
                          AttentionShape(1, 2, 64, 7, 40, "tiny cross")],
    _group_norm=lambda b: [NormShape((1, 32, 8, 8), groups=8, label="tiny"),
                           NormShape((2, 16, 5, 7), groups=4, modulate=True, label="tiny adagn")],
    _scheduler=lambda b: [StepShape((2, 4, 8, 8), "ddim", True, "tiny ddim+cfg"),
                          StepShape((1, 16, 8, 8), "flow", False, "tiny flow")],
    _e2e=lambda b: [SamplingCase("DiT-digits", 2, steps=3, label="tiny DiT-digits")],
    _layer_norm=lambda b: [RowNormShape((2, 16, 64), True, "tiny adaLN")],
    _rms_norm=lambda b: [RowNormShape((1, 2, 16, 32), False, "tiny q/k")],
))

MODEL_PRESETS = ("sd15", "sdxl", "dit-xl-256", "dit-xl-512", "flux-1024", "sd3-1024")
OPS = ("attention", "group_norm", "layer_norm", "rms_norm", "scheduler", "e2e")
# `flashdiff bench --e2e`: the end-to-end preset of each device.
E2E_PRESET = {"cuda": "e2e-gpu", "cpu": "cpu"}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def names(device: Optional[str] = None) -> List[str]:
    """Preset names run by default on `device` ("cpu" or "cuda"); all of them for None."""
    if device is None:
        return list(PRESETS)
    if device == "cuda":
        return list(MODEL_PRESETS) + ["e2e"]
    return ["cpu"]


def expand(preset_names: Sequence[str], op: str, batches: Optional[Sequence[int]] = None):
    """[(preset name, batch, shape record)] for one op over the given presets and batches
    (None = each preset's own batches)."""
    out = []
    for name in preset_names:
        p = get(name)
        for b in (batches or p.batches):
            for case in p.cases(op, b):
                out.append((name, b, case))
    # Stable: a later phase (e2e: the torch.compile rows) after every batch of an earlier one.
    return sorted(out, key=lambda item: getattr(item[2], "phase", 0))


def describe() -> str:
    """A listing for `flashdiff bench --list-presets`."""
    lines = []
    for p in PRESETS.values():
        lines.append(f"{p.name:11s} [{p.device}; batch {', '.join(map(str, p.batches))}] {p.description}")
        b = max(p.batches)
        for op in OPS:
            for case in p.cases(op, b):
                lines.append(f"    {op:10s} {case}")
    return "\n".join(lines)
