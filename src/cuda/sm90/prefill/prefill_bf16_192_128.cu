// The instantiations of the sm90 expanded-prefill kernel (kernel.cuh) for dense and strided K/V, and the tensor
// maps over the whole packed q, k and v.
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
  const bool batched = p.cu_q != nullptr;
  if (batched ? p.batch == 0 || p.total_q == 0 : p.n_q == 0) return;
  const bool strided = p.k_split != kHeadDimQK;
  if (strided && p.k_split != sm80::prefill::kStridedSplit)
    throw InvalidArgument("prefill_attention (cuda): k_split must be 192 or 128");
  if (p.total_q >= (int64_t{1} << 31) || p.total_k >= (int64_t{1} << 31))
    throw InvalidArgument("prefill_attention (cuda): total_q and total_k must stay below 2^31 tokens");
  // Maps need one row and a real address; with total_k = 0 no key tile is ever loaded.
  const int64_t rows_k = std::max<int64_t>(p.total_k, 1);
  const void* k = p.total_k > 0 ? p.k : p.q;
  const void* v = p.total_k > 0 ? p.v : p.q;
  Maps maps;
  maps.q = map_3d(p.q, kHeadDimQK, p.heads, p.total_q, kHeadDimQK, p.heads * kHeadDimQK, "q");
  maps.k = map_3d(k, p.k_split, p.heads, rows_k, p.k_head, p.k_row, "k");
  maps.v = map_3d(v, kHeadDimV, p.heads, rows_k, p.v_head, p.v_row, "v");
  if (strided) {
    const void* kt = p.total_k > 0 ? p.k_tail : p.q;
    // A rope key shared by every head (k_tail_head = 0) is a tensor with one head.
    maps.k_tail = p.k_tail_head != 0 ? map_3d(kt, kHeadDimQK - p.k_split, p.heads, rows_k, p.k_tail_head, p.k_tail_row, "k_tail")
                                     : map_3d(kt, kHeadDimQK - p.k_split, 1, rows_k, 8, p.k_tail_row, "k_tail");
  } else {
    maps.k_tail = maps.k;
  }
  auto* kernel = strided ? prefill_kernel<true> : prefill_kernel<false>;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  // Batched: at most Σ ceil(n_q / 128) <= total_q / 128 + batch query blocks; the spare ones return at once.
  const int64_t blocks = batched ? (p.total_q + kBlockM - 1) / kBlockM + p.batch : (p.n_q + kBlockM - 1) / kBlockM;
  if (blocks >= (int64_t{1} << 31)) throw InvalidArgument("prefill_attention (cuda): too many query blocks");
  const dim3 grid(static_cast<unsigned>(blocks), p.heads);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p, maps);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda::sm90::prefill
