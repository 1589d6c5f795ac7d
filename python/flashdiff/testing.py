"""The correctness rule of DESIGN.md, shared by the tests and `flashdiff validate`.

For an output y in dtype d:  max|y − ref| ≤ 2·max|y_torch_d − ref| + atol_d,
where ref is the reference in float64 and y_torch_d the reference run in dtype d (the
flash-attention rule). NaN passes only where the reference has NaN at the same place.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


@dataclass
class Comparison:
    error: float        # max |y − ref|
    torch_error: float  # max |y_torch_d − ref|
    bound: float        # 2·torch_error + atol
    nan_mismatch: int   # elements where exactly one of y, ref is NaN
    where: tuple        # index of the largest error

    @property
    def ok(self) -> bool:
        return self.nan_mismatch == 0 and self.error <= self.bound

    @property
    def ratio(self) -> float:
        """error / bound: below 1 passes."""
        return self.error / self.bound if self.bound > 0 else float("inf")

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAIL"
        return (f"{status}: max err {self.error:.3e} at {self.where}, bound {self.bound:.3e} "
                f"(torch-in-dtype err {self.torch_error:.3e}), ratio {self.ratio:.2f}"
                + (f", {self.nan_mismatch} NaN mismatches" if self.nan_mismatch else ""))


def compare(y: torch.Tensor, ref: torch.Tensor, y_torch_d: torch.Tensor, dtype=None) -> Comparison:
    """Apply the rule; y and y_torch_d in dtype d, ref in float64 (any device)."""
    dtype = dtype or y.dtype
    if y.shape != ref.shape:
        raise AssertionError(f"shape {tuple(y.shape)} differs from the reference's {tuple(ref.shape)}")
    y64, ref64, t64 = y.detach().double(), ref.detach().double(), y_torch_d.detach().double()
    y_nan, ref_nan = torch.isnan(y64), torch.isnan(ref64)
    nan_mismatch = int((y_nan != ref_nan).sum())
    diff = (y64 - ref64).abs().masked_fill(ref_nan & y_nan, 0).nan_to_num(nan=float("inf"))
    tdiff = (t64 - ref64).abs().masked_fill(ref_nan, 0).nan_to_num(nan=0.0, posinf=0.0)
    if diff.numel() == 0:
        return Comparison(0.0, 0.0, ATOL[dtype], nan_mismatch, ())
    flat = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    error, torch_error = float(diff.max()), float(tdiff.max())
    return Comparison(error, torch_error, 2 * torch_error + ATOL[dtype], nan_mismatch, where)


def assert_close(y, ref, y_torch_d, label: str = "") -> Comparison:
    """compare() and raise AssertionError with the details when the rule fails."""
    result = compare(y, ref, y_torch_d)
    if not result.ok:
        raise AssertionError(f"{label}: {result}")
    return result


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block the ops fill every output they allocate with NaN before the kernel
    runs, so an element a kernel forgot to write fails the comparison."""
    from .ops import _common

    before = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True
    try:
        yield
    finally:
        _common.POISON_OUTPUTS = before


def assert_attention_grads(o, leaves, mask, label: str = "") -> None:
    """dq, dk, dv of an attention output `o` computed from `leaves` (q, k, v requiring grad)
    against the reference's gradients, by the rule above (float64 reference; the reference in
    the leaves' dtype as the torch-in-dtype term)."""
    from . import reference

    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)

    def ref_grads(upcast):
        ref_leaves = [t.detach().requires_grad_(True) for t in leaves]
        out = reference.attention(*ref_leaves, mask, upcast=upcast)
        return torch.autograd.grad(out, ref_leaves, do.to(out.dtype))

    for name, g, r, r_d in zip("qkv", grads, ref_grads(True), ref_grads(False)):
        assert_close(g, r, r_d, f"d{name} {label}")
