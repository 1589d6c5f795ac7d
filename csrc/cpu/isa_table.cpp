// This ISA level's entry points as one table (kernels.h). Compiled once per level like every
// csrc/cpu/*.cpp; csrc/bindings/cpu_module.cpp picks one table at import.
#include "flashdiff/cpu_vec.h"
#include "kernels.h"

namespace flashdiff {
namespace cpu {
namespace FD_CPU_ISA {

const KernelTable& kernel_table() {
  static const KernelTable table{FD_CPU_ISA_NAME, &group_norm_fwd, &layer_norm_fwd, &rms_norm_fwd,
                                 &scheduler_update};
  return table;
}

}  // namespace FD_CPU_ISA
}  // namespace cpu
}  // namespace flashdiff
