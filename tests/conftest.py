"""Shared fixtures: which devices and backends this machine can test.

Without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1 must be set before
triton is imported, hence here). With a GPU the same tests run compiled; `pytest -m gpu`
selects the GPU-only ones (benchmarks/device_run.sh).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashdiff  # noqa: E402  (after TRITON_INTERPRET)
from flashdiff import _ext  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _device_backends():
    """(device, backend) pairs to test here; each backend on the device it serves."""
    pairs = [("cpu", "reference"), ("cpu", "torch"), ("cpu", "cpu")]
    if _ext.load_triton()[0] is not None and not torch.cuda.is_available():
        pairs.append(("cpu", "triton"))  # interpreter
    if torch.cuda.is_available():
        pairs += [("cuda", "reference"), ("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda")]
    return pairs


def _param(device, backend):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return pytest.param((device, backend), id=f"{device}-{backend}", marks=marks)


DEVICE_BACKENDS = [_param(d, b) for d, b in _device_backends()]


def require_backend(device, backend):
    """Skip only for a reason outside the project's control; a module that should have been
    built (g++ and nvcc exist in CI) is a test failure elsewhere (test_build.py)."""
    reason = flashdiff.backend_status().get(backend)
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
