// FD_DTYPE_SWITCH for the CPU kernels: the shared switch (flashdiff/static_switch.h) with the
// CPU's 16-bit storage types. Same arity as the CUDA one (csrc/cuda/common.cuh).
//   FD_DTYPE_SWITCH(params.dtype, T, [&] { kernel<T>(params); });
#pragma once
#include "flashdiff/cpu_vec.h"
#include "flashdiff/static_switch.h"

#define FD_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...) \
  FD_DTYPE_SWITCH_AS(DTYPE, TYPE_NAME, ::flashdiff::cpu::Half, ::flashdiff::cpu::BFloat16, "flashdiff._cpu", __VA_ARGS__)
