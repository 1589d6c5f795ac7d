"""A compact U-Net (ADM / improved-diffusion style) on flashdiff layers: ResBlocks with
GroupNorm+SiLU and AdaGN scale/shift from the timestep+class embedding (the scale/shift go
into the fused group_norm), self-attention and optional cross-attention at chosen
resolutions, class conditioning with a null class for classifier-free guidance.

Shapes: N batch, C channels, H×W resolution, E embedding width, L context tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..nn import Attention, LabelEmbedder, TimestepEmbedder, normalization


# ================================================================== config
@dataclass
class UNetConfig:
    sample_size: int = 32
    in_channels: int = 3
    model_channels: int = 64
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (16,)  # feature-map sizes with attention
    num_heads: int = 4
    num_groups: int = 32
    num_classes: Optional[int] = None
    class_dropout_prob: float = 0.1
    context_dim: Optional[int] = None  # cross-attention at the attention resolutions when set
    dropout: float = 0.0


# ================================================================== blocks
def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """h = conv(GN+SiLU(x)); h = conv(SiLU(GN(h)·(1+scale)+shift)); x + h. The second
    GroupNorm, the AdaGN modulation and the SiLU are one fused op."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int, num_groups: int, dropout: float, backend=None):
        super().__init__()
        self.norm1 = normalization(ch_in, num_groups, "silu", backend)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * ch_out))
        self.norm2 = normalization(ch_out, num_groups, "silu", backend)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.skip = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x, emb):
        h = self.conv1(self.norm1(x))                                                # (N, C', H, W)
        scale, shift = self.emb_proj(emb).chunk(2, dim=1)                            # 2 × (N, C')
        h = self.conv2(self.dropout(self.norm2(h, scale, shift)))                    # (N, C', H, W)
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Self-attention over the H·W positions (+ cross-attention to context tokens)."""

    def __init__(self, ch: int, heads: int, num_groups: int, context_dim: Optional[int], backend=None):
        super().__init__()
        self.norm = normalization(ch, num_groups, None, backend)
        self.attn = Attention(ch, heads, backend=backend)
        self.norm_cross = normalization(ch, num_groups, None, backend) if context_dim else None
        self.cross_attn = Attention(ch, heads, context_dim=context_dim, backend=backend) if context_dim else None

    def _tokens(self, norm, x):
        return norm(x).flatten(2).transpose(1, 2)                                     # (N, H·W, C)

    def forward(self, x, context=None, context_mask=None):
        N, C, H, W = x.shape
        x = x + self.attn(self._tokens(self.norm, x)).transpose(1, 2).reshape(N, C, H, W)
        if self.cross_attn is not None:
            h = self.cross_attn(self._tokens(self.norm_cross, x), context, context_mask)   # (N, H·W, C)
            x = x + h.transpose(1, 2).reshape(N, C, H, W)
        return x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)                                                          # (N, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


class Level(nn.Module):
    """One ResBlock, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: Optional[SpatialAttention]):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb, context=None, context_mask=None):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, context_mask)


# ================================================================== model
class UNet(nn.Module):
    """forward(x (N, C, H, W), t (N,), y (N,) labels or None, context (N, L, context_dim))
    → predicted noise (N, C, H, W). y = num_classes is the null (unconditional) class."""

    _flashdiff_backend_owner = True

    def __init__(self, config: Optional[UNetConfig] = None, backend: Optional[str] = None, **overrides):
        super().__init__()
        cfg = config or UNetConfig()
        if overrides:
            cfg = UNetConfig(**{**asdict(cfg), **overrides})
        cfg.channel_mult, cfg.attention_resolutions = tuple(cfg.channel_mult), tuple(cfg.attention_resolutions)
        self.config, self.backend = cfg, backend
        ch0, G, heads = cfg.model_channels, cfg.num_groups, cfg.num_heads
        E = 4 * ch0
        self.in_channels = self.out_channels = cfg.in_channels
        self.time_embed = TimestepEmbedder(E, freq_dim=ch0)
        self.label_embed = LabelEmbedder(cfg.num_classes, E, cfg.class_dropout_prob) if cfg.num_classes else None

        def level(c_in, c_out, res):
            attn = SpatialAttention(c_out, heads, G, cfg.context_dim, backend) \
                if res in cfg.attention_resolutions else None
            return Level(ResBlock(c_in, c_out, E, G, cfg.dropout, backend), attn)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [ch0], ch0, cfg.sample_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(level(ch, ch0 * mult, res))
                ch = ch0 * mult
                skips.append(ch)
            if i != len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skips.append(ch)
        self.mid = nn.ModuleList([
            Level(ResBlock(ch, ch, E, G, cfg.dropout, backend),
                  SpatialAttention(ch, heads, G, cfg.context_dim, backend)),
            Level(ResBlock(ch, ch, E, G, cfg.dropout, backend), None),
        ])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for j in range(cfg.num_res_blocks + 1):
                self.up.append(level(ch + skips.pop(), ch0 * mult, res))
                ch = ch0 * mult
            if i != 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = normalization(ch, G, "silu", backend)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    @property
    def num_classes(self) -> Optional[int]:
        return self.config.num_classes

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    def forward(self, x, t, y=None, context=None, context_mask=None):
        if self.config.context_dim and context is None:
            raise ValueError("this U-Net has cross-attention: pass context (N, L, context_dim)")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embed(t)                                                     # (N, E)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.label_embed.null_class, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)                                          # (N, E)
        h = self.conv_in(x)                                                          # (N, C0, H, W)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb, context, context_mask)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb, context, context_mask)                                 # (N, C, H/2^k, W/2^k)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.conv_out(self.norm_out(h))                                       # (N, C_in, H, W)


UNet_models = {
    "UNet-digits": lambda backend=None, **kw: UNet(UNetConfig(**{**dict(
        sample_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), num_heads=1, num_groups=4, num_classes=10), **kw}), backend=backend),
    "UNet-S": lambda backend=None, **kw: UNet(UNetConfig(**kw), backend=backend),
}

__all__ = ["UNet", "UNetConfig", "UNet_models", "ResBlock", "SpatialAttention"]
