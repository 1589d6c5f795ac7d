"""Build flashdiff: a pure-Python package plus two optional compiled modules.

  flashdiff._cpu   C++ CPU kernels (g++, OpenMP), built on every install where a compiler exists.
  flashdiff._cuda  CUDA C++ kernels (nvcc, static cudart, no torch headers), built when nvcc is found.

Environment switches:
  FLASHDIFF_CUDA=0|1          skip / force the CUDA module (forced: a failure fails the install)
  FLASHDIFF_CUDA_ARCHS="80;90a"  target architectures (default sm_80 and sm_90a)
  FLASHDIFF_CPU_ARCH=native   value of -march for the CPU module ("none" drops the flag)
  FLASHDIFF_BUILD_JOBS=N      parallel nvcc jobs (default: CPU count)

A module that fails to build is not fatal unless forced: the package still installs with the
reference backend, and `flashdiff info` prints why the module is missing (_build_info.json).
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _pybind11_include():
    import pybind11

    return pybind11.get_include()


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_gencode_flags():
    archs = os.environ.get("FLASHDIFF_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    flags = []
    for arch in (a.strip() for a in archs if a.strip()):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


class NvccExtension(Extension):
    """A module compiled and linked by nvcc alone (setuptools does not know .cu files)."""


class BuildExt(build_ext):
    def run(self):
        self.build_info = {}
        super().run()
        out_dir = os.path.dirname(self.get_ext_fullpath("flashdiff._cpu"))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(self.build_info, f, indent=2)

    def build_extension(self, ext):
        name = ext.name.split(".")[-1]
        forced = name == "_cuda" and os.environ.get("FLASHDIFF_CUDA") == "1"
        try:
            if isinstance(ext, NvccExtension):
                self._build_nvcc(ext)
            else:
                super().build_extension(ext)
            self.build_info[name] = {"built": True}
        except Exception as err:  # noqa: BLE001 - any build failure is reported, not fatal
            if forced:
                raise
            msg = f"{type(err).__name__}: {err}"
            print(f"flashdiff: WARNING: {ext.name} was not built ({msg}); "
                  "the package still works with the other backends.", file=sys.stderr)
            self.build_info[name] = {"built": False, "reason": msg[-2000:]}

    def _build_nvcc(self, ext):
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = os.path.join(self.build_temp, "nvcc")
        os.makedirs(tmp, exist_ok=True)
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                  "-I" + INCLUDE, "-I" + _pybind11_include(), "-I" + sysconfig.get_paths()["include"],
                  *_cuda_gencode_flags()]

        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, *common, "-c", os.path.join(ROOT, src), "-o", obj]
            print(" ".join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{proc.stderr[-4000:]}")
            return obj

        jobs = int(os.environ.get("FLASHDIFF_BUILD_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        cmd = [nvcc, "-shared", "-cudart=static", *_cuda_gencode_flags(), *objs, "-o", out]
        print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc link failed:\n{proc.stderr[-4000:]}")


def _extensions():
    march = os.environ.get("FLASHDIFF_CPU_ARCH", "native")
    cpu_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden"]
    if march != "none":
        cpu_flags.append(f"-march={march}")
    exts = [
        Extension(
            "flashdiff._cpu",
            sources=_rel("csrc/cpu/*.cpp") + ["csrc/bindings/cpu_module.cpp"],
            # headers too: an in-place rebuild after editing only cpu_vec.h must not keep stale code
            depends=_rel("csrc/include/flashdiff/*.h") + _rel("csrc/cpu/*.h"),
            include_dirs=[INCLUDE, _pybind11_include()],
            extra_compile_args=cpu_flags,
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]
    want_cuda = os.environ.get("FLASHDIFF_CUDA")
    if want_cuda != "0" and (want_cuda == "1" or _find_nvcc() is not None):
        exts.append(NvccExtension("flashdiff._cuda",
                                  sources=_rel("csrc/cuda/*.cu") + ["csrc/bindings/cuda_module.cu"]))
    return exts


setup(
    packages=find_packages("python") + ["flashdiff.triton_kernels"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
