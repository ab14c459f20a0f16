// Tensor maps (the descriptors of Hopper's tensor-copy engine, TMA) for the sm90 kernels: tensors of rank 2 or 3,
// by default bf16 read in boxes whose rows are 64 elements (128 bytes) wide, with the 128-byte swizzle that the
// kernels' shared-memory tiles use; elements outside the tensor read as zero.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

namespace mla::cuda::sm90 {

// dims[0] is the contiguous dimension (elements); strides[i] is the byte distance between consecutive indices
// of dimension i + 1. Throws mla::InvalidArgument naming `what` when the driver rejects the layout (addresses
// and strides must be multiples of 16 bytes). The fp8 cache's rows are read with other element types and,
// where the kernel rearranges them itself, without the swizzle.
CUtensorMap make_tensor_map(const void* base, int rank, const uint64_t* dims, const uint64_t* strides,
                            const uint32_t* box, const std::string& what,
                            CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                            CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B);

}  // namespace mla::cuda::sm90
