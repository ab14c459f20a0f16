// The sm90 decode split kernel's instantiations (page sizes >= 64 read in one box per K block, 16 and 32 in
// boxes of 16 rows), the tensor map it reads the cache through, and the check that the sm90 kernels can run.
#include <cstdlib>
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/sm90/decode/kernel.cuh"
#include "cuda/sm90/launch.hpp"
#include "cuda/sm90/tensor_map.hpp"
#include "mla/error.hpp"

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
namespace {

// The page pool as a 2-D tensor [num_pages · page_size rows, 576] read in [box_rows, 64] boxes with the 128-byte
// swizzle the kernel's shared-memory tiles use.
CUtensorMap kv_tensor_map(const Params& p, int box_rows) {
  const auto rows = static_cast<uint64_t>(p.num_pages) << p.page_size_log2;
  if (p.num_pages < 1 || rows > (uint64_t{1} << 31))
    throw InvalidArgument("decode_attention (cuda): the page pool must hold between 1 and 2^31 rows, got " +
                          std::to_string(rows));
  const uint64_t dims[2] = {static_cast<uint64_t>(kHeadDim), rows}, strides[1] = {uint64_t{kHeadDim} * 2};
  const uint32_t box[2] = {64, static_cast<uint32_t>(box_rows)};
  return make_tensor_map(p.kv, 2, dims, strides, box, "decode_attention (cuda): kv_cache");
}

template <int kBoxRows>
void launch_seesaw(const Params& p, dim3 grid, cudaStream_t stream) {
  const CUtensorMap map = kv_tensor_map(p, kBoxRows);
  auto kernel = seesaw_kernel<kBoxRows>;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  // A programmatic dependent of the scheduler: blocks start while it finishes, then wait for its work list.
  launch_dependent(kernel, grid, dim3(kThreads), kSmemBytes, stream, p, map);
}

}  // namespace

void launch_split(const Params& p, dim3 grid, cudaStream_t stream) {
  if (p.page_size_log2 >= 6) launch_seesaw<64>(p, grid, stream);
  else if (p.page_size_log2 >= 4) launch_seesaw<16>(p, grid, stream);
  else
    throw InvalidArgument("decode_attention (cuda): the sm90 kernel needs a page size >= 16, got " +
                          std::to_string(1 << p.page_size_log2));
}

}  // namespace decode
}  // namespace mla::cuda::sm90
