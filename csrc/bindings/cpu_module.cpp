// flashdiff._cpu: pybind11 entry points of the C++ CPU kernels (csrc/cpu/).
//
// Integers only (DESIGN.md decision 1): tensors arrive as data pointers (tensor.data_ptr(),
// 0 = absent), sizes as ints, dtype/activation as the codes of docs/internals.md. No torch
// headers. The kernels validate their parameters and raise ValueError (std::invalid_argument)
// with a message naming the argument; the GIL is released while they run.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../cpu/kernels.h"
#include "flashdiff/params.h"

// Row norms (csrc/cpu/layer_norm.cpp): declared here until kernels.h lists them.
namespace flashdiff {
namespace cpu {
void layer_norm_fwd(const LayerNormParams& params);
void rms_norm_fwd(const LayerNormParams& params);
}  // namespace cpu
}  // namespace flashdiff

namespace py = pybind11;
using flashdiff::Activation;
using flashdiff::DType;

namespace {

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
  flashdiff::cpu::group_norm_fwd(p);
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
  flashdiff::cpu::layer_norm_fwd(p);
}

void rms_norm_fwd(int64_t x, int64_t y, int64_t weight, int64_t R, int64_t D, double eps,
                  int dtype) {
  flashdiff::cpu::rms_norm_fwd(row_norm_params(x, y, weight, R, D, eps, dtype));
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
  flashdiff::cpu::scheduler_update(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
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
  m.def("simd_level", &flashdiff::cpu::simd_level,
        "The SIMD code path compiled in: 'avx512', 'avx2+fma+f16c' or 'generic'.");
  m.def("max_threads", [] { return omp_get_max_threads(); },
        "OpenMP threads the kernels use for large inputs.");
}
