// Compile-time specialisation switches shared by the CPU and CUDA kernels (the flash-attention
// static_switch.h pattern): a run-time code selects one instantiation of a single templated
// kernel, so there are no per-dtype or per-flag copies of a kernel.
//
//   FD_BOOL_SWITCH(params.noise != nullptr, kHasNoise, [&] { kernel<kHasNoise>(params); });
//   FD_ACTIVATION_SWITCH(params.activation, kAct, [&] { kernel<kAct>(params); });
//   FD_DTYPE_SWITCH_AS(params.dtype, T, Float16Type, BFloat16Type, "flashdiff._cpu", [&] { ... });
// Each backend names its 16-bit types once (csrc/cpu/dtype_switch.h, csrc/cuda/common.cuh), both as
// FD_DTYPE_SWITCH(dtype, TYPE_NAME, [&] { ... }).
#pragma once
#include <stdexcept>
#include <string>

#include "flashdiff/params.h"

#define FD_BOOL_SWITCH(COND, CONST_NAME, ...)   \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

#define FD_DTYPE_SWITCH_AS(DTYPE, TYPE_NAME, F16_TYPE, BF16_TYPE, WHO, ...)                    \
  [&] {                                                                                        \
    switch (DTYPE) {                                                                           \
      case ::flashdiff::DType::kFloat32: { using TYPE_NAME = float; return __VA_ARGS__(); }     \
      case ::flashdiff::DType::kFloat16: { using TYPE_NAME = F16_TYPE; return __VA_ARGS__(); }  \
      case ::flashdiff::DType::kBFloat16: { using TYPE_NAME = BF16_TYPE; return __VA_ARGS__(); } \
    }                                                                                          \
    throw std::invalid_argument(std::string(WHO) + ": dtype code must be 0 (float32), "        \
                                "1 (float16) or 2 (bfloat16), got " +                          \
                                std::to_string(static_cast<int>(DTYPE)));                      \
  }()

#define FD_ACTIVATION_CASE_(VALUE, CONST_NAME, ...)                                  \
  case VALUE: {                                                                      \
    constexpr static ::flashdiff::Activation CONST_NAME = VALUE;                     \
    return __VA_ARGS__();                                                            \
  }

#define FD_ACTIVATION_SWITCH(ACT, CONST_NAME, ...)                                   \
  [&] {                                                                              \
    switch (ACT) {                                                                   \
      FD_ACTIVATION_CASE_(::flashdiff::Activation::kNone, CONST_NAME, __VA_ARGS__)   \
      FD_ACTIVATION_CASE_(::flashdiff::Activation::kSilu, CONST_NAME, __VA_ARGS__)   \
      FD_ACTIVATION_CASE_(::flashdiff::Activation::kGelu, CONST_NAME, __VA_ARGS__)   \
    }                                                                                \
    throw std::invalid_argument("flashdiff: activation code must be 0 (none), "      \
                                "1 (silu) or 2 (gelu), got " +                       \
                                std::to_string(static_cast<int>(ACT)));              \
  }()
