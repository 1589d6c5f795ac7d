"""merge_attention: combine attention over disjoint key sets by log-sum-exp.

    lse = log Σ_i exp(lse_i),    out = Σ_i exp(lse_i − lse) · out_i

Partial results (out_i, lse_i) come from `flashdiff.attention(..., return_lse=True)` over
disjoint key sets of the same queries (ring attention's K/V blocks, split-KV); the result is
the attention over their union, and its lse, so merges chain. Memory-bound: it reads n·D
elements and 4·n bytes per row and writes D elements and 4 bytes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import _ext, _validate as check, reference
from ..backends import OpDispatch, register_op
from ._common import new_empty, use_custom_op

_dispatch = OpDispatch("merge_attention", backward={
    "*": "torch ops on the saved partials: d out_i = w_i·dout, d lse_i = w_i·(⟨dout, out_i − out⟩ + dlse)"})


# ------------------------------------------------------------------ validation
def _check_args(outs, lses, out_dtype):
    for name, seq in (("outs", outs), ("lses", lses)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(outs) == 0:
        raise ValueError("outs and lses must hold at least one partial result, got empty sequences")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have equal length, got {len(outs)} and {len(lses)}")
    ref = outs[0]
    check.tensor("outs[0]", ref, dim=4)
    for i, (o, lse) in enumerate(zip(outs, lses)):
        check.tensor(f"outs[{i}]", o, dim=4)
        check.tensor(f"lses[{i}]", lse, dim=3)
        check.same_device("outs[0]", ref, **{f"outs[{i}]": o, f"lses[{i}]": lse})
        check.shape(f"outs[{i}]", o, ref.shape, " (the shape of outs[0])")
        check.shape(f"lses[{i}]", lse, ref.shape[:3], " ([B, H, Sq] of outs[0])")
    if out_dtype is not None and out_dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype or None, got {out_dtype}")


def _resolve(outs, lses, out_dtype=None, backend=None):
    _check_args(outs, lses, out_dtype)
    dtypes = tuple(o.dtype for o in outs)
    return _dispatch.choose(backend, outs[0].device,
                            {"outs": outs, "lses": lses, "out_dtype": out_dtype or outs[0].dtype},
                            key=(outs[0].device, outs[0].shape, dtypes, out_dtype))


# ------------------------------------------------------------------ backends
# Each is impl(outs, lses, out_dtype) -> (out [B, H, Sq, D] contiguous in out_dtype, lse fp32 [B, H, Sq]).
def _torch_merge(outs, lses, out_dtype):
    """The reference math in fp32 (float64 for float64 inputs): ~4 elementwise passes per partial."""
    dt = torch.float64 if any(o.dtype == torch.float64 for o in outs) else torch.float32
    out, lse = reference.merge_attention(outs, lses, upcast=dt)
    return out.to(out_dtype).contiguous(), lse.float()


def _triton_supports(outs, lses, out_dtype):
    for d in [o.dtype for o in outs] + [out_dtype]:
        if d not in check.KERNEL_DTYPES:
            return f"dtype {d} is not supported (supported: {', '.join(map(str, check.KERNEL_DTYPES))})"
    return None


def _triton_merge(outs, lses, out_dtype):
    """The fused kernel: one pass over the partials (triton_kernels/merge_attention.py). lses
    go in as fp32 contiguous (a copy only if they are not: 4 B per row)."""
    module = _ext.load_triton()[0]
    kernels = getattr(module, "merge_attention", None)
    if kernels is None:  # the subpackage __init__ need not list it
        import importlib
        kernels = importlib.import_module(module.__name__ + ".merge_attention")
    shape = outs[0].shape
    out = (new_empty(outs[0], shape, out_dtype), new_empty(outs[0], shape[:3], torch.float32))
    return kernels.merge_attention_fwd(list(outs), [lse.to(torch.float32).contiguous() for lse in lses],
                                       out_dtype, out=out)


_dispatch.register("reference", _torch_merge)
_dispatch.register("torch", _torch_merge)
_dispatch.register("triton", _triton_merge, _triton_supports)
register_op(_dispatch, _resolve)


# ------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("flashdiff::merge_attention", mutates_args=())
def _merge_op(outs: List[torch.Tensor], lses: List[torch.Tensor], out_dtype: torch.dtype,
              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _dispatch.impls[backend](outs, lses, out_dtype)


@_merge_op.register_fake
def _(outs, lses, out_dtype, backend):
    shape = outs[0].shape
    return outs[0].new_empty(shape, dtype=out_dtype), outs[0].new_empty(shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    outs, lses, out_dtype, backend = inputs
    out, lse = output
    ctx.n = len(outs)
    ctx.save_for_backward(*outs, *lses, out, lse)


def _backward(ctx, dout, dlse):
    """w_i = exp(lse_i − lse) (0 for an empty partial). out = Σ w_i out_i, so d out_i = w_i·dout;
    d out/d lse_i = w_i·(out_i − out) and d lse/d lse_i = w_i, so d lse_i = w_i·(⟨dout, out_i −
    out⟩ + dlse). fp32 torch ops on the saved tensors (a merge is memory-bound either way)."""
    n = ctx.n
    saved = ctx.saved_tensors
    outs, lses, out, lse = saved[:n], saved[n:2 * n], saved[2 * n], saved[2 * n + 1]
    lse_safe = torch.where(torch.isinf(lse), torch.zeros((), device=lse.device), lse)
    d_outs, d_lses = [], []
    for o, li in zip(outs, lses):
        li = li.float()
        w = torch.where(torch.isinf(li), torch.zeros((), device=li.device), torch.exp(li - lse_safe))
        dli = torch.zeros_like(w) if dlse is None else w * dlse.float()
        if dout is None:
            d_outs.append(torch.zeros_like(o))
        else:
            g = dout.float()
            diff = torch.where(w[..., None] == 0, 0.0, o.float() - out.float())  # a NaN out_i of an empty partial stays out
            d_outs.append((w[..., None] * g).to(o.dtype))
            dli = dli + w * (g * diff).sum(-1)
        d_lses.append(dli.to(li.dtype))
    return d_outs, d_lses, None, None


torch.library.register_autograd("flashdiff::merge_attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API
def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor],
                    out_dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention results over disjoint key sets into the attention over their union.

    Args:
        outs: n ≥ 1 partial outputs [B, H, Sq, D] (float dtypes, may differ; any strides).
        lses: their log-sum-exps [B, H, Sq] (`flashdiff.attention(..., return_lse=True)`'s
            second output; fp32 recommended). An empty partial has lse -inf (+inf, the fused
            kernels' internal convention, is read the same way) and weighs exactly 0, even
            where its out_i is NaN.
        out_dtype: dtype of the merged output (default: outs[0]'s). Accumulation is fp32.
        backend: None/"auto", "reference", "torch" or "triton" (fused: one pass over the
            partials, up to 4 per launch). Auto follows the fallback rule (torch) until a
            dispatch table has measured the kernel.
    Returns: (out [B, H, Sq, D] contiguous in out_dtype, lse fp32 [B, H, Sq]); a row empty in
    every partial gives out 0 and lse -inf. Differentiable w.r.t. outs and lses.
    """
    choice = _resolve(outs, lses, out_dtype, backend)
    out_dtype = out_dtype or outs[0].dtype
    outs, lses = list(outs), list(lses)
    if outs[0].numel() == 0:  # no rows or D = 0: nothing to launch (lse is still defined at D = 0)
        return _torch_merge(outs, lses, out_dtype)
    if use_custom_op(*outs, *lses):
        return _merge_op(outs, lses, out_dtype, choice.impl)
    return _dispatch.impls[choice.impl](outs, lses, out_dtype)
