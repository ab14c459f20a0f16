// The sm90 decode split kernel's instantiations (page sizes >= 64 read in one box per K block, 16 and 32 in
// boxes of 16 rows; bf16 or fp8 rows), the tensor maps it reads the cache through, and the check that the sm90
// kernels can run.
#include <cstdlib>
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/sm90/decode/kernel.cuh"
#include "cuda/sm90/launch.hpp"
#include "cuda/sm90/tensor_map.hpp"
#include "mla/cache.hpp"
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

// The page pool as 2-D tensors of its rows, read in boxes of box_rows rows. bf16 rows: [rows, 576] in 64-column
// boxes with the 128-byte swizzle of the kernel's shared-memory tiles. fp8 rows (fp8_ds_mla, 656 bytes): the
// rope columns (bf16, swizzled like a bf16 block), the e4m3 latent bytes in 64-byte boxes and the four fp32
// scales, unswizzled (the producer warpgroup rearranges them).
TensorMaps kv_tensor_maps(const Params& p, int box_rows) {
  const auto rows = static_cast<uint64_t>(p.num_pages) << p.page_size_log2;
  if (p.num_pages < 1 || rows > (uint64_t{1} << 31))
    throw InvalidArgument("decode_attention (cuda): the page pool must hold between 1 and 2^31 rows, got " +
                          std::to_string(rows));
  const auto box = static_cast<uint32_t>(box_rows);
  TensorMaps maps{};
  if (!p.fp8) {
    const uint64_t dims[2] = {static_cast<uint64_t>(kHeadDim), rows}, strides[1] = {uint64_t{kHeadDim} * 2};
    const uint32_t boxes[2] = {64, box};
    maps.kv = make_tensor_map(p.kv, 2, dims, strides, boxes, "decode_attention (cuda): kv_cache");
    return maps;
  }
  const RowLayout row{DType::F8_E4M3, kHeadDimV, kHeadDim - kHeadDimV};
  const uint64_t stride[1] = {static_cast<uint64_t>(row.bytes())};
  const auto* base = static_cast<const char*>(p.kv);
  const std::string what = "decode_attention (cuda): fp8 kv_cache";
  {
    const uint64_t dims[2] = {static_cast<uint64_t>(kHeadDim - kHeadDimV), rows};
    const uint32_t boxes[2] = {64, box};
    maps.kv = make_tensor_map(base + row.rope_offset(), 2, dims, stride, boxes, what);
  }
  {
    const uint64_t dims[2] = {static_cast<uint64_t>(kHeadDimV), rows};
    const uint32_t boxes[2] = {64, box};
    maps.latent = make_tensor_map(base, 2, dims, stride, boxes, what, CU_TENSOR_MAP_DATA_TYPE_UINT8,
                                  CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  {
    const uint64_t dims[2] = {static_cast<uint64_t>(row.groups()), rows};
    const uint32_t boxes[2] = {static_cast<uint32_t>(row.groups()), box};
    maps.scales = make_tensor_map(base + row.scale_offset(), 2, dims, stride, boxes, what,
                                  CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  return maps;
}

template <int kBoxRows, bool kFp8>
void launch_seesaw(const Params& p, dim3 grid, cudaStream_t stream) {
  using C = Cache<kBoxRows, kFp8>;
  const TensorMaps maps = kv_tensor_maps(p, kBoxRows);
  auto kernel = seesaw_kernel<C>;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  // A programmatic dependent of the scheduler: blocks start while it finishes, then wait for its work list.
  launch_dependent(kernel, grid, dim3(C::kThreads), kSmemBytes, stream, p, maps);
}

template <int kBoxRows>
void launch_seesaw(const Params& p, dim3 grid, cudaStream_t stream) {
  if (p.fp8) launch_seesaw<kBoxRows, true>(p, grid, stream);
  else launch_seesaw<kBoxRows, false>(p, grid, stream);
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
