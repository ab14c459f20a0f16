// The CUDA attention layer: projections through cuBLASLt, the fused norm/rope/cache-write kernel, absorbed
// decode and expanded prefill kernels, absorb/un-absorb as batched GEMMs. Device pointers for hidden/out.
#pragma once

#include <memory>

#include "core/backend.hpp"

namespace mla::cuda {

std::unique_ptr<detail::LayerImpl> make_cuda_layer(const LayerWeights& weights, const LayerOptions& options);

}  // namespace mla::cuda
