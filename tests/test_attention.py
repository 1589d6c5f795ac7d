"""attention on every backend against flashdiff.reference (DESIGN.md tolerance rule)."""
import pytest
import torch
import torch.nn.functional as F

import flashdiff
from flashdiff import reference
from flashdiff.testing import assert_attention_grads, assert_close, poisoned_outputs

from conftest import DEVICE_BACKENDS, DTYPE_IDS, DTYPES, require_backend

# (B, H, Sq, Skv, D) with the reason each one is hostile
SHAPES = [
    pytest.param((1, 1, 1, 1, 16), id="single-token"),
    pytest.param((2, 3, 37, 77, 40), id="cross-attn-hd40-Skv77"),
    pytest.param((1, 2, 65, 65, 72), id="hd72-one-past-64"),
    pytest.param((1, 1, 17, 129, 80), id="hd80-Skv-one-past-128"),
    pytest.param((2, 1, 33, 31, 160), id="hd160"),
    pytest.param((1, 2, 64, 64, 64), id="hd64-aligned"),
    pytest.param((1, 1, 16, 24, 128), id="hd128"),
    pytest.param((1, 1, 9, 10, 256), id="hd256"),
]


def _qkv(B, H, Sq, Skv, D, dtype, device, layout="contiguous"):
    if layout == "fused-qkv":  # views of one [B, S, 3, H, D] projection, as DiT/diffusers make them
        qkv = torch.randn(B, Sq, 3, H, D, device=device).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    q = torch.randn(B, H, Sq, D, device=device).to(dtype)
    k = torch.randn(B, H, Skv, D, device=device).to(dtype)
    v = torch.randn(B, H, Skv, D, device=device).to(dtype)
    return q, k, v


def _cuda_declines(backend, dtype):
    """The CUDA kernels take fp16/bf16 only (an fp32 call is refused with the reason, checked here)."""
    return backend == "cuda" and dtype == torch.float32


def _check(device_backend, dtype, q, k, v, mask=None, label=""):
    device, backend = device_backend
    require_backend(device, backend)
    if _cuda_declines(backend, dtype):
        with pytest.raises(NotImplementedError, match="dtype torch.float32 is not supported"):
            flashdiff.attention(q, k, v, attn_mask=mask, backend=backend)
        return
    with poisoned_outputs():
        o = flashdiff.attention(q, k, v, attn_mask=mask, backend=backend)
    ref = reference.attention(q, k, v, mask, upcast=True)
    ref_d = reference.attention(q, k, v, mask, upcast=False)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert_close(o, ref, ref_d, f"{backend} {dtype} {tuple(q.shape)} {label}")


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(device_backend, dtype, shape):
    q, k, v = _qkv(*shape, dtype, device_backend[0])
    _check(device_backend, dtype, q, k, v)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_qkv_views(device_backend, dtype):
    q, k, v = _qkv(2, 3, 33, 33, 40, dtype, device_backend[0], layout="fused-qkv")
    assert not q.is_contiguous()
    _check(device_backend, dtype, q, k, v, label="fused-qkv")


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_key_padding_mask(device_backend, dtype):
    """Batch 0 keeps its first 20 keys, batch 1 has every key masked (its output must be 0)."""
    B, H, Sq, Skv, D = 2, 2, 19, 45, 64
    q, k, v = _qkv(B, H, Sq, Skv, D, dtype, device_backend[0])
    mask = torch.zeros(B, 1, 1, Skv, dtype=torch.bool, device=q.device)
    mask[0, ..., :20] = True
    _check(device_backend, dtype, q, k, v, mask, "key-padding")
    if _cuda_declines(device_backend[1], dtype):
        return
    o = flashdiff.attention(q, k, v, attn_mask=mask, backend=device_backend[1])
    assert torch.all(o[1] == 0)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["additive-float", "bool-per-query"])
def test_general_masks(device_backend, mask_kind):
    """Masks the fused kernels do not take natively: served by torch, or refused with a reason."""
    device, backend = device_backend
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32  # what the CUDA kernels take
    q, k, v = _qkv(1, 2, 12, 20, 32, dtype, device)
    if mask_kind == "additive-float":
        mask = torch.randn(1, 1, 12, 20, device=device)
    else:
        mask = torch.rand(1, 2, 12, 20, device=device) > 0.3
    if backend in ("triton", "cuda"):
        require_backend(device, backend)
        with pytest.raises(NotImplementedError, match="key-padding"):
            flashdiff.attention(q, k, v, attn_mask=mask, backend=backend)
        backend = None  # auto must still serve it
    _check((device, backend), dtype, q, k, v, mask, mask_kind)


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward(device_backend, dtype):
    device, backend = device_backend
    require_backend(device, backend)
    q, k, v = _qkv(1, 2, 23, 29, 40, dtype, device)
    if _cuda_declines(backend, dtype):
        _check(device_backend, dtype, q, k, v)
        return
    mask = torch.ones(1, 1, 1, 29, dtype=torch.bool, device=device)
    mask[..., -5:] = False
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    o = flashdiff.attention(*leaves, attn_mask=mask, backend=backend)
    assert_attention_grads(o, leaves, mask, f"{backend} {dtype}")


def test_matches_torch_sdpa_semantics():
    q, k, v = _qkv(2, 2, 7, 9, 16, torch.float32, "cpu")
    mask = torch.rand(2, 1, 7, 9) > 0.2
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(flashdiff.attention(q, k, v, mask, scale=0.3, backend="reference"), expected)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v: flashdiff.attention(q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: flashdiff.attention(q, k[:, :1], v), ValueError, "share batch and heads"),
    (lambda q, k, v: flashdiff.attention(q, k[..., :8], v), ValueError, "k must have head_dim 16"),
    (lambda q, k, v: flashdiff.attention(q, k, v[:, :, :3]), ValueError, "v must have as many keys"),
    (lambda q, k, v: flashdiff.attention(q, k.half(), v), TypeError, "k has dtype torch.float16"),
    (lambda q, k, v: flashdiff.attention(q.int(), k, v), TypeError, "q must be a floating tensor"),
    (lambda q, k, v: flashdiff.attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError,
     "attn_mask must broadcast"),
    (lambda q, k, v: flashdiff.attention(q, k, v, attn_mask=torch.ones(1, 5, dtype=torch.int32)), TypeError,
     "attn_mask must be bool"),
    (lambda q, k, v: flashdiff.attention(q, k.to("meta"), v), ValueError, "k is on meta"),
    (lambda q, k, v: flashdiff.attention(q, k, v, scale=float("inf")), ValueError, "scale must be finite"),
    (lambda q, k, v: flashdiff.attention(q, k, v, backend="cuda"), NotImplementedError, "CUDA tensors"),
])
def test_bad_input(call, error, match):
    q, k, v = _qkv(2, 2, 4, 5, 16, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        call(q, k, v)


def test_head_dim_over_maximum_falls_back_or_refuses():
    q = torch.randn(1, 1, 4, 320)
    require_backend("cpu", "cpu")
    assert flashdiff.attention(q, q, q).shape == q.shape  # auto: torch serves it
    if flashdiff.backend_status()["triton"] is None:  # CUDA tensors, or the interpreter's CPU ones
        qt = q.cuda() if torch.cuda.is_available() else q
        with pytest.raises(NotImplementedError, match="head_dim 320 is outside"):
            flashdiff.attention(qt, qt, qt, backend="triton")


def test_empty_inputs():
    q = torch.randn(2, 2, 0, 16)
    k = torch.randn(2, 2, 5, 16)
    assert flashdiff.attention(q, k, k).shape == q.shape
    q = torch.randn(2, 2, 3, 16)
    assert torch.all(flashdiff.attention(q, k[:, :, :0], k[:, :, :0]) == 0)
