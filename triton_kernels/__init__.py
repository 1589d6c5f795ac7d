"""Triton kernels of flashdiff, installed as `flashdiff.triton_kernels`.

One module per op, each a vertical slice (kernels, then launchers): `attention`, `group_norm`,
`scheduler`. Launchers take inputs already validated by `flashdiff.ops` and allocate their
outputs; their signatures are fixed in docs/internals.md ("Triton launchers").

Under TRITON_INTERPRET=1 (set before triton is first imported) the same kernels run on CPU
tensors through triton's interpreter; that is how the tests run without a GPU.
"""
from . import attention, group_norm, scheduler
from ._utils import INTERPRET

__all__ = ["attention", "group_norm", "scheduler", "INTERPRET"]
