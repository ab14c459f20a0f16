// The one instantiation of the sm80 expanded-prefill kernel: bf16, q·k 192, v 128.
#include "cuda/common/check.hpp"
#include "cuda/sm80/prefill/kernel.cuh"

namespace mla::cuda::sm80::prefill {

void run_bf16_192_128(const Params& p, cudaStream_t stream) {
  if (p.n_q == 0) return;
  constexpr size_t bytes = sizeof(SharedMemoryPlan);
  MLA_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const dim3 grid((p.n_q + kBlockM - 1) / kBlockM, p.heads);
  prefill_kernel<<<grid, kThreads, bytes, stream>>>(p);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda::sm80::prefill
