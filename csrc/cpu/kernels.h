// Entry points of the flashdiff._cpu kernels. Each validates its parameter struct (throwing
// std::invalid_argument with a message naming the argument) and returns without work on
// empty input; the pybind11 layer (csrc/bindings/cpu_module.cpp) only fills the structs.
//
// Every csrc/cpu/*.cpp is compiled once per ISA level (setup.py), into the namespace
// flashdiff::cpu::<level> (FD_CPU_ISA, cpu_vec.h). Each level exports its entry points as one
// KernelTable (isa_table.cpp); the bindings pick the table once at import (cpuid).
#pragma once
#include "flashdiff/params.h"

namespace flashdiff {
namespace cpu {

// The entry points of one ISA level.
struct KernelTable {
  const char* isa;  // "avx512bf16", "avx512", "avx2", "generic" (or "native": one-level build)
  // y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift), OpenMP over (sample,
  // group) blocks and, when there are too few blocks for the threads, within each block.
  void (*group_norm_fwd)(const GroupNormParams&);
  // Row norms over the last dim (params.h, LayerNormParams), OpenMP over rows.
  void (*layer_norm_fwd)(const LayerNormParams&);
  void (*rms_norm_fwd)(const LayerNormParams&);
  // The generic sampler update of params.h (SchedulerUpdateParams), OpenMP above 64K elements.
  void (*scheduler_update)(const SchedulerUpdateParams&);
};

#ifdef FD_CPU_ISA  // a kernel translation unit: this level's functions
namespace FD_CPU_ISA {
void group_norm_fwd(const GroupNormParams& params);
void layer_norm_fwd(const LayerNormParams& params);
void rms_norm_fwd(const LayerNormParams& params);
void scheduler_update(const SchedulerUpdateParams& params);
const KernelTable& kernel_table();
}  // namespace FD_CPU_ISA
#endif

}  // namespace cpu
}  // namespace flashdiff
