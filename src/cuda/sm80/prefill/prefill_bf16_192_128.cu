// The one instantiation of the sm80 expanded-prefill kernel: bf16, q·k 192, v 128.
#include <stdexcept>

#include "cuda/common/check.hpp"
#include "cuda/sm80/prefill/kernel.cuh"

namespace mla::cuda::sm80::prefill {

void run_bf16_192_128(const Params& p, cudaStream_t stream) {
  if (p.n_q == 0) return;
  constexpr size_t bytes = sizeof(SharedMemoryPlan);
  const bool strided = p.k_split != kHeadDimQK;
  if (strided && p.k_split != kStridedSplit) throw std::invalid_argument("prefill: k_split must be 192 or 128");
  auto* kernel = strided ? prefill_kernel<true> : prefill_kernel<false>;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const dim3 grid((p.n_q + kBlockM - 1) / kBlockM, p.heads);
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda::sm80::prefill
