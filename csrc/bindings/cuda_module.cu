// pybind11 entry points of flashdiff._cuda (docs/internals.md "Compiled module bindings").
//
// Integers only: data pointers (tensor.data_ptr(), 0 = null), sizes, strides, dtype and
// activation codes, and the stream (torch.cuda.current_stream().cuda_stream). No torch
// headers, CUDA runtime linked statically: the module imports on a machine without a GPU
// (device_count() is then 0 and device_status() says why).
//
// Each op runs on the device that holds its first data pointer (a device guard switches and
// restores the current device when they differ) and on the caller's stream. Bad arguments and
// CUDA errors raise RuntimeError (pybind11 translates std::runtime_error); empty inputs return
// without a launch. Python (flashdiff.ops) validates shapes, dtypes and devices first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/api.cuh"
#include "../cuda/common.cuh"

namespace py = pybind11;
using flashdiff::Activation;
using flashdiff::DType;

namespace {

template <typename P>
P* as_ptr(std::uintptr_t v) { return reinterpret_cast<P*>(v); }

cudaStream_t as_stream(std::uintptr_t v) { return reinterpret_cast<cudaStream_t>(v); }

DType as_dtype(int code) {
  if (code < 0 || code > 2) {
    throw std::runtime_error("flashdiff._cuda: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                             std::to_string(code));
  }
  return static_cast<DType>(code);
}

// Makes the device that owns `ptr` current for the lifetime of the guard (torch may call us
// from a thread whose current device is another one), and refuses host pointers: a kernel
// fed a host pointer would fault and poison the whole CUDA context.
class DeviceGuard {
 public:
  DeviceGuard(const void* ptr, const char* what) {
    cudaPointerAttributes attr{};
    cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state of this thread
      throw std::runtime_error(std::string("flashdiff._cuda: ") + what + ": cannot query the pointer (" +
                               cudaGetErrorString(err) + ")");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      throw std::runtime_error(std::string("flashdiff._cuda: ") + what + ": the data is not in CUDA device memory");
    }
    FD_CUDA_CHECK(cudaGetDevice(&prev_));
    if (attr.device != prev_) {
      FD_CUDA_CHECK(cudaSetDevice(attr.device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// ------------------------------------------------------------------ device queries
// Architectures this module carries machine code for (host-side view: __CUDA_ARCH_LIST__
// lists virtual architectures, so 90a reads as sm_90).
std::vector<int> compiled_arch_numbers() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  for (int a : compiled_arch_numbers()) out.push_back("sm_" + std::to_string(a / 10));
  return out;
}

// SASS for sm_XY runs on devices of the same major version and minor >= Y (setup.py embeds
// no PTX, so nothing is JIT-compiled for newer majors).
bool runs_on(int major, int minor) {
  for (int a : compiled_arch_numbers()) {
    if (a / 100 == major && (a / 10) % 10 <= minor) return true;
  }
  return false;
}

struct DeviceScan {
  int usable = 0;
  std::string status;
};

DeviceScan scan_devices() {
  DeviceScan s;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    s.status = "no CUDA device: cudaGetDeviceCount returned " + std::to_string(static_cast<int>(err)) + " (" +
               cudaGetErrorString(err) + ")";
    return s;
  }
  if (count == 0) {
    s.status = "no CUDA device: cudaGetDeviceCount found 0 devices";
    return s;
  }
  std::string usable, unusable;
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) {
      cudaGetLastError();
      unusable += " device " + std::to_string(d) + " (properties unavailable);";
      continue;
    }
    std::string desc = "device " + std::to_string(d) + " " + prop.name + " (sm_" + std::to_string(prop.major) +
                       std::to_string(prop.minor) + ")";
    if (runs_on(prop.major, prop.minor)) {
      ++s.usable;
      usable += (usable.empty() ? "" : ", ") + desc;
    } else {
      unusable += (unusable.empty() ? "" : ", ") + desc;
    }
  }
  std::string archs;
  for (const auto& a : compiled_archs()) archs += (archs.empty() ? "" : ", ") + a;
  if (s.usable > 0) {
    s.status = std::to_string(s.usable) + " usable CUDA device(s): " + usable;
    if (!unusable.empty()) s.status += "; not usable (no kernel image for their architecture): " + unusable;
  } else {
    s.status = "no usable CUDA device: this build has kernels for " + archs + " only, found " + unusable +
               "; rebuild with FLASHDIFF_CUDA_ARCHS set to include the device's architecture";
  }
  return s;
}

int device_count() {
  try {
    return scan_devices().usable;
  } catch (...) {
    return 0;
  }
}

std::string device_status() { return scan_devices().status; }

// ------------------------------------------------------------------ ops
void scheduler_update(std::uintptr_t sample, std::uintptr_t model_output, std::uintptr_t model_output_uncond,
                      std::uintptr_t noise, std::uintptr_t prev_x0, std::uintptr_t coefs, std::uintptr_t prev_sample,
                      std::uintptr_t x0_out, int64_t numel, int dtype, std::uintptr_t stream) {
  flashdiff::SchedulerUpdateParams p;
  p.sample = as_ptr<const void>(sample);
  p.model_output = as_ptr<const void>(model_output);
  p.model_output_uncond = as_ptr<const void>(model_output_uncond);
  p.noise = as_ptr<const void>(noise);
  p.prev_x0 = as_ptr<const void>(prev_x0);
  p.coefs = as_ptr<const float>(coefs);
  p.prev_sample = as_ptr<void>(prev_sample);
  p.x0_out = as_ptr<void>(x0_out);
  p.numel = numel;
  p.dtype = as_dtype(dtype);
  if (numel < 0) throw std::runtime_error("flashdiff._cuda: scheduler_update: numel must be >= 0");
  if (numel == 0) return;
  DeviceGuard guard(p.sample, "scheduler_update(sample)");
  flashdiff::cuda::scheduler_update(p, as_stream(stream));
}

// The binding arguments of both group norm entry points, checked, as the kernels' params.
flashdiff::GroupNormParams group_norm_params(const char* name, std::uintptr_t x, std::uintptr_t y,
                                             std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t scale,
                                             std::uintptr_t shift, std::uintptr_t mean_out, std::uintptr_t rstd_out,
                                             int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                                             int activation, bool channels_last, int dtype) {
  if (activation < 0 || activation > 2) {
    throw std::runtime_error(std::string("flashdiff._cuda: ") + name +
                             ": activation must be 0 (none), 1 (silu) or 2 (gelu), got " + std::to_string(activation));
  }
  if (N < 0 || C < 0 || S < 0 || G <= 0) {
    throw std::runtime_error(std::string("flashdiff._cuda: ") + name + ": need N, C, S >= 0 and G > 0");
  }
  flashdiff::GroupNormParams p;
  p.x = as_ptr<const void>(x);
  p.y = as_ptr<void>(y);
  p.weight = as_ptr<const float>(weight);
  p.bias = as_ptr<const float>(bias);
  p.scale = as_ptr<const float>(scale);
  p.shift = as_ptr<const float>(shift);
  p.mean_out = as_ptr<float>(mean_out);
  p.rstd_out = as_ptr<float>(rstd_out);
  p.N = N;
  p.C = C;
  p.S = S;
  p.G = G;
  p.eps = static_cast<float>(eps);
  p.activation = static_cast<Activation>(activation);
  p.channels_last = channels_last;
  p.dtype = as_dtype(dtype);
  return p;
}

void group_norm_fwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                    std::uintptr_t scale, std::uintptr_t shift, std::uintptr_t mean_out, std::uintptr_t rstd_out,
                    int64_t N, int64_t C, int64_t S, int64_t G, double eps, int activation, bool channels_last,
                    int dtype, std::uintptr_t stream) {
  const flashdiff::GroupNormParams p = group_norm_params("group_norm_fwd", x, y, weight, bias, scale, shift, mean_out,
                                                         rstd_out, N, C, S, G, eps, activation, channels_last, dtype);
  if (N == 0 || C == 0 || S == 0) return;  // empty input: nothing to write, no launch
  DeviceGuard guard(p.x ? p.x : p.y, "group_norm_fwd(x)");
  flashdiff::cuda::group_norm_fwd(p, as_stream(stream));
}

// Makes device `dev` current for the lifetime of the guard, from an index Python already holds
// (tensor.device.index): no cudaPointerGetAttributes per call (a driver round trip). Python
// (flashdiff.ops) has already checked that the tensors live on that CUDA device.
class DeviceIndexGuard {
 public:
  explicit DeviceIndexGuard(int dev) {
    FD_CUDA_CHECK(cudaGetDevice(&prev_));
    if (dev != prev_) {
      FD_CUDA_CHECK(cudaSetDevice(dev));
      switched_ = true;
    }
  }
  ~DeviceIndexGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceIndexGuard(const DeviceIndexGuard&) = delete;
  DeviceIndexGuard& operator=(const DeviceIndexGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// group_norm_fwd's arguments plus the device index; true when the one-kernel path ran, false
// (nothing launched) when it cannot serve these inputs and the caller should use group_norm_fwd.
bool group_norm_fwd_onepass(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                            std::uintptr_t scale, std::uintptr_t shift, std::uintptr_t mean_out,
                            std::uintptr_t rstd_out, int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                            int activation, bool channels_last, int dtype, int device, std::uintptr_t stream) {
  const flashdiff::GroupNormParams p = group_norm_params("group_norm_fwd_onepass", x, y, weight, bias, scale, shift,
                                                         mean_out, rstd_out, N, C, S, G, eps, activation,
                                                         channels_last, dtype);
  if (device < 0) throw std::runtime_error("flashdiff._cuda: group_norm_fwd_onepass: device must be >= 0");
  if (N == 0 || C == 0 || S == 0) return true;  // empty input: nothing to write, no launch
  DeviceIndexGuard guard(device);
  return flashdiff::cuda::group_norm_fwd_onepass(p, as_stream(stream));
}

// The binding arguments of both attention entry points, as the kernels' params.
flashdiff::AttentionParams attention_params(const char* name, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                                            std::uintptr_t o, std::uintptr_t lse, std::uintptr_t key_padding_mask,
                                            int64_t B, int64_t H, int64_t Sq, int64_t Skv, int64_t D,
                                            int64_t q_stride_b, int64_t q_stride_h, int64_t q_stride_s,
                                            int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_s,
                                            int64_t v_stride_b, int64_t v_stride_h, int64_t v_stride_s,
                                            int64_t o_stride_b, int64_t o_stride_h, int64_t o_stride_s,
                                            int64_t mask_stride_b, double scale, int dtype) {
  flashdiff::AttentionParams p;
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.o = as_ptr<void>(o);
  p.lse = as_ptr<float>(lse);
  p.key_padding_mask = as_ptr<const uint8_t>(key_padding_mask);
  p.B = B;
  p.H = H;
  p.Sq = Sq;
  p.Skv = Skv;
  p.D = D;
  p.q_stride_b = q_stride_b;
  p.q_stride_h = q_stride_h;
  p.q_stride_s = q_stride_s;
  p.k_stride_b = k_stride_b;
  p.k_stride_h = k_stride_h;
  p.k_stride_s = k_stride_s;
  p.v_stride_b = v_stride_b;
  p.v_stride_h = v_stride_h;
  p.v_stride_s = v_stride_s;
  p.o_stride_b = o_stride_b;
  p.o_stride_h = o_stride_h;
  p.o_stride_s = o_stride_s;
  p.mask_stride_b = mask_stride_b;
  p.scale = static_cast<float>(scale);
  p.dtype = as_dtype(dtype);
  if (B < 0 || H < 0 || Sq < 0 || Skv < 0 || D < 0) {
    throw std::runtime_error(std::string("flashdiff._cuda: ") + name + ": sizes must be >= 0");
  }
  return p;
}

#define FD_ATTENTION_ARGS                                                                                        \
  std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, std::uintptr_t lse,                    \
      std::uintptr_t key_padding_mask, int64_t B, int64_t H, int64_t Sq, int64_t Skv, int64_t D,                 \
      int64_t q_stride_b, int64_t q_stride_h, int64_t q_stride_s, int64_t k_stride_b, int64_t k_stride_h,        \
      int64_t k_stride_s, int64_t v_stride_b, int64_t v_stride_h, int64_t v_stride_s, int64_t o_stride_b,        \
      int64_t o_stride_h, int64_t o_stride_s, int64_t mask_stride_b, double scale, int dtype
#define FD_ATTENTION_PASS                                                                                       \
  q, k, v, o, lse, key_padding_mask, B, H, Sq, Skv, D, q_stride_b, q_stride_h, q_stride_s, k_stride_b,          \
      k_stride_h, k_stride_s, v_stride_b, v_stride_h, v_stride_s, o_stride_b, o_stride_h, o_stride_s,           \
      mask_stride_b, scale, dtype

void attention_fwd(FD_ATTENTION_ARGS, std::uintptr_t stream, int block_rows) {
  const flashdiff::AttentionParams p = attention_params("attention_fwd", FD_ATTENTION_PASS);
  if (block_rows != 64 && block_rows != 128) {  // before any device work: a bad argument is named
    throw std::invalid_argument("attention_fwd: block_rows must be 64 or 128, got " + std::to_string(block_rows));
  }
  if (B == 0 || H == 0 || Sq == 0) return;
  DeviceGuard guard(p.o, "attention_fwd(o)");
  flashdiff::cuda::attention_fwd(p, as_stream(stream), block_rows);
}

// attention_fwd's arguments; true when the cross-attention kernel ran, false (nothing launched)
// where it cannot serve the call and the caller should run attention_fwd.
bool attention_fwd_cross(FD_ATTENTION_ARGS, std::uintptr_t stream) {
  const flashdiff::AttentionParams p = attention_params("attention_fwd_cross", FD_ATTENTION_PASS);
  if (B == 0 || H == 0 || Sq == 0) return true;
  DeviceGuard guard(p.o, "attention_fwd_cross(o)");
  return flashdiff::cuda::attention_fwd_cross(p, as_stream(stream));
}

#undef FD_ATTENTION_ARGS
#undef FD_ATTENTION_PASS

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "flashdiff CUDA kernels (integers in: data pointers, sizes, strides, stream). See docs/internals.md.";
  m.def("device_count", &device_count,
        "Number of CUDA devices this build can run on; 0 without a usable device (never raises).");
  m.def("device_status", &device_status, "One sentence: the usable devices, or why there is none.");
  m.def("compiled_archs", &compiled_archs, "GPU architectures this module carries machine code for.");
  m.def("scheduler_update", &scheduler_update, py::arg("sample"), py::arg("model_output"),
        py::arg("model_output_uncond"), py::arg("noise"), py::arg("prev_x0"), py::arg("coefs"),
        py::arg("prev_sample"), py::arg("x0_out"), py::arg("numel"), py::arg("dtype"), py::arg("stream"),
        "prev (and x0) of the generic affine sampler update; coefs: 12 fp32 on the device.");
  m.def("group_norm_fwd", &group_norm_fwd, py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("mean_out"), py::arg("rstd_out"), py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("G"), py::arg("eps"), py::arg("activation"), py::arg("channels_last"),
        py::arg("dtype"), py::arg("stream"),
        "y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift); stats per (n, group) in fp32.");
  m.def("group_norm_fwd_onepass", &group_norm_fwd_onepass, py::arg("x"), py::arg("y"), py::arg("weight"),
        py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("mean_out"), py::arg("rstd_out"), py::arg("N"),
        py::arg("C"), py::arg("S"), py::arg("G"), py::arg("eps"), py::arg("activation"), py::arg("channels_last"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "group_norm_fwd in one kernel (a thread-block cluster per group, sm_90+); device: the CUDA device "
        "index of the tensors. Returns False, launching nothing, where it cannot serve the inputs.");
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"),
        py::arg("key_padding_mask"), py::arg("B"), py::arg("H"), py::arg("Sq"), py::arg("Skv"), py::arg("D"),
        py::arg("q_stride_b"), py::arg("q_stride_h"), py::arg("q_stride_s"), py::arg("k_stride_b"),
        py::arg("k_stride_h"), py::arg("k_stride_s"), py::arg("v_stride_b"), py::arg("v_stride_h"),
        py::arg("v_stride_s"), py::arg("o_stride_b"), py::arg("o_stride_h"), py::arg("o_stride_s"),
        py::arg("mask_stride_b"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("block_rows") = 64,
        "FlashAttention-2 forward (fp16/bf16, head_dim <= 256); writes o and, if lse != 0, lse. block_rows: "
        "query rows per CTA, 64 (4 warps) or 128 (8 warps; the variant cuda:m128).");
  m.def("attention_fwd_cross", &attention_fwd_cross, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
        py::arg("lse"), py::arg("key_padding_mask"), py::arg("B"), py::arg("H"), py::arg("Sq"), py::arg("Skv"),
        py::arg("D"), py::arg("q_stride_b"), py::arg("q_stride_h"), py::arg("q_stride_s"), py::arg("k_stride_b"),
        py::arg("k_stride_h"), py::arg("k_stride_s"), py::arg("v_stride_b"), py::arg("v_stride_h"),
        py::arg("v_stride_s"), py::arg("o_stride_b"), py::arg("o_stride_h"), py::arg("o_stride_s"),
        py::arg("mask_stride_b"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "attention_fwd for short key sets (Skv <= 256, head_dim <= 160): K and V of a (batch, head) in shared "
        "memory, one softmax pass. Returns False, launching nothing, where it cannot serve the inputs.");
  m.attr("max_head_dim") = flashdiff::cuda::kAttentionMaxHeadDim;
}
