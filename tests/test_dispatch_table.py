"""Measured dispatch: auto follows a dispatch table where there is one, the documented rule
where there is none, and explain() says which, with the measured ratio.

The tables are keyed by GPU; without a GPU here, the tests give the CPU an identity
(monkeypatching dispatch_table._device_identity) so the same lookup runs on CPU tensors."""
import json

import pytest
import torch

import flashdiff
from flashdiff import dispatch_table
from flashdiff.bench import tune

FAKE_GPU = ("Test GPU 9000", (9, 0))


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """The CPU pretends to be FAKE_GPU; tables are looked for in an empty cache dir."""
    monkeypatch.setattr(dispatch_table, "_device_identity", lambda device: FAKE_GPU)
    monkeypatch.setenv("FLASHDIFF_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASHDIFF_DISPATCH_TABLE", raising=False)
    dispatch_table.reload()
    yield tmp_path
    dispatch_table.reload()


def _table(entries, name=FAKE_GPU[0], capability=FAKE_GPU[1]):
    return {"schema": dispatch_table.SCHEMA, "device": {"name": name, "capability": list(capability)},
            "versions": {"torch": torch.__version__}, "created": "2026-12-01", "entries": entries}


def _step_inputs(numel_shape=(2, 4, 64, 64)):
    x = torch.randn(numel_shape)
    return x, torch.randn(numel_shape), flashdiff.ddim_coefs(0.5, 0.6, guidance_scale=3.0), torch.randn(numel_shape)


def _step_entry(shape, cfg, times, dtype="fp32"):
    x = torch.empty(shape, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
    feats = dispatch_table.scheduler_features(x, x if cfg else None)
    return {"features": feats, "shape": f"{list(shape)} {'cfg' if cfg else ''}", "times_ms": times}


def test_a_table_that_says_torch_is_faster_makes_auto_pick_torch(fake_gpu):
    table = _table({"scheduler_update": [_step_entry((2, 4, 64, 64), True, {"torch": 0.002, "cpu": 0.010})]})
    (fake_gpu / dispatch_table.table_filename(*FAKE_GPU)).write_text(json.dumps(table))
    x, m, coefs, u = _step_inputs()
    choice = flashdiff.explain("scheduler_update", x, m, coefs, u)
    assert choice.backend == "torch"
    assert "5.00x" in choice.source and "cpu" in choice.source  # the measured ratio, vs the runner-up
    y = flashdiff.scheduler_update(x, m, coefs, u)  # and the call really goes there
    ref, _ = flashdiff.reference.scheduler_update(x, m, coefs, u, upcast=False)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_the_nearest_class_decides_and_categorical_features_must_match(fake_gpu):
    entries = [_step_entry((2, 4, 64, 64), True, {"torch": 0.002, "cpu": 0.010}),       # 2^15 elements
               _step_entry((8, 4, 128, 128), True, {"torch": 0.050, "cpu": 0.010})]     # 2^19
    dispatch_table.set_table(*FAKE_GPU, dispatch_table.Table(_table({"scheduler_update": entries}), "test"))
    near_small = _step_inputs((2, 4, 64, 80))
    near_large = _step_inputs((8, 4, 128, 100))
    assert flashdiff.explain("scheduler_update", *near_small).backend == "torch"
    assert flashdiff.explain("scheduler_update", *near_large).backend == "cpu"
    assert "distance" in flashdiff.explain("scheduler_update", *near_large).source
    # no class measured without guidance: the rule decides, and explain says so
    x, m, coefs, _ = near_small
    choice = flashdiff.explain("scheduler_update", x, m, coefs)
    assert choice.backend == "cpu" and "fallback rule" in choice.source


def test_the_fastest_backend_that_supports_the_inputs_wins(fake_gpu):
    """A table entry whose winner cannot take these inputs (float64 here) goes to the next."""
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    feats = dispatch_table.scheduler_features(x, None)
    entry = {"features": feats, "shape": "fp64", "times_ms": {"cpu": 0.001, "torch": 0.004}}
    dispatch_table.set_table(*FAKE_GPU, dispatch_table.Table(_table({"scheduler_update": [entry]}), "test"))
    choice = flashdiff.explain("scheduler_update", x, x, torch.zeros(12, dtype=torch.float64))
    assert choice.backend == "torch" and "float64" in choice.skipped["cpu"]


def test_a_missing_table_falls_back_to_the_documented_rule(fake_gpu):
    x, m, coefs, u = _step_inputs()
    choice = flashdiff.explain("scheduler_update", x, m, coefs, u)
    assert choice.backend == dispatch_table.fallback_order("scheduler_update", "cpu")[0]
    assert "rule" in choice.source
    # the GPU rule prefers torch wherever no fused kernel was measured to win everywhere
    assert dispatch_table.fallback_order("attention", "cuda")[0] == "torch"
    assert dispatch_table.fallback_order("group_norm", "cuda")[0] == "torch"


def test_a_table_of_another_gpu_or_a_broken_file_is_not_used(fake_gpu):
    other = _table({"scheduler_update": [_step_entry((2, 4, 64, 64), True, {"torch": 0.001, "cpu": 1.0})]},
                   name="Some Other GPU")
    path = fake_gpu / dispatch_table.table_filename(*FAKE_GPU)
    path.write_text(json.dumps(other))
    assert dispatch_table.table_for(torch.device("cpu")) is None
    assert "Some Other GPU" in dispatch_table.load_errors()[str(path)]
    dispatch_table.reload()
    path.write_text("{not json")
    x, m, coefs, u = _step_inputs()
    assert flashdiff.explain("scheduler_update", x, m, coefs, u).backend == "cpu"  # the rule, no crash
    assert str(path) in dispatch_table.load_errors()


def test_variants_of_a_backend_can_win(fake_gpu):
    """An SDPA kernel preference ("torch:efficient") is an implementation the table can pick."""
    q = torch.randn(1, 2, 16, 32)
    feats = dispatch_table.attention_features(q, q, None)
    entry = {"features": feats, "shape": "tiny", "times_ms": {"torch:efficient": 0.01, "torch": 0.02, "cpu": 0.03}}
    dispatch_table.set_table(*FAKE_GPU, dispatch_table.Table(_table({"attention": [entry]}), "test"))
    choice = flashdiff.explain("attention", q, q, q)
    assert (choice.backend, choice.impl) == ("torch", "torch:efficient")
    o = flashdiff.attention(q, q, q)
    torch.testing.assert_close(o, flashdiff.reference.attention(q, q, q, upcast=False), rtol=1e-5, atol=1e-5)


def test_tune_writes_a_table_auto_reads(fake_gpu):
    """`flashdiff tune` on the CPU (the machinery; tables are for GPUs): every class has a
    time per implementation that ran, and the table loads and drives auto."""
    table = tune.run_tune(quick=True, device="cpu", ops=["scheduler_update", "group_norm"], dtypes=["fp32"],
                          presets=["tiny"], out=str(fake_gpu / "t.json"), install=False, say=lambda m: None)
    entries = table["entries"]["scheduler_update"]
    assert entries and all(e["times_ms"].get("torch") for e in entries)
    assert all(e["best"] in e["times_ms"] for e in entries)
    loaded = json.loads((fake_gpu / "t.json").read_text())
    loaded["device"] = {"name": FAKE_GPU[0], "capability": list(FAKE_GPU[1])}
    dispatch_table.set_table(*FAKE_GPU, dispatch_table.Table(loaded, "t.json"))
    x = torch.randn(2, 4, 8, 8)
    best = next(e["best"] for e in entries if e["features"] == dispatch_table.scheduler_features(x, x))
    coefs = flashdiff.ddim_coefs(0.5, 0.6, guidance_scale=3.0)
    assert flashdiff.explain("scheduler_update", x, x, coefs, x).impl == best


def test_tune_records_an_implementation_that_disagrees_as_failed(monkeypatch):
    from flashdiff.backends import REGISTRY

    dispatch = REGISTRY["scheduler_update"][0]
    wrong = lambda sample, *args: (sample * 0 + 123.0, None)  # noqa: E731
    monkeypatch.setitem(dispatch.impls, "cpu", wrong)
    x = torch.randn(2, 4, 8, 8)
    inp = {"sample": x, "model_output": x, "coefs": flashdiff.ddim_coefs(0.5, 0.6), "model_output_uncond": None}
    entry = tune.tune_class("scheduler_update", "t", inp, torch.device("cpu"), True, lambda m: None)
    assert entry["times_ms"]["cpu"] is None and "differs" in entry["notes"]["cpu"]
    assert entry["best"] == "torch"


def test_half_precision_classes_stand_in_for_each_other_but_fp32_never(fake_gpu):
    entry = _step_entry((2, 4, 64, 64), True, {"torch": 0.002, "cpu": 0.010}, dtype="bf16")
    dispatch_table.set_table(*FAKE_GPU, dispatch_table.Table(_table({"scheduler_update": [entry]}), "test"))
    x16 = torch.randn(2, 4, 64, 64, dtype=torch.float16)
    coefs = flashdiff.ddim_coefs(0.5, 0.6, guidance_scale=3.0)
    choice = flashdiff.explain("scheduler_update", x16, x16, coefs, x16)
    assert choice.backend == "torch" and "distance 1.00" in choice.source
    x32 = x16.float()
    assert "fallback rule" in flashdiff.explain("scheduler_update", x32, x32, coefs, x32).source


def test_tracing_never_reads_a_table(fake_gpu, monkeypatch):
    """torch.compile(fullgraph=True) traces the op's Python: the choice there is the rule, with
    no file, lock or device query (which would break the graph)."""
    def no_lookup(device):
        raise AssertionError("table_for called while tracing")

    x, m, coefs, u = _step_inputs((2, 4, 8, 8))
    monkeypatch.setattr(dispatch_table, "table_for", no_lookup)
    compiled = torch.compile(lambda x, m, u: flashdiff.scheduler_update(x, m, coefs, u), fullgraph=True)
    y = compiled(x, m, u)
    ref, _ = flashdiff.reference.scheduler_update(x, m, coefs, u)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)


def test_a_class_too_far_away_is_not_a_measurement(fake_gpu):
    entry = _step_entry((2, 4, 64, 64), True, {"torch": 0.002, "cpu": 0.010})   # 2^15 elements
    dispatch_table.set_table(*FAKE_GPU, dispatch_table.Table(_table({"scheduler_update": [entry]}), "test"))
    coefs = flashdiff.ddim_coefs(0.5, 0.6, guidance_scale=3.0)
    near = torch.randn(8, 4, 64, 64)      # 2 doublings away: the table speaks
    far = torch.randn(16, 4, 64, 64)      # 3.0 away: still
    farther = torch.randn(16, 4, 64, 80)  # > 3 away: the rule
    assert flashdiff.explain("scheduler_update", near, near, coefs, near).backend == "torch"
    assert flashdiff.explain("scheduler_update", far, far, coefs, far).backend == "torch"
    choice = flashdiff.explain("scheduler_update", farther, farther, coefs, farther)
    assert choice.backend == "cpu" and "no class" in choice.source


def test_a_variant_can_be_asked_for_by_name_and_a_missing_one_is_refused():
    q = torch.randn(1, 2, 16, 32)
    choice = flashdiff.explain("attention", q, q, q, backend="torch:efficient")
    assert (choice.backend, choice.impl) == ("torch", "torch:efficient")
    torch.testing.assert_close(flashdiff.attention(q, q, q, backend="torch:efficient"),
                               flashdiff.reference.attention(q, q, q, upcast=False), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="no implementation 'torch:nonesuch'"):
        flashdiff.attention(q, q, q, backend="torch:nonesuch")
    with pytest.raises(ValueError, match="backend must be one of"):
        flashdiff.attention(q, q, q, backend="gpu:fast")


def test_the_shipped_h200_table_is_derived_from_the_committed_results():
    """The package's H200 table is what `flashdiff tune --from-results` makes of the committed
    H200 bench run (not edited by hand), and auto reads it on that GPU."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(root, "benchmarks", "results", "2026-11-26-h200-f4190af.json")
    shipped = os.path.join(os.path.dirname(dispatch_table.__file__), "dispatch_tables",
                           dispatch_table.table_filename("NVIDIA H200", (9, 0)))
    with open(results) as f:
        derived = tune.table_from_results(json.load(f), "benchmarks/results/2026-11-26-h200-f4190af.json")
    with open(shipped) as f:
        ship = json.load(f)
    assert ship["entries"] == derived["entries"] and ship["device"] == {"name": "NVIDIA H200", "capability": [9, 0]}
    table = dispatch_table.Table(ship, shipped)
    x = torch.empty(1, 4, 64, 64, dtype=torch.bfloat16, device="meta")
    found = table.lookup("scheduler_update", dispatch_table.scheduler_features(x, x))
    assert found.distance == 0 and found.ranked()[0][0] in ("triton", "cuda")
    q = torch.empty(1, 24, 4608, 128, dtype=torch.bfloat16, device="meta")
    assert table.lookup("attention", dispatch_table.attention_features(q, q, None)).ranked()[0][0] == "torch:cudnn"


def test_shipped_tables_are_found_for_their_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch_table, "_device_identity", lambda device: ("NVIDIA H200", (9, 0)))
    monkeypatch.setenv("FLASHDIFF_CACHE_DIR", str(tmp_path))  # no user table
    dispatch_table.reload()
    try:
        table = dispatch_table.table_for(torch.device("cpu"))
        assert table is not None and "dispatch_tables" in table.origin
    finally:
        dispatch_table.reload()
