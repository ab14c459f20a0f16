// The one instantiation of the sm90 expanded-prefill kernel: bf16, q·k 192, v 128.
#include "cuda/common/check.hpp"
#include "cuda/sm90/launch.hpp"
#include "cuda/sm90/prefill/kernel.cuh"

namespace mla::cuda::sm90::prefill {

void run_bf16_192_128(const Params& p, cudaStream_t stream) {
  if (p.n_q == 0) return;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  const dim3 grid((p.n_q + kBlockM - 1) / kBlockM, p.heads);
  prefill_kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda::sm90::prefill
