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


def test_checks_hold_once_the_eager_fast_paths_are_warm():
    """attention and group_norm skip their checks for a signature that passed them before:
    every difference a check reads must still take the full path and raise."""
    q = torch.randn(1, 2, 8, 16)
    flashdiff.attention(q, q, q)  # warm
    with pytest.raises(ValueError, match="head_dim"):
        flashdiff.attention(q, torch.randn(1, 2, 8, 8), q)
    with pytest.raises(ValueError, match="scale"):
        flashdiff.attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError, match="attn_mask"):
        flashdiff.attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError):
        flashdiff.attention(q, q, q.to(torch.int32))
    x, w = torch.randn(2, 8, 4, 4), torch.randn(8)
    flashdiff.group_norm(x, 4, w, w, 1e-5, "silu")  # warm
    with pytest.raises(ValueError, match="num_groups"):
        flashdiff.group_norm(x, 3, w, w, 1e-5, "silu")
    with pytest.raises(ValueError, match="eps"):
        flashdiff.group_norm(x, 4, w, w, -1.0, "silu")
    with pytest.raises(ValueError, match="weight"):
        flashdiff.group_norm(x, 4, torch.randn(4), w, 1e-5, "silu")
    with pytest.raises(ValueError, match="activation"):
        flashdiff.group_norm(x, 4, w, w, 1e-5, "tanh")
    # and the fast path computes what the full path does
    torch.testing.assert_close(flashdiff.group_norm(x, 4, w, w, 1e-5, "silu"),
                               flashdiff.reference.group_norm(x, 4, w, w, 1e-5, "silu", upcast=False),
                               rtol=1e-4, atol=1e-5)


def test_explain_says_how_gradients_are_computed():
    x = torch.randn(2, 8, 4, 4)
    assert "fp32 reference" in flashdiff.explain("group_norm", x, 4, backend="reference").backward
    assert "SDPA" in flashdiff.explain("attention", x, x, x, backend="torch").backward
    assert "backward:" in str(flashdiff.explain("scheduler_update", x, x, torch.zeros(12)))
