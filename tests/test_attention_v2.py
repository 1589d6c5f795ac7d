"""Triton attention forward v2 (triton_kernels/attention_v2.py): the dispatch variants
"triton:v2" (pointer loads) and "triton:tma" (K/V through tensor descriptors; the interpreter
emulates them, zero fill past the bounds included).

Against flashdiff.reference.attention with DESIGN.md's rule (flashdiff.testing.assert_close),
outputs poisoned with NaN first; lse against the v1 Triton forward's (the backward reads it).
Without a GPU the kernels run in Triton's interpreter, whose tiles are 32 × 32 (so Skv = 33 and
65 are one past a block); on a GPU the same tests run compiled.
"""
import importlib
import math

import pytest
import torch

import flashdiff
from flashdiff import reference
from flashdiff.testing import assert_attention_grads, assert_close, poisoned_outputs

from conftest import DTYPE_IDS, DTYPES, require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V2 = "triton:v2"
TMA = "triton:tma"
VARIANTS = pytest.mark.parametrize("variant", [V2, TMA], ids=["ptr", "tma"])
# On a GPU every case compiles its own specialisation (~1 s each): the bf16 cases carry the gpu
# mark that benchmarks/device_run.sh selects; `pytest tests/test_attention_v2.py` runs them all.
GPU_DTYPES = pytest.mark.parametrize("dtype", [
    pytest.param(d, id=i, marks=[pytest.mark.gpu] if DEVICE == "cuda" and d is torch.bfloat16 else [])
    for d, i in zip(DTYPES, DTYPE_IDS)])
# the module (flashdiff.ops re-exports the function under the same name)
ops_attention = importlib.import_module("flashdiff.ops.attention")


@pytest.fixture(autouse=True)
def _triton():
    require_backend(DEVICE, "triton")


def _kernels():
    from flashdiff import _ext
    pkg = _ext.load_triton()[0].__name__
    return importlib.import_module(pkg + ".attention_v2"), importlib.import_module(pkg + ".attention")


def _qkv(B, H, Sq, Skv, D, dtype, fused=False):
    if fused:  # views of one [B, S, 3, H, D] projection (DiT/diffusers layout): no copies
        qkv = torch.randn(B, Sq, 3, H, D, device=DEVICE).to(dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(torch.randn(B, H, s, D, device=DEVICE).to(dtype) for s in (Sq, Skv, Skv))


def _run_v2(q, k, v, mask=None, scale=None, variant=V2):
    """The registered variant, with outputs NaN-poisoned (so unwritten elements fail). The tma
    variant must have taken the descriptor path (it falls back silently otherwise)."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if variant == TMA:
        assert _kernels()[0].tma_usable(q, k, v), "these inputs would not exercise the descriptors"
    with poisoned_outputs():
        return ops_attention._dispatch.impls[variant](q, k, v, mask, s)


def _check(q, k, v, mask=None, scale=None, label="", variant=V2):
    o, lse = _run_v2(q, k, v, mask, scale, variant)
    ref = reference.attention(q, k, v, mask, scale, upcast=True)
    ref_d = reference.attention(q, k, v, mask, scale, upcast=False)
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    assert_close(o, ref, ref_d, f"{variant} {q.dtype} {tuple(q.shape)} Skv {k.shape[2]} {label}")
    # lse: the same convention as the v1 forward (attention_bwd reads it): natural log, fp32,
    # +inf for rows without keys. Both compute it in fp32 from the same scores.
    v2mod, v1mod = _kernels()
    kpm = ops_attention.key_padding_mask(mask, q.shape[0], k.shape[2])
    _, lse1 = v1mod.attention_fwd(q, k, v, kpm, scale)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert torch.equal(torch.isinf(lse), torch.isinf(lse1))
    fin = torch.isfinite(lse1)
    torch.testing.assert_close(lse[fin], lse1[fin], atol=1e-4, rtol=1e-5)
    return o, lse


# ---------------------------------------------------------------- head-dim pieces
def test_head_dim_pieces():
    v2mod, _ = _kernels()
    expect = {16: (16, 0, 0), 24: (32, 0, 0), 32: (32, 0, 0), 40: (32, 16, 0), 64: (64, 0, 0),
              72: (64, 16, 0), 80: (64, 16, 0), 96: (64, 32, 0), 112: (64, 32, 16),
              128: (128, 0, 0), 160: (128, 32, 0), 240: (256, 0, 0), 256: (256, 0, 0)}
    for d, pieces in expect.items():
        assert v2mod.head_dim_pieces(d) == pieces, d
    for d in range(1, 257):  # < 16 padded columns, except where Dp = 240 (4 pieces): 256
        p = v2mod.head_dim_pieces(d)
        assert all(x == 0 or x & (x - 1) == 0 for x in p) and sum(p) >= d
        assert sum(p) - d < 16 or (-(-d // 16) * 16 == 240 and sum(p) == 256)


# ---------------------------------------------------------------- forward
# (B, H, Sq, Skv): Sq != Skv everywhere; 33 and 65 are one past an interpreter block of 32
@GPU_DTYPES
@pytest.mark.parametrize("D, shape", [
    (40, (2, 2, 37, 33)), (72, (1, 2, 33, 65)), (80, (1, 1, 17, 33)), (96, (1, 2, 20, 64)),
    (160, (2, 1, 33, 31)), (32, (1, 2, 40, 1)), (64, (1, 2, 64, 65)), (128, (1, 1, 16, 24)),
    (112, (1, 1, 9, 33)),
], ids=lambda x: f"hd{x}" if isinstance(x, int) else "B{}H{}Sq{}Skv{}".format(*x))
@VARIANTS
def test_forward(D, shape, dtype, variant):
    q, k, v = _qkv(*shape, D, dtype)
    _check(q, k, v, variant=variant)


@GPU_DTYPES
@VARIANTS
def test_key_padding_mask_with_fully_masked_row(dtype, variant):
    """Batch 0 keeps 20 of 45 keys (a block boundary inside the kept part), batch 1 none:
    its output is 0 and its lse +inf."""
    q, k, v = _qkv(2, 2, 19, 45, 72, dtype)
    mask = torch.zeros(2, 1, 1, 45, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :20] = True
    mask[0, ..., 40] = True  # a kept key in the tail block
    o, lse = _check(q, k, v, mask, label="key-padding", variant=variant)
    assert torch.all(o[1] == 0) and torch.all(lse[1] == float("inf"))


@VARIANTS
def test_mask_only_in_full_blocks(variant):
    """Skv a multiple of the block (no tail): the mask is applied in the unpeeled loop too."""
    q, k, v = _qkv(2, 1, 33, 64, 40, torch.float32)
    mask = torch.rand(2, 1, 1, 64, device=DEVICE) > 0.5
    mask[:, ..., 0] = True
    mask[1, ..., :32] = False  # the whole first block of batch 1 masked: running max stays -inf
    mask[1, ..., 50] = True
    _check(q, k, v, mask, label="mask-no-tail", variant=variant)


@GPU_DTYPES
@VARIANTS
def test_fused_qkv_views(dtype, variant):
    q, k, v = _qkv(2, 3, 33, 33, 40, dtype, fused=True)
    assert not q.is_contiguous() and q.stride(2) == 3 * 3 * 40
    _check(q, k, v, label="fused-qkv", variant=variant)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
@VARIANTS
def test_scales(scale, variant):
    """Negative scale (the max is taken of −s), zero (uniform weights; masked keys still
    dropped) and a large one."""
    q, k, v = _qkv(1, 2, 17, 40, 80, torch.float32)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    mask[..., 3:9] = False
    _check(q, k, v, mask, scale=scale, label=f"scale {scale}", variant=variant)


@VARIANTS
def test_grid_split_by_batch(monkeypatch, variant):
    """A grid past the launch limit is split by batch; the result is unchanged."""
    v2mod, _ = _kernels()
    monkeypatch.setattr(v2mod, "_GRID_MAX", 5)  # ⌈Sq/16⌉·H = 4 programs per batch: one batch per launch
    q, k, v = _qkv(3, 2, 20, 33, 40, torch.float32)
    mask = torch.rand(3, 1, 1, 33, device=DEVICE) > 0.3
    mask[..., 0] = True
    mask[1] = False
    _check(q, k, v, mask, label="split", variant=variant)


def test_empty_and_keyless():
    v2mod, _ = _kernels()
    q, k, v = _qkv(1, 2, 5, 0, 40, torch.float32)
    o, lse = v2mod.attention_fwd_v2(q, k, v)
    assert torch.all(o == 0) and torch.all(lse == float("inf"))
    o, lse = v2mod.attention_fwd_v2(q[:, :, :0], k, v)
    assert o.shape == (1, 2, 0, 40)


@GPU_DTYPES
@VARIANTS
def test_nan_neighbours_are_never_read(dtype, variant):
    """K/V are views into larger buffers whose rows past Skv and columns past D hold NaN: the
    tail block and the padded head-dim piece must not let them in (the pointer path clamps, the
    descriptor path relies on TMA's zero fill at the view's bounds)."""
    D, Skv = 40, 45  # pieces 32+16 (columns 40..47 are padding), one block and a tail of 13
    big = [torch.full((2, 2, Skv + 19, D + 8), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2)]
    for b in big:
        b[:, :, :Skv, :D] = torch.randn(2, 2, Skv, D, device=DEVICE).to(dtype)
    k, v = (b[:, :, :Skv, :D] for b in big)
    q = torch.randn(2, 2, 21, D, device=DEVICE).to(dtype)
    mask = torch.ones(2, 1, 1, Skv, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 30:] = False
    _check(q, k, v, None, label="nan neighbours", variant=variant)
    _check(q, k, v, mask, label="nan neighbours, masked", variant=variant)


# ---------------------------------------------------------------- the descriptor path
def test_tma_takes_its_own_config_key(monkeypatch):
    """The descriptor path tunes under "fwd_tma:..." (its best tiles and stages may differ)."""
    v2mod, v1mod = _kernels()
    monkeypatch.setattr(v1mod, "_TABLE", {})
    monkeypatch.setenv("FLASHDIFF_AUTOTUNE", "1")
    q, k, v = _qkv(1, 1, 9, 10, 40, torch.float32)
    _run_v2(q, k, v, variant=TMA)
    assert list(v1mod.tuned_configs()) == [v2mod.config_key_v2(q, k, tma=True)]
    assert v2mod.config_key_v2(q, k, tma=True).startswith("fwd_tma:")


def test_tma_broadcast_and_size_one_dims():
    """K/V expanded over the batch (stride 0): TMA cannot address them, the pointer path runs in
    the same call. Size-1 dims with odd strides are addressable (their stride is never used)."""
    v2mod, _ = _kernels()
    q = torch.randn(2, 2, 9, 40, device=DEVICE)
    kv = torch.randn(1, 2, 33, 40, device=DEVICE)
    k, v = kv.expand(2, -1, -1, -1), (kv * 2).expand(2, -1, -1, -1)
    assert not v2mod.tma_usable(q, k, v)
    o, _ = ops_attention._dispatch.impls[TMA](q, k, v, None, 0.2)
    assert_close(o, reference.attention(q, k, v, None, 0.2, upcast=True),
                 reference.attention(q, k, v, None, 0.2, upcast=False), "tma, broadcast K/V")
    one = torch.randn(1, 1, 40, 40, device=DEVICE).as_strided((1, 1, 40, 40), (7, 3, 40, 1))
    assert v2mod.tma_usable(q, one, one)


@pytest.mark.parametrize("layout", [pytest.param(x, marks=[pytest.mark.gpu] if DEVICE == "cuda" else [])
                                    for x in ("bhsd", "bshd", "sbhd", "b1h1")])
def test_tma_any_storage_order(layout):
    """The descriptor path takes [B, H, S, D], diffusers' [B, S, H, D] seen through a transpose,
    sequence-first storage and size-1 dims alike (the descriptor carries the view's own strides)."""
    v2mod, _ = _kernels()
    B, H, S, D = (1, 1, 33, 40) if layout == "b1h1" else (2, 3, 33, 40)

    def make():
        if layout in ("bhsd", "b1h1"):
            return torch.randn(B, H, S, D, device=DEVICE)
        if layout == "bshd":
            return torch.randn(B, S, H, D, device=DEVICE).transpose(1, 2)
        return torch.randn(S, B, H, D, device=DEVICE).permute(1, 2, 0, 3)

    q, k, v = make(), make(), make()
    assert v2mod.tma_usable(q, k, v)
    o, _ = _run_v2(q, k, v, None, 0.3, variant=TMA)
    assert_close(o, reference.attention(q, k, v, None, 0.3, upcast=True),
                 reference.attention(q, k, v, None, 0.3, upcast=False), f"tma {layout}")


def test_tma_rejects_what_it_cannot_address():
    """The descriptor's rules: unit last stride, 16-byte multiple strides and base, 16-byte rows."""
    v2mod, _ = _kernels()
    q = torch.randn(1, 2, 8, 40, device=DEVICE)
    ok = torch.randn(1, 2, 8, 40, device=DEVICE, dtype=torch.float16)
    assert v2mod.tma_usable(q, ok, ok)
    odd_rows = torch.randn(1, 2, 8, 36, device=DEVICE, dtype=torch.float16)  # 72-byte rows
    assert not v2mod.tma_usable(q, odd_rows, odd_rows)
    padded = torch.randn(1, 2, 8, 48, device=DEVICE, dtype=torch.float16)[..., :36]  # 96-byte stride, 72-byte rows
    assert not v2mod.tma_usable(q, padded, padded)
    transposed = ok.transpose(2, 3)  # last dim not contiguous
    assert not v2mod.tma_usable(q, transposed, transposed)
    shifted = torch.randn(1 * 2 * 8 * 40 + 1, device=DEVICE, dtype=torch.float16)[1:].view(1, 2, 8, 40)
    assert not v2mod.tma_usable(q, shifted, shifted)  # base 2 bytes past an aligned address
    narrow = torch.randn(1, 2, 8, 4, device=DEVICE, dtype=torch.float16)  # 8-byte rows
    assert not v2mod.tma_usable(q, narrow, narrow)


@pytest.mark.parametrize("D", [36, 40])
def test_tma_variant_falls_back_where_it_must(D):
    """fp16 head dim 36 (72-byte rows) runs the pointer path under the tma variant; 40 does not."""
    v2mod, _ = _kernels()
    q, k, v = _qkv(1, 2, 20, 33, D, torch.float16)
    assert v2mod.tma_usable(q, k, v) == (D == 40)
    o, _ = ops_attention._dispatch.impls[TMA](q, k, v, None, 1.0 / math.sqrt(D))
    assert_close(o, reference.attention(q, k, v, upcast=True), reference.attention(q, k, v, upcast=False),
                 f"tma variant hd{D}")


# ---------------------------------------------------------------- backward through the custom op
@VARIANTS
def test_backward_through_custom_op(variant):
    """The op runs with backend "triton:v2" / "triton:tma" (as auto passes choice.impl); its lse
    feeds the v1 Triton backward."""
    dtype = torch.float32
    q, k, v = _qkv(1, 2, 23, 33, 40, dtype)
    mask = torch.ones(1, 1, 1, 33, dtype=torch.bool, device=DEVICE)
    mask[..., -5:] = False
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    o, lse = ops_attention._attention_op(*leaves, mask, 1.0 / math.sqrt(40), variant)
    assert lse.shape == q.shape[:3]
    assert_attention_grads(o, leaves, mask, variant)


def test_fake_matches_real_lse_shape():
    """torch.compile traces the fake: for the variant it promises v1's lse shape too."""
    q, k, v = _qkv(1, 2, 7, 9, 40, torch.float32)
    torch.library.opcheck(ops_attention._attention_op, (q, k, v, None, 0.25, V2),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- configs
def test_config_key_and_candidates():
    v2mod, v1mod = _kernels()
    q = torch.empty(1, 1, 100, 40, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 1, 77, 40, dtype=torch.bfloat16, device="meta")
    assert v2mod.config_key_v2(q, k) == "fwd_v2:bfloat16:d48:nomask:q128:kv128"
    for tier, cands in v1mod._CANDIDATES[v2mod.OP].items():
        assert 1 <= len(cands) <= v2mod._MAX_TIMED
        assert len({tuple(c.values()) for c in cands}) == len(cands)  # no config timed twice
        for c in cands:  # Triton's sm_90 tutorial prune holds for every candidate
            assert not (c["num_warps"] == 8 and c["BLOCK_M"] * c["BLOCK_N"] < 128 * 128), (tier, c)
        d = cands[0]  # the untimed default fits registers at the tier's largest head dim
        if tier < 3:
            assert v2mod._regs(d["BLOCK_M"], d["BLOCK_N"], d["num_warps"], v2mod._TIER_DP[tier][1]) <= 224


def test_tuned_v2_configs_share_the_table(monkeypatch):
    """v2 keys land in attention's table, so tuned_configs() (what `flashdiff tune` stores)
    carries them and load_tuned_configs() seeds them back."""
    v2mod, v1mod = _kernels()
    fresh = {}
    monkeypatch.setattr(v1mod, "_TABLE", fresh)
    monkeypatch.setenv("FLASHDIFF_AUTOTUNE", "1")
    q, k, v = _qkv(1, 1, 9, 10, 40, torch.float32)
    _run_v2(q, k, v)
    key = v2mod.config_key_v2(q, k)
    assert key in v1mod.tuned_configs()
    v1mod.load_tuned_configs({key: v1mod.tuned_configs()[key]}, replace=True)
    assert list(v1mod.tuned_configs()) == [key]


def test_registered_as_variant_only():
    """An explicit backend="triton" keeps the v1 kernel; the variant is a table choice."""
    assert V2 in ops_attention._dispatch.impls and TMA in ops_attention._dispatch.impls
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32)
    assert flashdiff.explain("attention", q, k, v, backend="triton").impl == "triton"
