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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: truncated, corrupted, not safetensors, without
    flashdiff's metadata, or with weights that do not fit the model it describes."""


def load_checkpoint(path: str, backend: Optional[str] = None, device=None):
    """Rebuild the model a checkpoint describes, load its weights, return it in eval mode.
    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError naming the
    file and what is wrong) for one that cannot be loaded."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["flashdiff"])
        model = build_from_metadata(meta, backend)
        # load_file reads every tensor: a file cut short fails here, not at the first forward
        model.load_state_dict(load_file(path))
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} has no flashdiff metadata ({err}): not written by "
                              f"flashdiff.models.save_checkpoint") from err
    except Exception as err:  # safetensors' own error type, JSON, config and state-dict errors
        raise CheckpointError(f"checkpoint {path} cannot be loaded (truncated or corrupted?): "
                              f"{type(err).__name__}: {err}") from err
    model.checkpoint_info = meta
    return model.to(device or "cpu").eval()


def checkpoint_path(name: str) -> str:
    """The file of a shipped checkpoint name, or `name` itself when it is a path (it contains a
    path separator or ends in .safetensors)."""
    if name.endswith(".safetensors") or os.sep in name or (os.altsep and os.altsep in name):
        return name
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {PRETRAINED} or a path to a .safetensors checkpoint, "
                         f"got {name!r}")
    return os.path.join(CHECKPOINT_DIR, f"{name}.safetensors")


def load_pretrained(name: str, backend: Optional[str] = None, device=None):
    """A shipped checkpoint ("digits-unet" | "digits-dit"), or a checkpoint file by path. The
    shipped ones: class-conditional 8×8 digits, epsilon prediction, diffusers' default linear
    1000-step schedule (so DDIMScheduler() etc. fit it); label 10 is the null class. Sample with clip_sample=False (stored in
    model.checkpoint_info["scheduler_config"]; flashdiff.sampling.make_scheduler applies it).
    Errors: ValueError for an unknown name, FileNotFoundError for a missing file,
    CheckpointError (a ValueError) for a truncated or corrupted one."""
    path = checkpoint_path(name)
    if not os.path.exists(path):
        hint = (f"; rebuild it with: python -m flashdiff.train --model {name}" if name in PRETRAINED else "")
        raise FileNotFoundError(f"{path} is missing{hint}")
    return load_checkpoint(path, backend, device)


__all__ = ["DiT", "DiTConfig", "DiT_models", "UNet", "UNetConfig", "UNet_models", "load_pretrained",
           "load_checkpoint", "save_checkpoint", "CheckpointError", "PRETRAINED", "CHECKPOINT_DIR"]
