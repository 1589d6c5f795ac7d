// Compile-time specialisation switches (the flash-attention static_switch.h pattern): a run-time
// code selects one instantiation of a single templated kernel, so there are no per-dtype or
// per-flag copies of a kernel.
//
//   FD_DTYPE_SWITCH(params.dtype, T, [&] { kernel<T>(params); });
//   FD_BOOL_SWITCH(params.noise != nullptr, kHasNoise, [&] { kernel<kHasNoise>(params); });
#pragma once
#include <stdexcept>
#include <string>

#include "flashdiff/cpu_vec.h"
#include "flashdiff/params.h"

#define FD_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                        \
    if (COND) {                                \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static bool CONST_NAME = false;\
      return __VA_ARGS__();                    \
    }                                          \
  }()

#define FD_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                                        \
  [&] {                                                                               \
    switch (DTYPE) {                                                                  \
      case ::flashdiff::DType::kFloat32: {                                            \
        using TYPE_NAME = float;                                                      \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::flashdiff::DType::kFloat16: {                                            \
        using TYPE_NAME = ::flashdiff::cpu::Half;                                     \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::flashdiff::DType::kBFloat16: {                                           \
        using TYPE_NAME = ::flashdiff::cpu::BFloat16;                                 \
        return __VA_ARGS__();                                                         \
      }                                                                               \
    }                                                                                 \
    throw std::invalid_argument("flashdiff._cpu: dtype code must be 0 (float32), "    \
                                "1 (float16) or 2 (bfloat16), got " +                 \
                                std::to_string(static_cast<int>(DTYPE)));             \
  }()

#define FD_ACTIVATION_SWITCH(ACT, CONST_NAME, ...)                                    \
  [&] {                                                                               \
    switch (ACT) {                                                                    \
      case ::flashdiff::Activation::kNone: {                                          \
        constexpr static ::flashdiff::Activation CONST_NAME =                         \
            ::flashdiff::Activation::kNone;                                           \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::flashdiff::Activation::kSilu: {                                          \
        constexpr static ::flashdiff::Activation CONST_NAME =                         \
            ::flashdiff::Activation::kSilu;                                           \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::flashdiff::Activation::kGelu: {                                          \
        constexpr static ::flashdiff::Activation CONST_NAME =                         \
            ::flashdiff::Activation::kGelu;                                           \
        return __VA_ARGS__();                                                         \
      }                                                                               \
    }                                                                                 \
    throw std::invalid_argument("flashdiff._cpu: activation code must be 0 (none), "  \
                                "1 (silu) or 2 (gelu), got " +                        \
                                std::to_string(static_cast<int>(ACT)));               \
  }()
