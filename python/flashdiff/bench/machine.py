"""The machine description stored with every result: card, CPU, versions, commit, load."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Dict

import torch

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Dict[str, Any]:
    """{'commit': sha or None, 'dirty': bool or None} of the checkout flashdiff runs from
    (FLASHDIFF_GIT_COMMIT overrides, e.g. on a machine that received a copy without .git)."""
    env = os.environ.get("FLASHDIFF_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None}
    # python/flashdiff/bench/machine.py -> the checkout's root
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty) if sha else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: str) -> Dict[str, Any]:
    import flashdiff

    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{f"git_{k}": v for k, v in git_commit().items()},
        "device": device,
        "card": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "flashdiff": flashdiff.__version__,
        "backends": flashdiff.backend_status(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # others sharing the machine inflate timings
    except (OSError, AttributeError):
        info["load_avg_1m"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["card_sm"] = f"{p.major}{p.minor}"
        info["card_memory_gib"] = round(p.total_memory / 2**30, 1)
    return info
