"""Dispatch with reasons: explain(), explicit backends, the global override."""
import pytest
import torch

import flashdiff
from flashdiff import backends


def test_explain_names_the_backend_and_the_skipped_ones():
    x = torch.randn(2, 8, 4, 4).double()  # float64: the kernels refuse it, torch's path serves it
    choice = flashdiff.explain("group_norm", x, 4, activation="silu")
    assert choice.backend == "torch"
    if "cpu" in flashdiff.available_backends():
        assert "float64" in choice.skipped["cpu"]
    assert "group_norm: torch" in str(choice)


def test_explain_validates_like_the_op():
    with pytest.raises(ValueError, match="num_groups"):
        flashdiff.explain("group_norm", torch.randn(2, 8, 4, 4), 3)
    with pytest.raises(ValueError, match="op must be one of"):
        flashdiff.explain("conv", torch.randn(1))


def test_auto_prefers_the_cpu_kernels_on_cpu():
    if "cpu" not in flashdiff.available_backends():
        pytest.skip("flashdiff._cpu not built")
    x = torch.randn(2, 4, 8, 8)
    assert flashdiff.explain("scheduler_update", x, x, torch.zeros(12)).backend == "cpu"
    assert flashdiff.explain("attention", x, x, x).backend == "cpu"


def test_override_forces_a_backend_for_auto_calls_only():
    x = torch.randn(2, 8, 4, 4)
    try:
        flashdiff.set_override("reference")
        assert flashdiff.explain("group_norm", x, 4).backend == "reference"
        flashdiff.set_override("cuda")
        with pytest.raises(NotImplementedError, match="cuda"):
            flashdiff.group_norm(x, 4)
        assert flashdiff.explain("group_norm", x, 4, backend="reference").backend == "reference"
        with pytest.raises(ValueError, match="backend must be one of"):
            flashdiff.set_override("gpu")
    finally:
        flashdiff.set_override(None)


def test_override_from_environment(monkeypatch):
    import subprocess
    import sys

    code = "import torch, flashdiff; print(flashdiff.explain('group_norm', torch.randn(1, 4, 2, 2), 2).backend)"
    env = dict(__import__("os").environ, FLASHDIFF_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "reference", out.stderr


def test_available_backends_always_has_reference():
    assert "reference" in flashdiff.available_backends()
    assert set(flashdiff.backend_status()) == set(backends.BACKENDS)
