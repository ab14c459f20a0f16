// The one instantiation of the sm80 decode kernel: bf16, 576/512, both stage counts.
#include "cuda/common/check.hpp"
#include "cuda/sm80/decode/kernel.cuh"

namespace mla::cuda::sm80::decode {

void run_bf16_576(const Params& p, cudaStream_t stream) {
  int device = 0, smem_limit = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const dim3 grid((p.rows + kBlockM - 1) / kBlockM, p.batch, p.splits);
  auto launch = [&](auto kernel, size_t bytes) {
    MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    kernel<<<grid, kThreads, bytes, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
  };
  if (smem_limit >= static_cast<int>(sizeof(SharedMemoryPlan<2>))) launch(decode_kernel<2>, sizeof(SharedMemoryPlan<2>));
  else if (smem_limit >= static_cast<int>(sizeof(SharedMemoryPlan<1>))) launch(decode_kernel<1>, sizeof(SharedMemoryPlan<1>));
  else throw InvalidArgument("decode_attention (cuda): the GPU allows " + std::to_string(smem_limit) +
                             " bytes of shared memory per block; the 576/512 kernel needs " +
                             std::to_string(sizeof(SharedMemoryPlan<1>)));
}

}  // namespace mla::cuda::sm80::decode
