#include "cuda/sm90/tensor_map.hpp"

#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "cuda/common/check.hpp"
#include "mla/error.hpp"

namespace mla::cuda::sm90 {
namespace {

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    MLA_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !f) throw Error("cuda: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace

CUtensorMap make_tensor_map(const void* base, int rank, const uint64_t* dims, const uint64_t* strides,
                            const uint32_t* box, const std::string& what, CUtensorMapDataType type,
                            CUtensorMapSwizzle swizzle) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) throw InvalidArgument(what + " must be 16-byte aligned");
  for (int i = 0; i + 1 < rank; ++i)
    if (strides[i] % 16 != 0 || strides[i] == 0)
      throw InvalidArgument(what + ": row strides must be positive multiples of 16 bytes, got " +
                            std::to_string(strides[i]));
  cuuint64_t d[3], s[2];
  cuuint32_t b[3], e[3] = {1, 1, 1};
  for (int i = 0; i < rank; ++i) d[i] = dims[i], b[i] = box[i];
  for (int i = 0; i + 1 < rank; ++i) s[i] = strides[i];
  CUtensorMap map;
  const CUresult r = encode_tiled()(&map, type, static_cast<cuuint32_t>(rank), const_cast<void*>(base), d, s, b, e,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw InvalidArgument(what + ": cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) + ")");
  return map;
}

}  // namespace mla::cuda::sm90
