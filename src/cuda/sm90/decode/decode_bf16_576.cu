// The one instantiation of the sm90 decode split kernel, and the check that the sm90 kernels can run.
#include <cstdlib>

#include "cuda/common/check.hpp"
#include "cuda/sm90/decode/kernel.cuh"
#include "cuda/sm90/launch.hpp"

namespace mla::cuda::sm90 {

bool usable() {
#ifdef MLA_CUDA_HAS_SM90A
  if (const char* off = std::getenv("MLA_CUDA_DISABLE_SM90"); off && *off && *off != '0') return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

namespace decode {

void launch_split(const sm80::decode::Params& p, dim3 grid, cudaStream_t stream) {
  MLA_CUDA_CHECK(cudaFuncSetAttribute(decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  decode_kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace decode
}  // namespace mla::cuda::sm90
