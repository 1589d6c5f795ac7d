"""Build flashdiff: a pure-Python package plus two optional compiled modules.

  flashdiff._cpu   C++ CPU kernels (g++, OpenMP), built on every install where a compiler exists.
                   Portable: on x86-64 the kernels are compiled once per ISA level (AVX-512 with
                   and without BF16, AVX2, baseline x86-64) and chosen by cpuid at import.
  flashdiff._cuda  CUDA C++ kernels (nvcc, static cudart, no torch headers), built when nvcc is found.

Environment switches:
  FLASHDIFF_CUDA=0|1          skip / force the CUDA module (forced: a failure fails the install)
  FLASHDIFF_CUDA_ARCHS="80;90a"  target architectures (default sm_80 and sm_90a)
  FLASHDIFF_CUDA_PTX=90       virtual architecture of the embedded PTX (default: the highest of
                              FLASHDIFF_CUDA_ARCHS without its "a"; "none": no PTX)
  FLASHDIFF_CPU_ARCH=portable  the CPU module's ISA levels: "portable" (default) builds every level
                              and dispatches at run time; any other value builds one level with
                              -march=<value> for this machine only ("native"; "none": no flag)
  FLASHDIFF_BUILD_JOBS=N      parallel nvcc jobs (default: CPU count)

A module that fails to build is not fatal unless forced: the package still installs with the
reference backend, and `flashdiff info` prints why the module is missing (_build_info.json).
"""
import glob
import json
import os
import platform
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
    """SASS for each target architecture, plus PTX of one *portable* virtual architecture for
    devices newer than all of them (the driver JIT-compiles it once, then caches it).

    Why compute_90 PTX: arch-specific PTX (compute_90a) runs on sm_90 only, so it would not
    reach a newer GPU at all; compute_90 keeps the sm_90 paths (thread-block clusters, the
    one-pass group norm) that compute_80 PTX would compile out, and no kernel here uses a
    90a-only instruction (wgmma, setmaxnreg)."""
    archs = os.environ.get("FLASHDIFF_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    archs = [a.strip() for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    ptx = os.environ.get("FLASHDIFF_CUDA_PTX", "")
    if not ptx and archs:
        ptx = str(max(int(a.rstrip("af")) for a in archs))
    if ptx and ptx != "none":
        flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


# The CPU module's ISA levels on x86-64, best first, with their compiler flags. Each
# csrc/cpu/*.cpp is compiled once per level with -DFD_CPU_ISA=<level> (its code then lives in
# the namespace flashdiff::cpu::<level>, so the copies never collide), and
# csrc/bindings/cpu_module.cpp picks the best level this CPU runs at import. avx512bf16 is a
# level of its own because the bf16 stores use vcvtneps2bf16 (Zen 4+, Sapphire Rapids+), which
# Skylake-X and Ice Lake servers lack; those run the avx512 level.
X86_CPU_LEVELS = [
    ("avx512bf16", ["-march=x86-64-v4", "-mavx512bf16"]),
    ("avx512", ["-march=x86-64-v4"]),
    ("avx2", ["-march=x86-64-v3"]),
    ("generic", ["-march=x86-64"]),
]


def _cpu_levels():
    arch = os.environ.get("FLASHDIFF_CPU_ARCH", "portable")
    if arch != "portable":  # this machine only (the binary may SIGILL elsewhere)
        return [("native", [] if arch == "none" else [f"-march={arch}"])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_CPU_LEVELS
    return [("generic", [])]  # other architectures: the compiler's default target


class CpuExtension(Extension):
    """flashdiff._cpu: `kernel_sources` compiled once per ISA level in `levels`, then linked
    with `sources` (the bindings and dispatcher, compiled without -m flags)."""

    def __init__(self, name, kernel_sources, levels, **kwargs):
        super().__init__(name, **kwargs)
        self.kernel_sources = kernel_sources
        self.levels = levels


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
                self.build_info[name] = {"built": True}
            elif isinstance(ext, CpuExtension):
                self._build_cpu(ext)
                self.build_info[name] = {"built": True, "isas": [lvl for lvl, _ in ext.levels]}
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

    def _build_cpu(self, ext):
        """Compile the kernels per ISA level (in parallel), then let setuptools compile the
        bindings and link everything."""
        jobs = [(lvl, flags, src) for lvl, flags in ext.levels for src in ext.kernel_sources]
        for lvl, _, src in jobs:  # distutils' mkpath cache is not thread-safe: create dirs first
            os.makedirs(os.path.join(self.build_temp, lvl, os.path.dirname(src)), exist_ok=True)

        def compile_one(job):
            lvl, flags, src = job
            return self.compiler.compile(
                [src], output_dir=os.path.join(self.build_temp, lvl), macros=[("FD_CPU_ISA", lvl)],
                # -g0: four copies of the kernels' debug info made the module 28 MB and its
                # build slower, for symbols a user of the wheel never reads. -Wno-psabi: g++
                # notes that 64-byte vectors (channel_coefs' doubles) pass differently without
                # AVX-512; they never cross a call boundary between levels.
                include_dirs=ext.include_dirs, extra_postargs=ext.extra_compile_args + flags + ["-g0", "-Wno-psabi"],
                depends=ext.depends)

        n = int(os.environ.get("FLASHDIFF_BUILD_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
            objects = [obj for objs in pool.map(compile_one, jobs) for obj in objs]
        # Link order: the baseline level first. Code that every level instantiates outside our
        # namespaces (libstdc++ templates: std::vector<float>, ...) is kept once, from the first
        # object that has it; that copy must run on any CPU.
        by_level = {lvl: [o for (l2, _, _), o in zip(jobs, objects) if l2 == lvl] for lvl, _ in ext.levels}
        ext.extra_objects = [o for lvl, _ in reversed(ext.levels) for o in by_level[lvl]]
        ext.define_macros = [(f"FD_CPU_HAVE_{lvl.upper()}", "1") for lvl, _ in ext.levels]
        super().build_extension(ext)

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
    cpu_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden"]
    exts = [
        CpuExtension(
            "flashdiff._cpu",
            kernel_sources=_rel("csrc/cpu/*.cpp"),
            levels=_cpu_levels(),
            sources=["csrc/bindings/cpu_module.cpp"],
            # headers and kernels too: an in-place rebuild after editing only cpu_vec.h or a
            # kernel must not keep stale code
            depends=_rel("csrc/include/flashdiff/*.h") + _rel("csrc/cpu/*.h") + _rel("csrc/cpu/*.cpp"),
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
