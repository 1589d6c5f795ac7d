"""pytest-benchmark suite: every case of flashdiff.bench, each row (a flashdiff backend or a
baseline) one benchmark, grouped per case so pytest-benchmark prints them side by side.

    pytest benchmarks/                                   # the device's default presets
    pytest benchmarks/bench_group_norm.py --fd-preset cpu --fd-dtype bf16
    pytest benchmarks/ --fd-preset sd15 --fd-batch 1 --benchmark-json out.json   # on a GPU

The cases, shapes, baselines and byte/FLOP counts come from flashdiff.bench and
flashdiff.presets (the same as `flashdiff bench`). GPU presets are skipped cleanly without
CUDA. On CUDA each timed call is followed by torch.cuda.synchronize() (pytest-benchmark times
host wall-clock), which adds a few µs; `flashdiff bench` (triton.testing.do_bench) is the
precise number. Rates land in each benchmark's extra_info: work, value (GB/s, TFLOP/s or
images/s), fraction_of_ceiling.
"""
import pytest
import torch

from flashdiff import bench, presets


def pytest_addoption(parser):
    g = parser.getgroup("flashdiff benchmarks")
    g.addoption("--fd-preset", action="append", default=None, help="preset name (repeatable)")
    g.addoption("--fd-batch", action="append", type=int, default=None, help="batch size (repeatable)")
    g.addoption("--fd-dtype", action="append", default=None, help="fp32 | fp16 | bf16 (repeatable)")
    g.addoption("--fd-device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    g.addoption("--fd-backend", action="append", default=None, help="flashdiff backend to time (repeatable)")
    g.addoption("--fd-compile", action="store_true", default=None, help="add torch.compile baselines")
    g.addoption("--fd-no-compile", dest="fd_compile", action="store_false")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default pattern is test_*.py); a file named
    on the command line is collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config):
    return config.getoption("--fd-device") or ("cuda" if torch.cuda.is_available() else "cpu")


_COMPILERS = {}


def _compiler(config):
    device = _device(config)
    if device not in _COMPILERS:
        enabled = config.getoption("fd_compile")
        enabled = device == "cuda" if enabled is None else enabled
        mode = "max-autotune-no-cudagraphs" if device == "cuda" else "default"
        _COMPILERS[device] = bench._Compiler(enabled, mode, budget_s=600.0)
    return _COMPILERS[device]


def pytest_generate_tests(metafunc):
    if "case_row" not in metafunc.fixturenames:
        return
    config = metafunc.config
    op = metafunc.module.OP
    device = _device(config)
    if device == "cuda" and not torch.cuda.is_available():
        metafunc.parametrize("case_row", [pytest.param(None, marks=pytest.mark.skip(
            reason="--fd-device cuda: torch sees no CUDA device"))])
        return
    opts = bench.BenchOptions(ops=[op], presets=config.getoption("--fd-preset"),
                              batches=config.getoption("--fd-batch"), dtypes=config.getoption("--fd-dtype"),
                              device=device, backends=config.getoption("--fd-backend"))
    cases = bench.build_cases(opts, device, _compiler(config))
    params = []
    for case in cases:
        # Baselines first, like `flashdiff bench`; all rows of a case share its inputs.
        for row in sorted(case.rows, key=lambda r: r.role == "flashdiff"):
            params.append(pytest.param((case, row), id=f"{case.preset}-b{case.batch}-{case.label}-"
                                                       f"{case.dtype}-{row.name}".replace(" ", "_")))
    if not params:
        params = [pytest.param(None, marks=pytest.mark.skip(reason=f"no {op} case in the chosen presets"))]
    metafunc.parametrize("case_row", params)


_INPUTS = {}  # the current case's inputs only (rows of a case run consecutively)


@pytest.fixture(scope="session")
def ceilings(request):
    """Copy bandwidth and matmul rate, measured once per session when first needed (after
    setting up the allocator every row is timed with: bench.steady_host_allocator)."""
    bench.steady_host_allocator()
    return bench.measure_ceilings(_device(request.config), quick=True)


@pytest.fixture
def bench_row(benchmark, case_row, ceilings, request):
    """Run one row of one case under pytest-benchmark; returns the timed function's output."""
    def run():
        case, row = case_row
        device = _device(request.config)
        if case.id not in _INPUTS:
            _INPUTS.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            try:
                _INPUTS[case.id] = case.setup()
            except bench.Skip as why:
                _INPUTS[case.id] = why
        inp = _INPUTS[case.id]
        if isinstance(inp, bench.Skip):
            pytest.skip(str(inp))
        benchmark.group = f"{case.op} {case.preset} b{case.batch} {case.shape} {case.dtype}"
        benchmark.extra_info.update(role=row.role, metric=case.metric, work=case.work, shape=case.shape)
        with torch.inference_mode():
            try:
                fn = row.make(inp)
            except bench.Skip as why:
                pytest.skip(str(why))
            fn()
            if device == "cuda":
                timed = lambda: (fn(), torch.cuda.synchronize())  # noqa: E731
            else:
                timed = fn
            if case.reps is not None:  # whole sampling loops: a few rounds
                benchmark.pedantic(timed, rounds=case.reps, iterations=1, warmup_rounds=0)
            else:
                benchmark(timed)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            median_s = stats.stats.median
            rate = case.work / median_s
            value = rate / 1e9 if case.metric == "GB/s" else rate / 1e12 if case.metric == "TFLOP/s" else rate
            benchmark.extra_info["value"] = value
            key = {"GB/s": "copy_gbps", "TFLOP/s": "matmul_tflops"}.get(case.metric)
            if key:
                benchmark.extra_info["fraction_of_ceiling"] = value / ceilings[key]
    return run
