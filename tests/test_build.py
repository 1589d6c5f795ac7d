"""The compiled modules: built where their compiler exists, importable without a GPU."""
import importlib
import os
import platform
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


# ---------------------------------------------------------------- portable CPU module (ISA levels)
def _cpu_module_or_skip():
    module, reason = _ext.load_cpu()
    if module is None:
        pytest.skip(f"flashdiff._cpu unavailable: {reason}")
    if not hasattr(module, "isa"):
        pytest.skip("flashdiff._cpu predates ISA dispatch (rebuild: pip install -e .)")
    return module


# Runs in a subprocess under one FLASHDIFF_CPU_ISA: every CPU kernel, hostile shapes, each dtype,
# against the reference with the tolerance rule; prints the level that ran.
_ISA_CHECK = r"""
import torch, flashdiff
from flashdiff import _ext, reference
from flashdiff.testing import assert_close, poisoned_outputs
cpu = _ext.load_cpu()[0]
torch.manual_seed(0)
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for shape, G, cl in [((2, 64, 9, 7), 32, False), ((1, 30, 7, 11), 5, True), ((2, 12, 33), 4, False),
                         ((1, 20, 1, 1), 4, False), ((2, 48, 17, 5), 3, True)]:
        x = (torch.randn(shape) * 2 + 0.5).to(dt)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        C = shape[1]
        w, b, s, t = (torch.randn(C).to(dt), torch.randn(C).to(dt), (0.5 * torch.randn(shape[0], C)).to(dt),
                      torch.randn(shape[0], C).to(dt))
        for act in (None, "silu", "gelu"):
            args = (x, G, w, b, 1e-5, act, s, t)
            with poisoned_outputs():
                y = flashdiff.group_norm(*args, backend="cpu")
            assert_close(y, reference.group_norm(*args, upcast=True), reference.group_norm(*args, upcast=False),
                         f"group_norm {dt} {shape} cl={cl} {act}")
    for shape in [(2, 5, 7), (1, 3, 1152), (3, 1, 4097), (1, 1, 1)]:
        x = (torch.randn(shape) * 2 + 0.5).to(dt)
        D = shape[-1]
        kw = dict(weight=torch.randn(D).to(dt), bias=torch.randn(D).to(dt), scale=(0.5 * torch.randn(shape[0], D)).to(dt),
                  shift=torch.randn(shape[0], D).to(dt), activation="gelu")
        with poisoned_outputs():
            y = flashdiff.layer_norm(x, (D,), **kw, backend="cpu")
        assert_close(y, reference.layer_norm(x, (D,), **kw, upcast=True), reference.layer_norm(x, (D,), **kw, upcast=False),
                     f"layer_norm {dt} {shape}")
        w = torch.randn(D).to(dt)
        with poisoned_outputs():
            y = flashdiff.rms_norm(x, w, backend="cpu")
        assert_close(y, reference.rms_norm(x, w, upcast=True), reference.rms_norm(x, w, upcast=False), f"rms_norm {dt}")
    for shape in [(1,), (2, 4, 9, 7), (3, 70001)]:  # the last one crosses the OpenMP threshold
        xs, c, u, n = (torch.randn(shape).to(dt) for _ in range(4))
        for clip in (float("inf"), 1.5):
            k = torch.tensor([4.5, 1.2, -0.3, clip, 0.1, 0.9, 0.2, 0.5, 0.3, 0.2, 0.1, 0.0])
            with poisoned_outputs():
                prev, x0 = flashdiff.scheduler_update(xs, c, k, model_output_uncond=u, noise=n, return_x0=True,
                                                      backend="cpu")
            ref, ref_x0 = reference.scheduler_update(xs, c, k, model_output_uncond=u, noise=n, upcast=True)
            ref_d, ref_x0_d = reference.scheduler_update(xs, c, k, model_output_uncond=u, noise=n, upcast=False)
            assert_close(prev, ref, ref_d, f"scheduler {dt} {shape} clip={clip}")
            assert_close(x0, ref_x0, ref_x0_d, f"scheduler x0 {dt} {shape}")
            with poisoned_outputs():  # no x0: the folded form where unclipped
                prev = flashdiff.scheduler_update(xs, c, k, model_output_uncond=u, noise=n, backend="cpu")
            assert_close(prev, ref, ref_d, f"scheduler (folded) {dt} {shape} clip={clip}")
print("ISA", cpu.isa())
"""


def _isa_params():
    """One case per ISA level this machine runs (asked of the module at collection time)."""
    module = _ext.load_cpu()[0]
    levels = module.supported_isas() if module is not None and hasattr(module, "supported_isas") else []
    return levels or ["auto"]


@pytest.mark.parametrize("isa", _isa_params())
def test_cpu_kernels_under_each_isa_level(isa):
    """The kernels of every level this CPU runs are correct (a level the build machine would
    never pick by itself, e.g. generic on an AVX-512 server, is still exercised in CI)."""
    _cpu_module_or_skip()
    env = dict(os.environ, FLASHDIFF_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"ISA {isa}" in out.stdout


def test_cpu_isa_is_chosen_by_cpuid_and_can_be_forced():
    module = _cpu_module_or_skip()
    built, supported = module.built_isas(), module.supported_isas()
    assert supported and set(supported) <= set(built)
    assert built[-1] in ("generic", "native")  # the baseline level runs anywhere
    if "FLASHDIFF_CPU_ISA" not in os.environ:
        assert module.isa() == supported[0], "auto must pick the best level this CPU runs"
    # a level this CPU cannot run, or an unknown name, fails the import with the reason
    # (and flashdiff reports the cpu backend unavailable) instead of dying with SIGILL later
    for bad in [name for name in built if name not in supported] + ["avx9000"]:
        code = "import flashdiff; print(flashdiff.backend_status()['cpu'])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, FLASHDIFF_CPU_ISA=bad))
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"FLASHDIFF_CPU_ISA={bad}" in out.stdout, out.stdout


def _strip_nvcc(path):
    """PATH without any directory holding nvcc (the wheel must not need it at run time)."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if d and not os.path.exists(os.path.join(d, "nvcc")))


def test_wheel_builds_installs_and_imports_without_nvcc(tmp_path):
    """`pip wheel` (the CPU module only) from a copy of the source tree, installed into a fresh
    --target directory and imported from there by a process that cannot see nvcc: it must load
    its portable CPU module (no -march=native: built_isas lists every level) and run a kernel.
    ~1.5 minutes on 2 shared cores (the CPU kernels are compiled once per ISA level): not
    marked slow, since it is the only check that the shipped artifact works."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")) or shutil.which("git") is None:
        pytest.skip("needs the source tree and git")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    src = tmp_path / "src"
    for f in filter(None, files):  # a copy: the build must not write into the shared work tree
        if os.path.isfile(os.path.join(root, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(root, f), src / f)
    env = dict(os.environ, FLASHDIFF_CUDA="0")
    env.pop("FLASHDIFF_CPU_ARCH", None)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path / "w"),
                            "--no-build-isolation", "--no-deps", "-q"], capture_output=True, text=True,
                           timeout=1500, env=env)
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = (tmp_path / "w").glob("flashdiff-*.whl")
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-4000:]
    code = (
        "import shutil, torch, flashdiff\n"
        "from flashdiff import _ext\n"
        "assert shutil.which('nvcc') is None\n"
        f"assert flashdiff.__file__.startswith({str(target)!r}), flashdiff.__file__\n"
        "cpu = _ext.load_cpu()[0]\n"
        "assert cpu is not None, _ext.load_cpu()[1]\n"
        "x = torch.randn(2, 8, 5, 5)\n"
        "y = flashdiff.group_norm(x, 4, activation='silu', backend='cpu')\n"
        "torch.testing.assert_close(y, flashdiff.group_norm(x, 4, activation='silu', backend='reference'))\n"
        "print('isa', cpu.isa(), 'built', ','.join(cpu.built_isas()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), PATH=_strip_nvcc(os.environ.get("PATH", "")))
    for var in ("CUDA_HOME", "CUDA_PATH", "FLASHDIFF_CPU_ISA"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-4000:]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "built avx512bf16,avx512,avx2,generic" in out.stdout, out.stdout
