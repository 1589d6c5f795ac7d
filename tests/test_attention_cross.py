"""The CUDA cross-attention specialist, variant "cuda:cross" (csrc/cuda/attention_cross.cu).

A variant is never picked by an explicit backend="cuda", so the GPU tests ask for it by name
(backend="cuda:cross") and check it against flashdiff.reference with the tolerance rule of
docs/design.md, outputs poisoned with NaN. A wrapper around the binding records whether the
specialist served each call or declined it (False) so the regular kernel ran: the served cases
must have been served, Skv = 257 and head dim 256 must fall back. CPU tests pin the registration
and the binding.
"""
import importlib

import pytest
import torch

import flashdiff
from flashdiff import _ext, backends, reference
from flashdiff.backends import REGISTRY
from flashdiff.testing import assert_close, poisoned_outputs

attn_mod = importlib.import_module("flashdiff.ops.attention")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


# ------------------------------------------------------------------ CPU: registration, binding
def test_variant_is_registered_and_explicit_cuda_keeps_the_fa2_kernel(monkeypatch):
    dispatch = REGISTRY["attention"][0]
    assert dispatch.impls["cuda:cross"] is attn_mod._cuda_cross_fwd
    assert dispatch.impls["cuda"] is attn_mod._cuda_fwd
    monkeypatch.setattr(backends, "_device_reason", lambda backend, device: None)  # pretend a GPU
    q = torch.randn(1, 2, 8, 40, dtype=torch.float16)
    k = torch.randn(1, 2, 77, 40, dtype=torch.float16)
    inputs = {"q": q, "k": k, "v": k, "attn_mask": None}
    choice = dispatch.choose("cuda", torch.device("cuda"), inputs)
    assert (choice.backend, choice.impl) == ("cuda", "cuda")
    choice = dispatch.choose("cuda:cross", torch.device("cuda"), inputs)
    assert (choice.backend, choice.impl) == ("cuda", "cuda:cross")
    # same supports() as cuda: fp32 is refused with the reason
    with pytest.raises(NotImplementedError, match="float32"):
        dispatch.choose("cuda:cross", torch.device("cuda"), {**inputs, "q": q.float(), "k": k.float(),
                                                             "v": k.float()})


def test_binding_exposes_the_cross_entry_point():
    mod, why = _ext.load_cuda_module_only()
    if mod is None:
        pytest.skip(f"flashdiff._cuda not built: {why}")
    assert hasattr(mod, "attention_fwd_cross"), "rebuild flashdiff._cuda (pip install -e .)"
    assert hasattr(mod, "attention_fwd")
    assert "Returns False" in mod.attention_fwd_cross.__doc__


# ------------------------------------------------------------------ GPU: the kernel itself
@pytest.fixture
def served(monkeypatch):
    """A list that receives the binding's answer (True: the specialist ran) for every call."""
    module = _ext.load_cuda()[0]
    if module is None or not hasattr(module, "attention_fwd_cross"):
        pytest.skip(f"flashdiff._cuda without attention_fwd_cross: {_ext.load_cuda()[1]}")
    calls = []
    real = module.attention_fwd_cross

    def recording(*args):
        ran = real(*args)
        calls.append(ran)
        return ran

    monkeypatch.setattr(module, "attention_fwd_cross", recording)
    return calls


def _qkv(B, H, Sq, Skv, D, dtype, layout="contiguous"):
    if layout == "diffusers":  # [B, S, H, D] projections viewed as [B, H, S, D] (transposed)
        make = lambda S: torch.randn(B, S, H, D, device="cuda").to(dtype).transpose(1, 2)  # noqa: E731
    elif layout == "unaligned":  # head stride D + 1: no 16-byte vectors (the element-wise path)
        make = lambda S: torch.randn(B, S, H, D + 1, device="cuda").to(dtype)[..., :D].transpose(1, 2)  # noqa: E731
    else:
        make = lambda S: torch.randn(B, H, S, D, device="cuda").to(dtype)  # noqa: E731
    return make(Sq), make(Skv), make(Skv)


def _check(q, k, v, mask=None, label="", lse=True):
    with poisoned_outputs():
        out = flashdiff.attention(q, k, v, attn_mask=mask, backend="cuda:cross", return_lse=lse)
    o, l = out if lse else (out, None)
    label = f"cross {q.dtype} q{tuple(q.shape)} Skv {k.shape[2]} {label}"
    assert o.dtype == q.dtype and o.shape == q.shape, label
    ref = reference.attention(q, k, v, mask, upcast=True)
    ref_d = reference.attention(q, k, v, mask, upcast=False)
    assert_close(o, ref, ref_d, label)
    if lse:
        ref_l = reference.attention_lse(q, k, v, mask, upcast=True)[1]
        ref_ld = reference.attention_lse(q, k, v, mask, upcast=False)[1].float()
        assert l.dtype == torch.float32 and l.shape == q.shape[:3], label
        assert torch.equal(torch.isneginf(l), torch.isneginf(ref_l)), f"{label}: -inf rows differ"
        fin = torch.isfinite(ref_l)
        assert_close(l[fin], ref_l[fin], ref_ld[fin], f"lse {label}")
    return o, l


SKV = [1, 7, 77, 128, 255, 256]
HEAD_DIMS = [40, 64, 80, 128, 160]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Skv", SKV)
def test_keys_by_head_dim(Skv, D, dtype, served):
    """Both register buckets (128, 256 keys), key tails 1 / 7 / 13 / 15 past a multiple of 16."""
    _check(*_qkv(2, 3, 65, Skv, D, dtype))
    assert served == [True]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("Sq", [1, 63, 64, 65, 4096])
@pytest.mark.parametrize("B, H", [(1, 1), (8, 2)], ids=["b1", "b8"])
def test_query_lengths(B, H, Sq, dtype, served):
    """Partial and whole query tiles; Sq 4096 at B·H 16 takes 128-row CTAs (8 warps), at B·H 1
    64-row ones; several CTAs per (b, h)."""
    _check(*_qkv(B, H, Sq, 77, 40, dtype))
    assert served == [True]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("Skv, D", [(77, 40), (77, 160), (256, 64), (200, 128)])
def test_key_padding_mask_with_a_fully_masked_row(Skv, D, dtype, served):
    """Per-batch prompt lengths (as a tokenizer pads them), batch 2 has no key: out 0, lse -inf."""
    B, H, Sq = 4, 2, 70
    q, k, v = _qkv(B, H, Sq, Skv, D, dtype)
    lengths = [Skv, 1, 0, Skv // 2 + 3]
    mask = torch.arange(Skv, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    mask = mask[:, None, None, :]
    o, lse = _check(q, k, v, mask, "key-padding")
    assert torch.all(o[2] == 0) and torch.all(torch.isneginf(lse[2]))
    assert served == [True]
    # a mask with holes (not a prefix) and a [B, Skv]-broadcastable bool of shape [B, 1, 1, Skv]
    holes = torch.rand(B, 1, 1, Skv, device="cuda") > 0.5
    holes[0] = False
    o, lse = _check(q, k, v, holes, "holes")
    assert torch.all(o[0] == 0) and torch.all(torch.isneginf(lse[0]))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["diffusers", "unaligned"])
@pytest.mark.parametrize("Sq, Skv, D", [(4096, 77, 40), (257, 77, 80), (100, 256, 160)])
def test_strided_views(Sq, Skv, D, layout, dtype, served):
    """diffusers' [B, S, H, D] projections transposed to [B, H, S, D] (16-byte vectors), and a head
    stride of D + 1 (element loads and stores)."""
    q, k, v = _qkv(2, 8, Sq, Skv, D, dtype, layout)
    assert not q.is_contiguous()
    _check(q, k, v, label=layout)
    assert served == [True]


@gpu
@needs_cuda
def test_scale_and_no_lse(served):
    q, k, v = _qkv(2, 2, 33, 77, 64, torch.bfloat16)
    with poisoned_outputs():
        o = flashdiff.attention(q, k, v, scale=0.3, backend="cuda:cross")
    ref = reference.attention(q, k, v, scale=0.3, upcast=True)
    assert_close(o, ref, reference.attention(q, k, v, scale=0.3, upcast=False), "scale 0.3")
    assert served == [True]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B, H, Sq, Skv, D", [
    pytest.param(2, 3, 65, 257, 64, id="Skv257"),       # more keys than the specialist holds
    pytest.param(1, 2, 40, 77, 256, id="hd256"),        # a head dim past 160
    pytest.param(2, 40000, 1, 5, 32, id="BH80000"),     # B·H past grid.y's 65535
])
def test_falls_back_to_the_regular_kernel(B, H, Sq, Skv, D, dtype, served):
    _check(*_qkv(B, H, Sq, Skv, D, dtype))
    assert served == [False]
