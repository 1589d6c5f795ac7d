// Attention forward, head-dim bucket 192 (fp16 and bf16). One file per bucket: the buckets
// compile in parallel (setup.py runs one nvcc per file).
#include "attention_kernel.cuh"

namespace flashdiff {
namespace cuda {
template void run_attention_fwd<__half, 192>(const AttentionParams&, bool, cudaStream_t, int);
template void run_attention_fwd<__nv_bfloat16, 192>(const AttentionParams&, bool, cudaStream_t, int);
}  // namespace cuda
}  // namespace flashdiff
