// flashdiff._cpu: pybind11 entry points of the C++ CPU kernels (csrc/cpu/).
//
// Integers only (DESIGN.md decision 1): tensors arrive as data pointers (tensor.data_ptr(),
// 0 = absent), sizes as ints, dtype/activation as the codes of docs/internals.md. No torch
// headers. The kernels validate their parameters and raise ValueError (std::invalid_argument)
// with a message naming the argument; the GIL is released while they run.
//
// ISA dispatch (docs/internals.md, "Decision: one portable CPU binary"): the kernels are
// compiled once per ISA level into flashdiff::cpu::<level> (setup.py defines FD_CPU_HAVE_<LEVEL>
// here for each level it built). At import this file picks the best level the CPU runs
// (cpuid, __builtin_cpu_supports), or the one FLASHDIFF_CPU_ISA names, and every call goes
// through that level's KernelTable. This file itself is compiled without -m flags: it must
// run on any CPU, since it is what decides.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cpu/kernels.h"
#include "flashdiff/params.h"

namespace flashdiff {
namespace cpu {
#define FD_DECLARE_LEVEL_(NS) namespace NS { const KernelTable& kernel_table(); }
#ifdef FD_CPU_HAVE_AVX512BF16
FD_DECLARE_LEVEL_(avx512bf16)
#endif
#ifdef FD_CPU_HAVE_AVX512
FD_DECLARE_LEVEL_(avx512)
#endif
#ifdef FD_CPU_HAVE_AVX2
FD_DECLARE_LEVEL_(avx2)
#endif
#ifdef FD_CPU_HAVE_GENERIC
FD_DECLARE_LEVEL_(generic)
#endif
#ifdef FD_CPU_HAVE_NATIVE
FD_DECLARE_LEVEL_(native)
#endif
#undef FD_DECLARE_LEVEL_
}  // namespace cpu
}  // namespace flashdiff

namespace py = pybind11;
using flashdiff::Activation;
using flashdiff::DType;
using flashdiff::cpu::KernelTable;

namespace {

// ------------------------------------------------------------------ ISA levels and the choice
// Whether this CPU (and its OS, which must save the wider registers: libgcc checks XCR0) runs
// code compiled with setup.py's flags for a level. GCC >= 12 tests the x86-64-vN levels exactly;
// other compilers test the features the kernels' code generation relies on.
#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  return __builtin_cpu_supports("x86-64-v3");
#else
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
#endif
}
bool cpu_has_avx512() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  return __builtin_cpu_supports("x86-64-v4");
#else
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512cd");
#endif
}
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif
bool always() { return true; }

struct Level {
  const char* name;
  bool (*supported)();
  const KernelTable& (*table)();
};

// Best first.
const std::vector<Level>& built_levels() {
  static const std::vector<Level> levels = {
#ifdef FD_CPU_HAVE_AVX512BF16
      {"avx512bf16", &cpu_has_avx512bf16, &flashdiff::cpu::avx512bf16::kernel_table},
#endif
#ifdef FD_CPU_HAVE_AVX512
      {"avx512", &cpu_has_avx512, &flashdiff::cpu::avx512::kernel_table},
#endif
#ifdef FD_CPU_HAVE_AVX2
      {"avx2", &cpu_has_avx2, &flashdiff::cpu::avx2::kernel_table},
#endif
#ifdef FD_CPU_HAVE_GENERIC
      {"generic", &always, &flashdiff::cpu::generic::kernel_table},
#endif
#ifdef FD_CPU_HAVE_NATIVE  // FLASHDIFF_CPU_ARCH=<march>: one level, for the machine it was built for
      {"native", &always, &flashdiff::cpu::native::kernel_table},
#endif
  };
  return levels;
}

std::vector<std::string> level_names(bool supported_only) {
  std::vector<std::string> out;
  for (const Level& l : built_levels())
    if (!supported_only || l.supported()) out.push_back(l.name);
  return out;
}

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// The best supported level, or the one FLASHDIFF_CPU_ISA names (for tests and for ruling out a
// suspect code path). A name that is not built, or that this CPU cannot run, fails the import
// with the reason (flashdiff then reports the cpu backend unavailable) instead of a SIGILL later.
const KernelTable* choose_table() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
  const char* env = std::getenv("FLASHDIFF_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    for (const Level& l : built_levels())
      if (l.supported()) return &l.table();
    throw py::import_error("flashdiff._cpu: this CPU runs none of the ISA levels built (" +
                           join(level_names(false)) + ")");
  }
  for (const Level& l : built_levels()) {
    if (want != l.name) continue;
    if (!l.supported())
      throw py::import_error("flashdiff._cpu: FLASHDIFF_CPU_ISA=" + want + " but this CPU lacks it; it runs: " +
                             join(level_names(true)));
    return &l.table();
  }
  throw py::import_error("flashdiff._cpu: FLASHDIFF_CPU_ISA=" + want + " is not a level of this build (" +
                         join(level_names(false)) + "; or auto)");
}

const KernelTable* g_kernels = nullptr;  // set once at import, before any call

template <typename P>
P* to_ptr(int64_t address, const char* name) {
  if (address < 0)
    throw std::invalid_argument(std::string("flashdiff._cpu: ") + name +
                                " must be a data pointer (int >= 0, 0 = absent), got " +
                                std::to_string(address));
  return reinterpret_cast<P*>(static_cast<uintptr_t>(address));
}

void group_norm_fwd(int64_t x, int64_t y, int64_t weight, int64_t bias, int64_t scale,
                    int64_t shift, int64_t mean_out, int64_t rstd_out, int64_t N, int64_t C,
                    int64_t S, int64_t G, double eps, int activation, bool channels_last,
                    int dtype) {
  flashdiff::GroupNormParams p;
  p.x = to_ptr<const void>(x, "x");
  p.y = to_ptr<void>(y, "y");
  p.weight = to_ptr<const float>(weight, "weight");
  p.bias = to_ptr<const float>(bias, "bias");
  p.scale = to_ptr<const float>(scale, "scale");
  p.shift = to_ptr<const float>(shift, "shift");
  p.mean_out = to_ptr<float>(mean_out, "mean_out");
  p.rstd_out = to_ptr<float>(rstd_out, "rstd_out");
  p.N = N;
  p.C = C;
  p.S = S;
  p.G = G;
  p.eps = static_cast<float>(eps);
  p.activation = static_cast<Activation>(activation);
  p.channels_last = channels_last;
  p.dtype = static_cast<DType>(dtype);
  g_kernels->group_norm_fwd(p);
}

flashdiff::LayerNormParams row_norm_params(int64_t x, int64_t y, int64_t weight, int64_t R,
                                           int64_t D, double eps, int dtype) {
  flashdiff::LayerNormParams p;
  p.x = to_ptr<const void>(x, "x");
  p.y = to_ptr<void>(y, "y");
  p.weight = to_ptr<const float>(weight, "weight");
  p.R = R;
  p.D = D;
  p.eps = static_cast<float>(eps);
  p.dtype = static_cast<DType>(dtype);
  return p;
}

void layer_norm_fwd(int64_t x, int64_t y, int64_t weight, int64_t bias, int64_t scale,
                    int64_t shift, int64_t R, int64_t D, int64_t rows_per_mod, double eps,
                    int activation, int dtype) {
  flashdiff::LayerNormParams p = row_norm_params(x, y, weight, R, D, eps, dtype);
  p.bias = to_ptr<const float>(bias, "bias");
  p.scale = to_ptr<const float>(scale, "scale");
  p.shift = to_ptr<const float>(shift, "shift");
  p.rows_per_mod = rows_per_mod;
  p.activation = static_cast<Activation>(activation);
  g_kernels->layer_norm_fwd(p);
}

void rms_norm_fwd(int64_t x, int64_t y, int64_t weight, int64_t R, int64_t D, double eps,
                  int dtype) {
  g_kernels->rms_norm_fwd(row_norm_params(x, y, weight, R, D, eps, dtype));
}

void scheduler_update(int64_t sample, int64_t model_output, int64_t model_output_uncond,
                      int64_t noise, int64_t prev_x0, int64_t coefs, int64_t prev_sample,
                      int64_t x0_out, int64_t numel, int dtype) {
  flashdiff::SchedulerUpdateParams p;
  p.sample = to_ptr<const void>(sample, "sample");
  p.model_output = to_ptr<const void>(model_output, "model_output");
  p.model_output_uncond = to_ptr<const void>(model_output_uncond, "model_output_uncond");
  p.noise = to_ptr<const void>(noise, "noise");
  p.prev_x0 = to_ptr<const void>(prev_x0, "prev_x0");
  p.coefs = to_ptr<const float>(coefs, "coefs");
  p.prev_sample = to_ptr<void>(prev_sample, "prev_sample");
  p.x0_out = to_ptr<void>(x0_out, "x0_out");
  p.numel = numel;
  p.dtype = static_cast<DType>(dtype);
  g_kernels->scheduler_update(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  g_kernels = choose_table();
  m.doc() = "flashdiff C++ CPU kernels (OpenMP). Pointers are ints (tensor.data_ptr(), 0 = absent); "
            "dtype codes 0 float32, 1 float16, 2 bfloat16; activation 0 none, 1 silu, 2 gelu.";
  m.def("group_norm_fwd", &group_norm_fwd,
        "y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift), stats per (n, group).\n"
        "x, y: [N, C, S] contiguous or [N, S, C] (channels_last); weight, bias [C], scale, shift\n"
        "[N, C], mean_out, rstd_out [N, G]: fp32 or 0.",
        py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("scale"),
        py::arg("shift"), py::arg("mean_out"), py::arg("rstd_out"), py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("G"), py::arg("eps"), py::arg("activation"),
        py::arg("channels_last"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm_fwd", &layer_norm_fwd,
        "y = act((xhat * weight + bias) * (1 + scale) + shift) over rows of D, xhat = (x - mean) * rstd.\n"
        "x, y: [R, D] contiguous; weight, bias [D], scale, shift [R / rows_per_mod, D]: fp32 or 0.",
        py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("scale"),
        py::arg("shift"), py::arg("R"), py::arg("D"), py::arg("rows_per_mod"), py::arg("eps"),
        py::arg("activation"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_fwd", &rms_norm_fwd,
        "y = x * rsqrt(mean(x^2) + eps) * weight over rows of D. x, y: [R, D] contiguous;\n"
        "weight [D] fp32 or 0.",
        py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("R"), py::arg("D"), py::arg("eps"),
        py::arg("dtype"), py::call_guard<py::gil_scoped_release>());
  m.def("scheduler_update", &scheduler_update,
        "The generic sampler update (docs/internals.md); coefs: 12 fp32 values, order SchedCoef.\n"
        "All data tensors dense with identical strides, treated as flat arrays of numel.",
        py::arg("sample"), py::arg("model_output"), py::arg("model_output_uncond"),
        py::arg("noise"), py::arg("prev_x0"), py::arg("coefs"), py::arg("prev_sample"),
        py::arg("x0_out"), py::arg("numel"), py::arg("dtype"),
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", [] { return std::string(g_kernels->isa); },
        "The ISA level whose kernels run: 'avx512bf16', 'avx512', 'avx2' or 'generic' (chosen at\n"
        "import by cpuid, or by FLASHDIFF_CPU_ISA); 'native' for a FLASHDIFF_CPU_ARCH build.");
  m.def("built_isas", [] { return level_names(false); }, "ISA levels compiled into this module, best first.");
  m.def("supported_isas", [] { return level_names(true); },
        "ISA levels compiled in that this CPU runs, best first (values FLASHDIFF_CPU_ISA accepts).");
  m.def("max_threads", [] { return omp_get_max_threads(); },
        "OpenMP threads the kernels use for large inputs.");
}
