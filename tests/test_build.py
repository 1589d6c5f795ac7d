"""The compiled modules: built where their compiler exists, importable without a GPU."""
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import flashdiff
from flashdiff import _ext


def test_cpu_module_is_built_where_gxx_exists():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the reference backend serves everything")
    module, reason = _ext.load_cpu()
    assert module is not None, reason
    assert "cpu" in flashdiff.available_backends()


def test_cuda_module_imports_and_reports_no_device():
    module, reason = _ext.load_cuda_module_only()
    if module is None:
        if shutil.which("nvcc") and os.environ.get("FLASHDIFF_CUDA") != "0":
            pytest.fail(f"nvcc is on PATH but flashdiff._cuda did not build/import: {reason}")
        pytest.skip(f"no nvcc: {reason}")
    count = module.device_count()
    assert isinstance(count, int)
    if not torch.cuda.is_available():
        assert count == 0
        status = module.device_status()
        assert "no CUDA device" in status, status
        assert flashdiff.backend_status()["cuda"] is not None


def test_info_command_explains_missing_backends():
    out = subprocess.run([sys.executable, "-m", "flashdiff", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "reference  available" in out.stdout
    for name, reason in flashdiff.backend_status().items():
        if reason is not None:
            assert f"{name}" in out.stdout and "unavailable" in out.stdout


def test_triton_kernels_subpackage_is_installed():
    pytest.importorskip("triton")
    assert importlib.import_module("flashdiff.triton_kernels") is not None
