// The instantiations of the sm90 expanded-prefill kernel (kernel.cuh) for dense and strided K/V, and the tensor
// maps of one sequence.
#include <algorithm>
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/sm90/launch.hpp"
#include "cuda/sm90/prefill/kernel.cuh"
#include "cuda/sm90/tensor_map.hpp"
#include "mla/error.hpp"

namespace mla::cuda::sm90::prefill {
namespace {

// [tokens][heads][cols] from element strides (row = token, head); box [128 tokens][1 head][64 columns].
CUtensorMap map_3d(const void* base, int64_t cols, int64_t heads, int64_t tokens, int64_t head_stride,
                   int64_t row_stride, const char* what) {
  const uint64_t dims[3] = {static_cast<uint64_t>(cols), static_cast<uint64_t>(heads), static_cast<uint64_t>(tokens)};
  const uint64_t strides[2] = {static_cast<uint64_t>(head_stride) * 2, static_cast<uint64_t>(row_stride) * 2};
  const uint32_t box[3] = {64, 1, 128};
  return make_tensor_map(base, 3, dims, strides, box, std::string("prefill_attention (cuda): ") + what);
}

}  // namespace

void run_bf16_192_128(const Params& p, cudaStream_t stream) {
  if (p.n_q == 0) return;
  const bool strided = p.k_split != kHeadDimQK;
  if (strided && p.k_split != sm80::prefill::kStridedSplit)
    throw InvalidArgument("prefill_attention (cuda): k_split must be 192 or 128");
  const auto* q = static_cast<const uint16_t*>(p.q) + p.q_offset * p.heads * kHeadDimQK;
  const auto* k = static_cast<const uint16_t*>(p.k) + p.k_offset * p.k_row;
  const auto* v = static_cast<const uint16_t*>(p.v) + p.k_offset * p.v_row;
  const int64_t n_k = std::max(p.n_k, 1);  // a map needs one row; with n_k = 0 no tile is loaded
  Maps maps;
  maps.q = map_3d(q, kHeadDimQK, p.heads, p.n_q, kHeadDimQK, p.heads * kHeadDimQK, "q");
  maps.k = map_3d(k, p.k_split, p.heads, n_k, p.k_head, p.k_row, "k");
  maps.v = map_3d(v, kHeadDimV, p.heads, n_k, p.v_head, p.v_row, "v");
  if (strided) {
    const auto* kt = static_cast<const uint16_t*>(p.k_tail) + p.k_offset * p.k_tail_row;
    // A rope key shared by every head (k_tail_head = 0) is a tensor with one head.
    maps.k_tail = p.k_tail_head != 0 ? map_3d(kt, kHeadDimQK - p.k_split, p.heads, n_k, p.k_tail_head, p.k_tail_row, "k_tail")
                                     : map_3d(kt, kHeadDimQK - p.k_split, 1, n_k, 8, p.k_tail_row, "k_tail");
  } else {
    maps.k_tail = maps.k;
  }
  auto* kernel = strided ? prefill_kernel<true> : prefill_kernel<false>;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  const dim3 grid((p.n_q + kBlockM - 1) / kBlockM, p.heads);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p, maps);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda::sm90::prefill
