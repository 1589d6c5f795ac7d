"""The FA2 CUDA kernel with 128-row CTAs, variant "cuda:m128" (csrc/cuda/attention_kernel.cuh,
kWarps = 8; `attention_fwd(..., block_rows=128)`).

The GPU tests ask for it by name and check it against flashdiff.reference with the tolerance
rule of docs/design.md, outputs poisoned with NaN: every head-dim bucket, partial query tiles
around 128, key tails, masks with a keyless row, strided views and the element-wise path. CPU
tests pin the registration and the binding's argument check.
"""
import importlib

import pytest
import torch

import flashdiff
from flashdiff import _ext, reference
from flashdiff.backends import REGISTRY
from flashdiff.testing import assert_close, poisoned_outputs

attn_mod = importlib.import_module("flashdiff.ops.attention")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


# ------------------------------------------------------------------ CPU: registration, binding
def test_registered_as_a_variant_of_cuda():
    impl = REGISTRY["attention"][0].impls["cuda:m128"]
    assert impl.func is attn_mod._cuda_fwd and impl.keywords == {"block_rows": 128}


def test_binding_takes_block_rows_and_names_a_bad_one():
    mod, why = _ext.load_cuda_module_only()
    if mod is None:
        pytest.skip(f"flashdiff._cuda not built: {why}")
    assert "block_rows" in mod.attention_fwd.__doc__, "rebuild flashdiff._cuda (pip install -e .)"
    # batch 0: the argument checks run, nothing is launched (no device needed)
    args = [0] * 6 + [0, 1, 1, 1, 64] + [0] * 13 + [1.0, 0, 0]  # B = 0
    mod.attention_fwd(*args, block_rows=128)
    mod.attention_fwd(*args)
    with pytest.raises(ValueError, match="block_rows must be 64 or 128, got 96"):
        mod.attention_fwd(*args, block_rows=96)


# ------------------------------------------------------------------ GPU: the kernel itself
def _qkv(B, H, Sq, Skv, D, dtype, layout="contiguous"):
    if layout == "diffusers":  # [B, S, H, D] projections viewed as [B, H, S, D]
        make = lambda S: torch.randn(B, S, H, D, device="cuda").to(dtype).transpose(1, 2)  # noqa: E731
    elif layout == "unaligned":  # head stride D + 1: the element-wise path
        make = lambda S: torch.randn(B, S, H, D + 1, device="cuda").to(dtype)[..., :D].transpose(1, 2)  # noqa: E731
    else:
        make = lambda S: torch.randn(B, H, S, D, device="cuda").to(dtype)  # noqa: E731
    return make(Sq), make(Skv), make(Skv)


def _check(q, k, v, mask=None, label=""):
    with poisoned_outputs():
        o, lse = flashdiff.attention(q, k, v, attn_mask=mask, backend="cuda:m128", return_lse=True)
    label = f"m128 {q.dtype} q{tuple(q.shape)} Skv {k.shape[2]} {label}"
    assert o.dtype == q.dtype and o.shape == q.shape, label
    assert_close(o, reference.attention(q, k, v, mask, upcast=True),
                 reference.attention(q, k, v, mask, upcast=False), label)
    ref_l = reference.attention_lse(q, k, v, mask, upcast=True)[1]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_l)), f"{label}: -inf rows differ"
    fin = torch.isfinite(ref_l)
    assert_close(lse[fin], ref_l[fin], reference.attention_lse(q, k, v, mask, upcast=False)[1].float()[fin],
                 f"lse {label}")
    return o, lse


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [32, 40, 64, 72, 80, 128, 160, 192, 256])
@pytest.mark.parametrize("Sq, Skv", [(127, 65), (129, 200), (1, 7)])
def test_head_dims_and_partial_tiles(Sq, Skv, D, dtype):
    _check(*_qkv(2, 3, Sq, Skv, D, dtype))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_key_padding_mask_with_a_keyless_row(dtype):
    B, H, Sq, Skv = 3, 2, 300, 150
    q, k, v = _qkv(B, H, Sq, Skv, 64, dtype)
    mask = torch.arange(Skv, device="cuda")[None, :] < torch.tensor([Skv, 0, 70], device="cuda")[:, None]
    o, lse = _check(q, k, v, mask[:, None, None, :], "key-padding")
    assert torch.all(o[1] == 0) and torch.all(torch.isneginf(lse[1]))


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["diffusers", "unaligned"])
def test_strided_views(layout):
    q, k, v = _qkv(2, 8, 1030, 77, 40, torch.bfloat16, layout)
    assert not q.is_contiguous()
    _check(q, k, v, label=layout)
