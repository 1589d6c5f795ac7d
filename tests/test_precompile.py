"""The parallel Triton warm-up `flashdiff tune` runs before timing (flashdiff.bench.precompile).

On a GPU its worker processes fill Triton's compile cache; here the same task runs inline under
the interpreter (device "cpu", the tiny preset): every Triton attention variant of a class is
launched once per candidate config and once more with the chosen one, nothing is timed, and the
caller's config table is left as it was and the warm-up's tuning context is closed.
"""
import importlib

import pytest

from flashdiff import _ext
from flashdiff.bench import precompile

from conftest import require_backend


@pytest.fixture
def attention_kernels():
    require_backend("cpu", "triton")
    return importlib.import_module(_ext.load_triton()[0].__name__ + ".attention")


def test_one_task_per_class_dtype_and_variant():
    todo = precompile.tasks(quick=True, device="cpu", dtypes=["fp32", "bf16"])
    variants = {t[2] for t in todo}
    assert {"triton", "triton:v2", "triton:tma"} <= variants
    assert all(v.split(":")[0] == "triton" for v in variants)
    assert len(todo) == len({t[:3] for t in todo})  # no task twice
    assert {t[1] for t in todo} == {"fp32", "bf16"}


def test_a_task_launches_every_candidate_untimed_and_restores_the_table(attention_kernels, monkeypatch):
    seeded = {"fwd:float32:d64:nomask:q4096:kv4096": attention_kernels._cfg(64, 64, 4, 2)}
    attention_kernels.load_tuned_configs(seeded, replace=True)
    launches = []
    real_launch = attention_kernels._launch
    monkeypatch.setattr(attention_kernels, "_launch",
                        lambda kernel, grid, args, meta, cfg: launches.append(cfg) or real_launch(kernel, grid, args, meta, cfg))
    todo = [t for t in precompile.tasks(quick=True, device="cpu", dtypes=["fp32"]) if t[0] == 0]
    try:
        done = [precompile.run_task(t) for t in todo]
    finally:
        table_after = attention_kernels.tuned_configs()
        attention_kernels.load_tuned_configs({}, replace=True)
    assert [err for *_, err in done] == [None] * len(todo), done
    # the interpreter has one candidate per key: the warm-up launch, then the chosen config's launch
    assert len(launches) == 2 * len(todo)
    assert not attention_kernels._TUNING  # the warm-up's tuning() context is closed
    assert table_after == seeded  # warm-up choices are not recorded as measurements


def test_a_failing_task_reports_instead_of_raising(attention_kernels, monkeypatch):
    from flashdiff.backends import REGISTRY

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel today")

    monkeypatch.setitem(REGISTRY["attention"][0].impls, "triton:v2", broken)
    task = next(t for t in precompile.tasks(quick=True, device="cpu", dtypes=["fp32"]) if t[2] == "triton:v2")
    label, impl, seconds, err = precompile.run_task(task)
    assert impl == "triton:v2" and "no such kernel today" in err and seconds >= 0


def test_python_m_flashdiff_is_safe_to_spawn_from():
    """Spawned workers (the precompile pool under `python -m flashdiff tune`) re-run the main
    module as __mp_main__: that must import quietly, not start a second command line."""
    import subprocess
    import sys

    code = "import runpy; runpy.run_module('flashdiff.__main__', run_name='__mp_main__'); print('imported')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stdout + proc.stderr
