"""Compact DiT and U-Net on flashdiff layers, and the small trained digit checkpoints.

    model = flashdiff.models.load_pretrained("digits-unet")            # fused ops (auto)
    ref = flashdiff.models.load_pretrained("digits-unet", backend="reference")
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Optional

from .dit import DiT, DiTConfig, DiT_models
from .unet import UNet, UNetConfig, UNet_models

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
PRETRAINED = ("digits-unet", "digits-dit")


def model_metadata(model) -> dict:
    """What a checkpoint records to rebuild the module: the class and its config."""
    kind = "dit" if isinstance(model, DiT) else "unet"
    return {"class": kind, "config": asdict(model.config)}


def build_from_metadata(meta: dict, backend: Optional[str] = None):
    cfg = meta["config"]
    if meta["class"] == "dit":
        return DiT(DiTConfig(**cfg), backend=backend)
    if meta["class"] == "unet":
        return UNet(UNetConfig(**cfg), backend=backend)
    raise ValueError(f"unknown model class {meta['class']!r} in checkpoint metadata")


def save_checkpoint(model, path: str, extra: Optional[dict] = None) -> None:
    """Weights as safetensors; the config (and `extra`, e.g. the training command) as metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"flashdiff": json.dumps({**model_metadata(model), **(extra or {})})}
    save_file(state, path, metadata=meta)


def load_checkpoint(path: str, backend: Optional[str] = None, device=None):
    """Rebuild the model a checkpoint describes, load its weights, return it in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["flashdiff"])
    model = build_from_metadata(meta, backend)
    model.load_state_dict(load_file(path))
    model.checkpoint_info = meta
    return model.to(device or "cpu").eval()


def checkpoint_path(name: str) -> str:
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {PRETRAINED}, got {name!r}")
    return os.path.join(CHECKPOINT_DIR, f"{name}.safetensors")


def load_pretrained(name: str, backend: Optional[str] = None, device=None):
    """A shipped checkpoint ("digits-unet" | "digits-dit"): class-conditional 8×8 digits,
    epsilon prediction, diffusers' default linear 1000-step schedule (so DDIMScheduler() etc.
    fit it); label 10 is the null class. Sample with clip_sample=False (stored in
    model.checkpoint_info["scheduler_config"]; flashdiff.sampling.make_scheduler applies it)."""
    path = checkpoint_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; rebuild it with: python -m flashdiff.train --model {name}")
    return load_checkpoint(path, backend, device)


__all__ = ["DiT", "DiTConfig", "DiT_models", "UNet", "UNetConfig", "UNet_models", "load_pretrained",
           "load_checkpoint", "save_checkpoint", "PRETRAINED", "CHECKPOINT_DIR"]
