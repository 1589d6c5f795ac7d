"""Small helpers shared by the Triton launchers (no kernels here).

`INTERPRET` is read once, at import: triton itself reads TRITON_INTERPRET when a kernel is
decorated, so the flag and the kernels agree only if the variable is set before the first
import of triton (docs/internals.md, "Toolchain facts").
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

# Kernels run on the CPU through triton's interpreter (tests on a machine without a GPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether dot operands must be upcast to fp32: the interpreter's bf16 `tl.dot` returns
    garbage (TOOLCHAIN.md). Compiled kernels keep bf16 tensor-core dots."""
    return INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def num_sms(device_index: Optional[int]) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in on the CPU)."""
    if device_index is None or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index if t.device.type == "cuda" else None)


def ncs_strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """Strides (n, c, s) that address t [N, C, *spatial] as [N, C, S], S = prod(spatial),
    when the spatial dims collapse into one stride (contiguous, channels_last and
    channels_last_3d tensors do); None otherwise."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    s_stride = None  # stride of the innermost spatial dim with size > 1
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if expected is None:
            s_stride, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return t.stride(0), t.stride(1), (1 if s_stride is None else s_stride)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """x's memory format as flashdiff.reference defines it (kept here so that the kernels
    package imports without flashdiff): channels_last(_3d) only when not also contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
