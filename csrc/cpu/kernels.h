// Entry points of the flashdiff._cpu kernels. Each validates its parameter struct (throwing
// std::invalid_argument with a message naming the argument) and returns without work on
// empty input; the pybind11 layer (csrc/bindings/cpu_module.cpp) only fills the structs.
#pragma once
#include <string>

#include "flashdiff/params.h"

namespace flashdiff {
namespace cpu {

// y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift), OpenMP over (sample, group)
// blocks and, when there are too few blocks for the threads, within each block.
void group_norm_fwd(const GroupNormParams& params);

// The generic sampler update of params.h (SchedulerUpdateParams), OpenMP above 64K elements.
void scheduler_update(const SchedulerUpdateParams& params);

// "avx512" / "avx2+fma+f16c" / "generic": the SIMD code path this module was compiled for.
std::string simd_level();

}  // namespace cpu
}  // namespace flashdiff
