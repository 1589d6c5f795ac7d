"""`flashdiff validate` and `flashdiff bench` on this machine (fast, CPU).

validate must pass on the usable backends and must fail when a backend is broken (wrong
values, slightly wrong values, unwritten outputs); bench --quick on the tiny preset must write
valid JSON with the baselines, ratios and ceilings; device_run.sh must stop at once without a GPU.
"""
import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import flashdiff
from flashdiff import bench, presets, validate
from flashdiff.backends import REGISTRY
from flashdiff.commands.bench_validate import add_bench_parser, add_validate_parser

ROOT = Path(__file__).resolve().parents[1]
# Validate the backends native to the CPU (the Triton interpreter has its own tests and is slow).
CPU_BACKENDS = ["reference", "cpu"]


def _cli(argv):
    parser = argparse.ArgumentParser(prog="flashdiff")
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    add_validate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _need_cpu_backend():
    reason = flashdiff.backend_status()["cpu"]
    if reason is not None:
        pytest.skip(f"cpu backend unavailable: {reason}")


# ------------------------------------------------------------------ validate
def test_validate_passes_on_this_machines_backends(tmp_path, capsys):
    out = tmp_path / "validate.json"
    rc = _cli(["validate", "--cases", "1", "--seed", "7", "--backend", *CPU_BACKENDS, "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "OK:" in text and "ratio" in text and "seed 7" in text
    data = json.loads(out.read_text())
    assert data["status"] == 0 and data["seed"] == 7
    assert {c["op"] for c in data["checks"]} == set(validate.OPS)
    assert all(c["status"] in ("pass", "declined") for c in data["checks"])
    assert any(c["status"] == "pass" and c["backend"] == "reference" for c in data["checks"])


def _broken(kind, original):
    def impl(x, *args, **kwargs):
        y, mean, rstd = original(x, *args, **kwargs)
        if kind == "garbage":
            y = torch.randn_like(y) * 100
        elif kind == "slightly-off":  # 1 % too large: far outside the fp32 bound, near the bf16 one
            y = y * 1.01
        elif kind == "unwritten":  # an output the kernel "forgot" to write (NaN under poisoning)
            from flashdiff.ops import _common

            y = _common.new_empty(y)
        return y, mean, rstd
    return impl


@pytest.mark.parametrize("kind", ["garbage", "slightly-off", "unwritten"])
def test_validate_fails_when_a_backend_is_broken(monkeypatch, kind):
    _need_cpu_backend()
    dispatch = REGISTRY["group_norm"][0]
    monkeypatch.setitem(dispatch.impls, "cpu", _broken(kind, dispatch.impls["cpu"]))
    buf = io.StringIO()
    status, checks = validate.run(ops=["group_norm"], backends=["cpu"], dtypes=["fp32"], cases=2,
                                  seed=3, verbose=False, out=buf)
    assert status == 1, buf.getvalue()
    assert "FAILED" in buf.getvalue()
    assert all(c.status == "FAIL" for c in checks), [(c.status, c.detail) for c in checks]


def test_validate_reports_a_crashing_backend(monkeypatch):
    _need_cpu_backend()
    dispatch = REGISTRY["scheduler_update"][0]

    def crash(*args):
        raise RuntimeError("boom")
    monkeypatch.setitem(dispatch.impls, "cpu", crash)
    status, checks = validate.run(ops=["scheduler"], backends=["cpu"], dtypes=["bf16"], cases=1,
                                  seed=1, verbose=False, out=io.StringIO())
    assert status == 1 and checks[0].status == "error" and "boom" in checks[0].detail


def test_validate_exit_status_through_the_cli(monkeypatch, capsys):
    _need_cpu_backend()
    dispatch = REGISTRY["attention"][0]
    original = dispatch.impls["cpu"]
    monkeypatch.setitem(dispatch.impls, "cpu", lambda *a: (original(*a)[0].flip(-1), original(*a)[1]))
    rc = _cli(["validate", "--op", "attention", "--backend", "cpu", "--dtype", "fp32", "--cases", "2",
               "--seed", "5", "--quiet"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


# ------------------------------------------------------------------ bench
def test_bench_quick_tiny_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = _cli(["bench", "--quick", "--preset", "tiny", "--op", "attention", "group_norm", "scheduler",
               "--device", "cpu", "--no-compile", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for header in ("== attention (TFLOP/s", "== group_norm (GB/s", "== scheduler (GB/s", "median ms (q20–q80)"):
        assert header in printed
    data = json.loads(out.read_text())
    assert data["schema"] == bench.SCHEMA
    meta = data["meta"]
    for key in ("date", "git_commit", "cpu", "torch", "triton", "device", "backends"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["quick"] is True
    c = data["ceilings"]
    assert c["copy_gbps"] > 0 and c["matmul_tflops"] > 0 and c["matmul_dtype"] == "fp32"
    timed = [r for r in data["results"] if "median_ms" in r]
    assert timed, data["results"]
    for r in timed:
        assert 0 < r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["value"] > 0 and r["metric"] in ("GB/s", "TFLOP/s")
        if r["role"] != "copy":
            assert r["speedup_vs_best_baseline"] > 0 and r["best_baseline"]
    by_op = {op: [r for r in timed if r["op"] == op] for op in ("attention", "group_norm", "scheduler")}
    assert {r["backend"] for r in by_op["group_norm"]} >= {"torch eager", "copy"}
    assert {r["backend"] for r in by_op["scheduler"]} >= {"torch eager"}
    assert any(r["backend"] == "sdpa" for r in by_op["attention"])
    if flashdiff.backend_status()["cpu"] is None:
        ours = [r for r in timed if r["role"] == "flashdiff"]
        assert ours and all(r.get("check") == "ok" for r in ours)
        assert all("time_vs_copy" in r for r in by_op["group_norm"] if r["role"] == "flashdiff")
    # the Markdown summary and the README table come from the same file
    assert "| group_norm |" in bench.summary_markdown(data)
    spec = importlib.util.spec_from_file_location("fd_plot", ROOT / "benchmarks" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    table = plot.readme_table(plot.load([str(out)]))
    assert "| op | shape |" in table and "commit" in table


def test_bench_flags_a_backend_whose_output_is_wrong(monkeypatch, tmp_path):
    _need_cpu_backend()
    dispatch = REGISTRY["scheduler_update"][0]
    original = dispatch.impls["cpu"]
    monkeypatch.setitem(dispatch.impls, "cpu", lambda *a: (original(*a)[0] * 2, None))
    rc = _cli(["bench", "--quick", "--preset", "tiny", "--op", "scheduler", "--dtype", "fp32",
               "--device", "cpu", "--no-compile", "--json", str(tmp_path / "b.json")])
    assert rc == 1
    data = json.loads((tmp_path / "b.json").read_text())
    assert any(r.get("check") == "MISMATCH" for r in data["results"])


def test_e2e_with_a_missing_model_is_skipped_with_a_reason():
    compiler = bench._Compiler(False, "default", 0.0)
    case = bench.e2e_cases("t", 1, presets.SamplingCase("DiT-does-not-exist", 1, steps=1), torch.float32,
                           "cpu", ["cpu"], compiler)
    records = bench._run_case(case, "cpu", bench.BenchOptions(quick=True), {}, lambda msg: None)
    assert records and all("DiT-does-not-exist" in r["skipped"] for r in records)


def test_presets_cover_the_models_at_batch_1_and_8():
    for name in presets.MODEL_PRESETS:
        p = presets.get(name)
        assert set(p.batches) == {1, 8}
        for b in (1, 8):
            assert p.attention(b) and all(s.B == b for s in p.attention(b))
    assert presets.AttentionShape(2, 3, 5, 7, 11).flops == 4 * 2 * 3 * 5 * 7 * 11
    assert {s.D for s in presets.get("sd15").attention(1)} == {40, 80, 160}
    assert any(s.Skv == 77 for s in presets.get("sdxl").attention(8))
    cpu = presets.get("cpu")
    assert [(s.shape, s.channels_last) for s in cpu.group_norm(1)] == [
        ((2, 320, 64, 64), False), ((1, 640, 32, 32), False), ((2, 1280, 16, 16), False),
        ((2, 320, 64, 64), True)]
    assert [s.shape for s in cpu.scheduler(1)] == [(2, 4, 64, 64), (8, 4, 128, 128)]
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get("sd3")


# ------------------------------------------------------------------ device_run.sh
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_device_run_fails_fast_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh")], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 3
    assert "no NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ e2e
# Tiny stand-ins of the e2e-gpu models: same classes and code paths, CPU-sized configs.
TINY_SD_UNET = (("block_out_channels", (32, 64)), ("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D")), ("layers_per_block", 1),
                ("cross_attention_dim", 32), ("norm_num_groups", 8), ("sample_size", 8))
TINY_DIT = (("input_size", 8), ("hidden_size", 64), ("depth", 2), ("num_heads", 2))


def _e2e_records(s: "presets.SamplingCase", compiler=None):
    case = bench.e2e_cases("e2e-test", s.batch, s, torch.float32, "cpu", bench.flashdiff_backends("cpu"),
                           compiler or bench._Compiler(False, "default", 0.0))
    records = bench._run_case(case, "cpu", bench.BenchOptions(quick=True), {}, lambda msg: None)
    # The runner adds record_fields (steps, per_step_ms) where it calls that hook; else here.
    return [{**case.record_fields(r), **r} if "median_ms" in r else r for r in records]


@pytest.mark.parametrize("model, overrides, label", [("SD1.5-UNet", TINY_SD_UNET, "tiny SD1.5 UNet"),
                                                     ("DiT-XL/2", TINY_DIT, "tiny DiT-XL/2")])
def test_e2e_case_times_the_four_rows(model, overrides, label):
    if model in bench.e2e.DIFFUSERS_MODELS:
        pytest.importorskip("diffusers")
    s = presets.SamplingCase(model, 2, steps=2, label=label, overrides=overrides)
    records = _e2e_records(s)
    assert [r["backend"] for r in records] == list(presets.E2E_ROWS)
    by_row = {r["backend"]: r for r in records}
    for r in records:
        assert r["op"] == "e2e" and r["case"] == label and r["batch"] == 2 and r["dtype"] == "fp32"
        assert r["metric"] == "images/s" and r["shape"] == str(s)
    assert "need a GPU" in by_row["flashdiff patch+graph"]["skipped"]
    assert "torch.compile" in by_row["torch.compile"]["skipped"]  # compile is off in this test
    eager = by_row["torch eager"]
    assert eager["role"] == "baseline" and eager["steps"] == 2
    assert eager["per_step_ms"] == pytest.approx(eager["median_ms"] / 2)
    assert eager["value"] == pytest.approx(2 / (eager["median_ms"] * 1e-3))
    patch = by_row["flashdiff patch"]
    if flashdiff.backend_status()["cpu"] is None:
        assert patch["role"] == "flashdiff" and patch["per_step_ms"] > 0
        assert patch["best_baseline"] == "torch eager" and patch["speedup_vs_best_baseline"] > 0
    else:
        assert "no fused backend" in patch["skipped"]


def test_e2e_patch_switches_the_diffusers_model_back_and_forth():
    pytest.importorskip("diffusers")
    from flashdiff.patching import FlashGroupNorm

    module = bench.load_model("SD1.5-UNet", "cpu", torch.float32, TINY_SD_UNET)
    net = bench.e2e._DiffusersNet.build(module, 1, torch.Generator().manual_seed(0))
    assert net.latent == (4, 8, 8) and net.cond.shape == (2, bench.e2e.CONTEXT_TOKENS, 32)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    with torch.inference_mode():
        eager = net(x, t)
        net.use("patch")
        net.use("patch")  # idempotent: a second row on the same model
        assert any(isinstance(m, FlashGroupNorm) for m in module.modules())
        torch.testing.assert_close(net(x, t), eager, rtol=1e-3, atol=1e-4)
        net.use("eager")
        assert not any(isinstance(m, FlashGroupNorm) for m in module.modules())
        torch.testing.assert_close(net(x, t), eager, rtol=0, atol=0)


def test_e2e_gpu_preset_runs_the_compile_rows_last():
    cases = presets.expand(["e2e-gpu"], "e2e")
    rows = [(b, s.label, s.rows) for _, b, s in cases]
    compile_at = [i for i, (_, _, r) in enumerate(rows) if r == ("torch.compile",)]
    assert len(rows) == 10 and compile_at == [6, 7, 8, 9]
    assert {b for b, _, _ in rows} == {1, 8}
    assert [b for b, _, _ in rows[6:]] == [8, 8, 1, 1]  # batch 8's compiles first
    assert {label for _, label, _ in rows} == {"DiT-XL/2 256px", "SD1.5 UNet 512px", "Flux 3 blocks 1024px"}
    for _, b, s in cases:
        assert s.steps == 10 and s.batch == b and set(s.rows) <= set(presets.E2E_ROWS)
        assert s.compile_mode == ("default" if s.rows == ("torch.compile",) else None)
    for _, _, s in cases[:6]:
        assert set(s.rows) == set(presets.E2E_ROWS) - {"torch.compile"}
    assert bench.e2e.DIFFUSERS_MODELS["SD1.5-UNet"][1]["cross_attention_dim"] == 768
    assert presets.E2E_PRESET == {"cuda": "e2e-gpu", "cpu": "cpu"}


def test_e2e_compile_stops_before_it_would_overrun_the_budget():
    compiler = bench._Compiler(True, "default", 60.0)
    compiler.times["e2e earlier model b8 bf16 (default)"] = 40.0
    compiler.spent_s = 40.0
    s = presets.SamplingCase("DiT-XL/2", 1, steps=1, overrides=TINY_DIT, rows=("torch.compile",))
    (rec,) = _e2e_records(s, compiler)
    assert rec["backend"] == "torch.compile" and "compile budget of 60 s" in rec["skipped"]


def test_bench_e2e_flag_runs_the_e2e_op_alone(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = _cli(["bench", "--e2e", "--quick", "--preset", "tiny", "--device", "cpu", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["meta"]["ops"] == ["e2e"] and {r["op"] for r in data["results"]} == {"e2e"}
    assert {r["backend"] for r in data["results"]} == set(presets.E2E_ROWS)
    assert _cli(["bench", "--e2e", "--op", "attention", "--device", "cpu"]) == 2


def test_e2e_flux_transformer_rows_run_on_a_tiny_config(monkeypatch):
    """The Flux case (guidance-distilled: no CFG batch, flow-matching Euler): eager and patched
    rows sample the same latents on a tiny config; graph capture is skipped with a reason."""
    import torch

    from flashdiff import presets as P
    from flashdiff.bench import e2e
    from flashdiff.bench.core import _Compiler

    pytest.importorskip("diffusers")
    monkeypatch.setattr(e2e, "FLUX_LATENT", (8, 8))
    monkeypatch.setattr(e2e, "FLUX_TEXT_TOKENS", 5)
    tiny = (("num_attention_heads", 2), ("attention_head_dim", 16), ("joint_attention_dim", 32),
            ("pooled_projection_dim", 16), ("axes_dims_rope", (4, 6, 6)), ("in_channels", 8))
    s = P.SamplingCase("Flux-3blocks", 1, steps=2, guidance=1.0, label="tiny flux", overrides=tiny)
    case = e2e.e2e_cases("t", 1, s, torch.float32, "cpu", ["cpu"], _Compiler(False, "default", 10))
    inp = case.setup()
    outs = {}
    with torch.inference_mode():
        for row in case.rows:
            try:
                outs[row.name] = row.make(inp)()
            except e2e.Skip as why:
                outs[row.name] = str(why)
    assert outs["torch eager"].shape == (1, 16, 8)
    torch.testing.assert_close(outs["flashdiff patch"], outs["torch eager"], rtol=1e-4, atol=1e-4)
    assert "GPU" in outs["flashdiff patch+graph"]


def test_masked_attention_cases_pass_the_mask_to_every_row():
    """Padded-prompt attention cases (key-padding masks) time every row with the same mask: the
    flashdiff rows and the SDPA baselines agree on the masked output."""
    import torch

    from flashdiff import presets as P
    from flashdiff.bench.cases import attention_cases
    from flashdiff.bench.core import _Compiler

    s = P.AttentionShape(1, 2, 33, 77, 40, "padded", masked_keys=20)
    assert "mask-20" in str(s)
    case = attention_cases("t", 1, s, torch.float32, "cpu", ["cpu"], _Compiler(False, "default", 1))
    inp = case.setup()
    assert inp["mask"].shape == (1, 1, 1, 77) and int(inp["mask"].sum()) == 57
    outs = {row.name: row.make(inp)() for row in sorted(case.rows, key=lambda r: r.role != "baseline")}
    unmasked = torch.nn.functional.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"])
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["sdpa"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["sdpa"], unmasked)
    assert any(sh.masked_keys for sh in P.get("sd15").attention(1)) and any(
        sh.masked_keys for sh in P.get("flux-1024").attention(1))
