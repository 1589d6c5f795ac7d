"""The one-kernel CUDA group norm, variant "cuda:onepass" (csrc/cuda/group_norm_onepass.cu).

A variant is never picked by an explicit backend="cuda" and `flashdiff validate` only checks
registered backends, so its GPU tests call it directly and check it against flashdiff.reference
with the tolerance rule of docs/design.md. The CPU tests pin the registration.
"""
import importlib

import pytest
import torch

import flashdiff
from flashdiff import _ext, backends, reference
from flashdiff.backends import REGISTRY
from flashdiff.testing import assert_close, poisoned_outputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
EPS = 1e-5

gn_mod = importlib.import_module("flashdiff.ops.group_norm")  # the module: flashdiff.ops.group_norm is the function
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------ CPU: registration
def test_variant_is_registered_and_explicit_cuda_keeps_the_multi_launch_kernel(monkeypatch):
    dispatch = REGISTRY["group_norm"][0]
    assert dispatch.impls["cuda:onepass"] is gn_mod._cuda_onepass_fwd
    assert dispatch.impls["cuda"] is gn_mod._cuda_fwd
    # Pretend the cuda backend can run here, then ask for it explicitly.
    monkeypatch.setattr(backends, "_device_reason", lambda backend, device: None)
    inputs = {"x": torch.randn(1, 8, 4, 4), "num_groups": 2, "scale": None, "activation": None}
    choice = dispatch.choose("cuda", torch.device("cuda"), inputs)
    assert (choice.backend, choice.impl) == ("cuda", "cuda")
    choice = dispatch.choose("cuda:onepass", torch.device("cuda"), inputs)
    assert (choice.backend, choice.impl) == ("cuda", "cuda:onepass")


def test_binding_exposes_the_onepass_entry_point():
    mod, why = _ext.load_cuda_module_only()
    if mod is None:
        pytest.skip(f"flashdiff._cuda not built: {why}")
    assert hasattr(mod, "group_norm_fwd_onepass")
    assert hasattr(mod, "group_norm_fwd")


# ------------------------------------------------------------------ GPU: the kernel itself
def _inputs(shape, dtype, layout, affine, modulate, offset=False, loc=0.5):
    x = torch.randn(shape, device="cuda") * 2 + loc
    if offset:  # a contiguous view one element into its storage: no 16-byte alignment
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(shape)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    N, C = shape[:2]
    w = torch.randn(C, device="cuda").to(dtype) if affine else None
    b = torch.randn(C, device="cuda").to(dtype) if affine else None
    s = (0.5 * torch.randn(N, C, device="cuda")).to(dtype) if modulate else None
    t = torch.randn(N, C, device="cuda").to(dtype) if modulate else None
    return x, w, b, s, t


def _check(shape, G, dtype, layout="contiguous", activation="silu", affine=True, modulate=True,
           expect_onepass=True, offset=False):
    """Run the variant (stats on, poisoned outputs) and check y, mean and rstd."""
    x, w, b, s, t = _inputs(shape, dtype, layout, affine, modulate, offset)
    with poisoned_outputs():
        y, mean, rstd, ran = gn_mod._cuda_onepass_call(x, G, w, b, EPS, activation or "none", s, t)
    label = f"onepass {dtype} {tuple(shape)} G={G} {layout} {activation} affine={affine} mod={modulate}"
    assert ran == expect_onepass, f"{label}: one-kernel path ran={ran}, expected {expect_onepass}"
    ref = reference.group_norm(x, G, w, b, EPS, activation, s, t, upcast=True)
    ref_d = reference.group_norm(x, G, w, b, EPS, activation, s, t, upcast=False)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride(), label
    assert_close(y, ref, ref_d, label)
    ref_mean, ref_rstd = reference.group_norm_stats(x, G, EPS, upcast=torch.float64)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} mean: {m}")
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} rstd: {m}")


SD_SHAPES = [
    pytest.param((1, 320, 64, 64), 32, id="sd15-320@64-b1"),     # cluster of 8
    pytest.param((8, 640, 32, 32), 32, id="sd15-640@32-b8"),     # cluster of 1
    pytest.param((1, 320, 128, 128), 32, id="sdxl-320@128-b1"),  # 80 KB per CTA in fp32
    pytest.param((16, 1280, 8, 8), 32, id="sd15-1280@8-b16"),
    pytest.param((4, 1280, 16, 16), 32, id="sd15-1280@16-b4"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, G", SD_SHAPES)
def test_sd_shapes(shape, G, dtype, layout):
    _check(shape, G, dtype, layout)


HOSTILE = [
    pytest.param((2, 30, 7, 11), 5, id="primes-C30-G5"),        # S = 77: no vector divides it
    pytest.param((3, 24, 13), 8, id="1d-Cg3"),                   # Cg = 3: scalar channels_last
    pytest.param((1, 4, 17, 13), 1, id="one-group"),
    pytest.param((2, 20, 5, 3), 20, id="group-per-channel"),
    pytest.param((1, 36, 1025), 4, id="one-past-1024"),
    pytest.param((3, 6, 1, 1), 3, id="single-pixel"),
    pytest.param((2, 12, 3, 4, 5), 4, id="3d-spatial"),
    pytest.param((5, 96, 9, 9), 32, id="b5-Cg3-S81"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, G", HOSTILE)
def test_hostile_shapes(shape, G, dtype, layout):
    _check(shape, G, dtype, layout)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_pointer(dtype, layout):
    """x one element into its storage: the kernel must drop to narrower copies, not fault."""
    _check((2, 64, 16, 16), 8, dtype, layout, offset=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_batch_sizes(batch):
    _check((batch, 320, 32, 32), 32, torch.bfloat16, "channels_last")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("affine, modulate", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "affine", "modulated", "both"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_options(dtype, activation, affine, modulate, layout):
    _check((2, 64, 12, 12), 8, dtype, layout, activation=activation, affine=affine, modulate=modulate)


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape, G", [((2, 8, 16, 16), 4), ((1, 320, 64, 64), 32), ((1, 8, 128, 128), 1)],
                         ids=["small", "cluster-of-8", "one-group-cluster"])
def test_large_mean(shape, G, layout):
    """1e4 + N(0, 1): E[x²] − E[x]² in fp32 loses every digit; the shifted statistics and the
    cross-CTA Chan merge must not."""
    x = 1e4 + torch.randn(shape, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with poisoned_outputs():
        y, mean, rstd, ran = gn_mod._cuda_onepass_call(x, G, None, None, EPS, "none", None, None)
    assert ran
    ref = reference.group_norm(x, G, upcast=True)
    assert (y.double() - ref).abs().max() < 5e-3
    ref_mean, ref_rstd = reference.group_norm_stats(x, G, EPS, upcast=torch.float64)
    assert (mean.double() - ref_mean).abs().max() < 2e-3  # one fp32 ulp of 1e4 is 1e-3
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-3, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype, expect_onepass", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-2MB-falls-back", "bf16-1MB-fits-at-8"])
def test_group_larger_than_a_cluster_falls_back(dtype, expect_onepass):
    """One group of 8·256·256 elements: 2 MB in fp32 is over 8 CTAs' opt-in shared memory
    (8 × ~227 KB), so the multi-launch kernel serves it; 1 MB in bf16 fits (128 KB per CTA)."""
    _check((1, 8, 256, 256), 1, dtype, "contiguous", expect_onepass=expect_onepass)
    _check((1, 8, 256, 256), 1, dtype, "channels_last", expect_onepass=expect_onepass)


@gpu
@needs_cuda
def test_registered_impl_and_explicit_variant_match_the_reference():
    """The callable flashdiff tune times (stats=False) and backend="cuda:onepass" through the API."""
    impl = REGISTRY["group_norm"][0].impls["cuda:onepass"]
    x, w, b, s, t = _inputs((2, 320, 32, 32), torch.bfloat16, "contiguous", True, True)
    ref = reference.group_norm(x, 32, w, b, EPS, "silu", s, t, upcast=True)
    ref_d = reference.group_norm(x, 32, w, b, EPS, "silu", s, t, upcast=False)
    with poisoned_outputs():
        y, mean, rstd = impl(x, 32, w, b, EPS, "silu", s, t, stats=False)
        assert mean is None and rstd is None
        assert_close(y, ref, ref_d, "registered impl")
        y = flashdiff.group_norm(x, 32, w, b, EPS, "silu", s, t, backend="cuda:onepass")
        assert_close(y, ref, ref_d, "backend='cuda:onepass'")


@gpu
@needs_cuda
def test_runs_on_a_side_stream_and_empty_input():
    x, w, b, s, t = _inputs((2, 64, 8, 8), torch.float16, "contiguous", True, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, _, _, ran = gn_mod._cuda_onepass_call(x, 8, w, b, EPS, "gelu", s, t)
    torch.cuda.current_stream().wait_stream(side)
    assert ran
    ref = reference.group_norm(x, 8, w, b, EPS, "gelu", s, t, upcast=True)
    ref_d = reference.group_norm(x, 8, w, b, EPS, "gelu", s, t, upcast=False)
    assert_close(y, ref, ref_d, "side stream")
    empty = torch.empty(0, 64, 8, 8, device="cuda", dtype=torch.float16)
    y, _, _, ran = gn_mod._cuda_onepass_call(empty, 8, None, None, EPS, "none", None, None)
    assert ran and y.shape == empty.shape
