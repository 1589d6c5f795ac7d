"""Config selection of the Triton attention kernels (flashdiff.triton_kernels.attention).

What is checked: the config key (op, dtype, head-dim bucket, mask, Sq / Skv buckets); no timing
on a user's call by default (the nearest tuned key's config, else the heuristic default); tuning
inside `tuning()` (flashdiff tune, the benchmarks) or with FLASHDIFF_AUTOTUNE=1, once per key, so
a new sequence length in a known bucket is not re-tuned; no tuning during CUDA-graph capture,
torch.compile tracing or with FLASHDIFF_AUTOTUNE=0; seeded configs are used as they are; the
table round-trips through JSON. Timing is replaced by
a counting fake (under the interpreter nothing is timed anyway), and every output is still
compared with flashdiff.reference.attention. Runs on a GPU too, where launches are compiled.
"""
import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
pytest.importorskip("triton")

try:
    from flashdiff import reference
    from flashdiff.triton_kernels import _utils as tk_utils
    from flashdiff.triton_kernels import attention as tk_attention
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from flashdiff import reference
    from triton_kernels import _utils as tk_utils
    from triton_kernels import attention as tk_attention

if not torch.cuda.is_available() and not tk_utils.INTERPRET:
    pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 could be set",
                allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D = 32  # one small head dim keeps each interpreter launch well under a second


@pytest.fixture(autouse=True)
def table(monkeypatch):
    """An empty config table for each test, autotuning allowed unless a test says otherwise."""
    fresh = {}
    monkeypatch.setattr(tk_attention, "_TABLE", fresh)
    monkeypatch.setenv("FLASHDIFF_AUTOTUNE", "1")
    return fresh


@pytest.fixture
def timings(monkeypatch):
    """Replaces the timing step: records one entry per timed candidate and returns the next of
    `timings.results` (1.0 once they run out) without launching anything."""
    class Timings(list):
        results = []

    calls = Timings()

    def fake(launch):
        calls.append(launch)
        return calls.results[len(calls) - 1] if len(calls) <= len(calls.results) else 1.0

    monkeypatch.setattr(tk_attention, "_time_config", fake)
    return calls


@pytest.fixture
def launched(monkeypatch):
    """Records the config of every attention kernel launch."""
    cfgs = []
    real = tk_attention._launch

    def record(kernel, grid, args, meta, cfg):
        cfgs.append(dict(cfg))
        real(kernel, grid, args, meta, cfg)

    monkeypatch.setattr(tk_attention, "_launch", record)
    return cfgs


def _inputs(Sq, Skv, masked=False, dtype=torch.float32, d=D):
    q = torch.randn(1, 2, Sq, d, device=DEVICE).to(dtype)
    k = torch.randn(1, 2, Skv, d, device=DEVICE).to(dtype)
    v = torch.randn(1, 2, Skv, d, device=DEVICE).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(1, Skv, device=DEVICE) > 0.3
        mask[0, 0] = True
    return q, k, v, mask


def _fwd_checked(q, k, v, mask=None):
    """attention_fwd, compared with the reference (fp32 inputs: a tight tolerance)."""
    o, _ = tk_attention.attention_fwd(q, k, v, key_padding_mask=mask)
    ref = reference.attention(q, k, v, None if mask is None else mask[:, None, None, :], upcast=True)
    torch.testing.assert_close(o.double(), ref.double(), atol=2e-5, rtol=1e-4)
    return o


def _n_candidates(op="fwd", dtype=torch.float32, d=D):
    return len(tk_attention._candidates(op, dtype, d))


# ---------------------------------------------------------------- the key
def test_attention_config_key_fields():
    """Head-dim bucket, mask presence, dtype and op are in the key; lengths are bucketed."""
    def key(Sq=100, Skv=77, d=64, dtype=torch.float16, masked=False, op="fwd"):
        q = torch.empty(1, 1, Sq, d, dtype=dtype, device="meta")
        k = torch.empty(1, 1, Skv, d, dtype=dtype, device="meta")
        mask = torch.empty(1, Skv, dtype=torch.bool, device="meta") if masked else None
        return tk_attention.config_key(q, k, mask, op=op)

    assert key() == "fwd:float16:d64:nomask:q128:kv128"
    assert key(masked=True) == "fwd:float16:d64:mask:q128:kv128"
    assert key(d=128) != key()
    assert key(d=40) == key()  # same BLOCK_D: the same kernel specialisation
    assert key(dtype=torch.bfloat16) != key()
    assert key(op="dq") == "dq:float16:d64:nomask:q128:kv128"
    assert key(Sq=65, Skv=128) == key()  # same buckets
    assert key(Sq=129) != key()
    assert key(Sq=1, Skv=3) == "fwd:float16:d64:nomask:q64:kv64"  # lower bound
    assert key(Sq=75_000, Skv=1 << 20).endswith(":q16384:kv16384")  # capped
    with pytest.raises(ValueError):
        key(op="bwd")


# ---------------------------------------------------------------- tuning once per key
def test_attention_same_bucket_tunes_once(table, timings):
    """Two query lengths in one bucket share one tuning; the next bucket tunes again."""
    q, k, v, _ = _inputs(40, 33)
    _fwd_checked(q, k, v)
    assert len(timings) == _n_candidates()
    assert list(table) == [tk_attention.config_key(q, k)]
    q2, k2, v2, _ = _inputs(50, 40)  # still q64 / kv64
    _fwd_checked(q2, k2, v2)
    assert len(timings) == _n_candidates() and len(table) == 1
    q3, k3, v3, _ = _inputs(70, 33)  # q128
    _fwd_checked(q3, k3, v3)
    assert len(timings) == 2 * _n_candidates() and len(table) == 2


def test_attention_mask_and_backward_have_their_own_keys(table, timings):
    """A masked call does not reuse the unmasked key; the backward kernels tune their own."""
    q, k, v, mask = _inputs(20, 24, masked=True)
    _fwd_checked(q, k, v)
    _fwd_checked(q, k, v, mask)
    assert set(table) == {tk_attention.config_key(q, k), tk_attention.config_key(q, k, mask)}
    o, lse = tk_attention.attention_fwd(q, k, v, key_padding_mask=mask)
    dq, dk, dv = tk_attention.attention_bwd(torch.ones_like(o), q, k, v, o, lse, key_padding_mask=mask)
    assert set(table) >= {tk_attention.config_key(q, k, mask, op=op) for op in ("dkdv", "dq")}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference.attention(*leaves, mask[:, None, None, :]).sum().backward()
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-4)


def test_attention_fastest_candidate_wins_and_failures_are_skipped(table, timings, launched, monkeypatch):
    cands = [tk_attention._cfg(32, 32, 4, 1), tk_attention._cfg(16, 32, 4, 1), tk_attention._cfg(32, 16, 4, 1)]
    monkeypatch.setattr(tk_attention, "_candidates", lambda op, dtype, head_dim: [dict(c) for c in cands])
    timings.results = [float("inf"), 2.0, 1.0]  # the first does not fit; the last is fastest
    q, k, v, _ = _inputs(20, 24)
    _fwd_checked(q, k, v)
    assert table[tk_attention.config_key(q, k)] == cands[2] and launched == [cands[2]]
    timings.results = [float("inf")] * 6
    q, k, v, _ = _inputs(200, 24)  # a new key where nothing fits
    with pytest.raises(RuntimeError, match="no candidate config fits"):
        tk_attention.attention_fwd(q, k, v)


# ---------------------------------------------------------------- when tuning is not allowed
def _capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def _env_off(monkeypatch):
    monkeypatch.setenv("FLASHDIFF_AUTOTUNE", "0")


@pytest.mark.parametrize("block", [_capturing, _compiling, _env_off], ids=["capture", "compile", "env"])
def test_attention_no_tuning_when_not_allowed(block, table, timings, launched):
    """Capture / tracing / FLASHDIFF_AUTOTUNE=0: the heuristic default, nothing timed or recorded;
    the key is tuned by the first call after that."""
    q, k, v, _ = _inputs(20, 24)
    default = tk_attention.default_config("fwd", q.dtype, D)
    with pytest.MonkeyPatch.context() as mp:
        block(mp)
        assert not tk_attention.autotune_allowed()
        _fwd_checked(q, k, v)
    assert timings == [] and table == {} and launched == [default]
    assert tk_attention.autotune_allowed()
    _fwd_checked(q, k, v)
    assert len(timings) == _n_candidates() and list(table) == [tk_attention.config_key(q, k)]


def test_attention_user_calls_never_time_by_default(table, timings, launched, monkeypatch):
    """No FLASHDIFF_AUTOTUNE and no tuning(): nothing is timed or recorded (a first call must not
    stall for seconds); inside tuning() the key is tuned; FLASHDIFF_AUTOTUNE=0 wins over it."""
    monkeypatch.delenv("FLASHDIFF_AUTOTUNE")
    q, k, v, _ = _inputs(20, 24)
    assert not tk_attention.autotune_allowed()
    _fwd_checked(q, k, v)
    assert timings == [] and table == {} and launched == [tk_attention.default_config("fwd", q.dtype, D)]
    with tk_attention.tuning():
        assert tk_attention.autotune_allowed()
        monkeypatch.setenv("FLASHDIFF_AUTOTUNE", "0")
        assert not tk_attention.autotune_allowed()
        monkeypatch.delenv("FLASHDIFF_AUTOTUNE")
        _fwd_checked(q, k, v)
    assert len(timings) == _n_candidates() and list(table) == [tk_attention.config_key(q, k)]
    assert not tk_attention.autotune_allowed()


def test_attention_untuned_key_takes_the_nearest_tuned_config(table, timings, launched, monkeypatch):
    """A key missing from the table uses the config of the tuned key with the same op, dtype,
    head-dim bucket and mask whose Sq/Skv buckets are closest; another mask or head dim never."""
    monkeypatch.delenv("FLASHDIFF_AUTOTUNE")
    near, far, masked = tk_attention._cfg(16, 16, 4, 1), tk_attention._cfg(32, 16, 4, 1), tk_attention._cfg(16, 32, 4, 1)
    tk_attention.load_tuned_configs({
        "fwd:float32:d32:nomask:q128:kv64": near,
        "fwd:float32:d32:nomask:q1024:kv64": far,
        "fwd:float32:d32:mask:q256:kv64": masked,
        "fwd:float32:d64:nomask:q256:kv64": tk_attention._cfg(32, 32, 4, 1),
    })
    q, k, v, mask = _inputs(200, 24, masked=True)  # q256: one step from q128, two from q1024
    _fwd_checked(q, k, v)
    _fwd_checked(q, k, v, mask)
    assert launched == [near, masked] and timings == []
    assert tk_attention.config_key(q, k) not in tk_attention.tuned_configs()  # not recorded
    tk_attention.load_tuned_configs({"fwd:float32:d32:nomask:q256:kv64": far})  # the memo follows the table
    _fwd_checked(q, k, v)
    assert launched[-1] == far
    q, k, v, _ = _inputs(20, 24, d=16)  # head dim 16: no tuned key of its bucket
    _fwd_checked(q, k, v)
    assert launched[-1] == tk_attention.default_config("fwd", q.dtype, 16)


# ---------------------------------------------------------------- the table API
def test_attention_loaded_config_is_used_without_tuning(table, timings, launched):
    q, k, v, mask = _inputs(20, 24, masked=True)
    seeded = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    tk_attention.load_tuned_configs({tk_attention.config_key(q, k, mask): seeded})
    _fwd_checked(q, k, v, mask)
    assert timings == [] and launched == [seeded]


def test_attention_tuned_configs_json_roundtrip(table, timings):
    q, k, v, mask = _inputs(20, 24, masked=True)
    _fwd_checked(q, k, v, mask)
    tk_attention.load_tuned_configs({"fwd:float16:d128:nomask:q4096:kv128": tk_attention._cfg(128, 64, 4, 3)})
    saved = tk_attention.tuned_configs()
    assert len(saved) == 2
    restored = json.loads(json.dumps(saved))
    tk_attention.load_tuned_configs({}, replace=True)
    assert tk_attention.tuned_configs() == {}
    tk_attention.load_tuned_configs(restored)
    assert tk_attention.tuned_configs() == saved
    tk_attention.tuned_configs()[tk_attention.config_key(q, k, mask)]["BLOCK_M"] = 64
    assert tk_attention.tuned_configs() == saved  # a copy: the table is not changed through it


@pytest.mark.parametrize("bad", [
    {"k": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}},                         # field missing
    {"k": {"BLOCK_M": 48, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}},        # not 2^n
    {"k": {"BLOCK_M": 8, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}},         # < 16
    {"k": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 3, "num_stages": 2}},        # warps not 2^n
    {"k": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": True}},     # bool
    {1: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}},          # key not str
])
def test_attention_load_rejects_bad_tables(bad):
    good = {"fwd:float16:d64:nomask:q64:kv64": tk_attention._cfg(64, 64, 4, 2)}
    tk_attention.load_tuned_configs(good)
    with pytest.raises(ValueError):
        tk_attention.load_tuned_configs({**good, "other": good[next(iter(good))], **bad})
    assert tk_attention.tuned_configs() == good  # all or nothing


# ---------------------------------------------------------------- the config space
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_fwd_candidates_survive_tutorial_prune(d, dtype):
    """Triton's fused-attention tutorial drops num_warps=8 with BLOCK_M·BLOCK_N < 128·128 on
    sm_90 (never the fastest there); the hd ≤ 128 default must not be such a config, and no
    candidate either (it would waste tuning time)."""
    cands = tk_attention._CANDIDATES["fwd"][tk_attention._tier(d, dtype)]
    for c in cands:
        assert not (c["num_warps"] == 8 and c["BLOCK_M"] * c["BLOCK_N"] < 128 * 128), c


def test_attention_nearest_config_follows_a_replaced_table(table, timings, launched, monkeypatch):
    """Replacing the table with one of the same size (another GPU's configs, a reloaded dispatch
    table) must not leave the nearest-config memo answering from the old one."""
    monkeypatch.delenv("FLASHDIFF_AUTOTUNE")
    first, second = tk_attention._cfg(16, 16, 4, 1), tk_attention._cfg(32, 16, 4, 1)
    q, k, v, _ = _inputs(200, 24)  # q256: no exact key below
    tk_attention.load_tuned_configs({"fwd:float32:d32:nomask:q128:kv64": first}, replace=True)
    _fwd_checked(q, k, v)
    tk_attention.load_tuned_configs({"fwd:float32:d32:nomask:q128:kv64": second}, replace=True)
    _fwd_checked(q, k, v)
    assert launched == [first, second]
