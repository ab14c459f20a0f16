// The sm90 attention backward for bf16, q·k 192, v 128: the sm80 path's D and accumulator steps around the wgmma
// main kernel (kernel.cuh), launched once per sequence with tensor maps over that sequence's rows, each launch after
// the first a programmatic dependent of the one before (its blocks start in that grid's tail: 7-8% faster on
// b4 H16 T8192 and b8 H128 T1024, same run).
#include <algorithm>
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/sm90/backward/kernel.cuh"
#include "cuda/sm90/launch.hpp"
#include "cuda/sm90/tensor_map.hpp"

namespace mla::cuda::sm90::backward {
namespace {

// rows [first, first + rows) of a packed [tokens][heads][cols] bf16 tensor; boxes of 64 columns × 1 head × box_rows.
CUtensorMap map_rows(const void* base, int64_t first, int64_t rows, int64_t heads, int64_t cols, uint32_t box_rows,
                     const char* what) {
  const auto* start = static_cast<const uint16_t*>(base) + first * heads * cols;
  const uint64_t dims[3] = {static_cast<uint64_t>(cols), static_cast<uint64_t>(heads),
                            static_cast<uint64_t>(std::max<int64_t>(rows, 1))};
  const uint64_t strides[2] = {static_cast<uint64_t>(cols) * 2, static_cast<uint64_t>(heads * cols) * 2};
  const uint32_t box[3] = {64, 1, box_rows};
  return make_tensor_map(start, 3, dims, strides, box, std::string("prefill_attention_backward (cuda): ") + what);
}

// rows [first, first + rows) of the fp32 dQ accumulator [tokens][heads][192]; boxes of 32 columns (128 bytes,
// swizzled as the kernel's staging tile) × 1 head × 64 rows.
CUtensorMap accumulator_rows(float* base, int64_t first, int64_t rows, int64_t heads) {
  const uint64_t dims[3] = {static_cast<uint64_t>(kHeadDimQK), static_cast<uint64_t>(heads),
                            static_cast<uint64_t>(std::max<int64_t>(rows, 1))};
  const uint64_t strides[2] = {static_cast<uint64_t>(kHeadDimQK) * 4, static_cast<uint64_t>(heads * kHeadDimQK) * 4};
  const uint32_t box[3] = {32, 1, kBlockM};
  return make_tensor_map(base + first * heads * kHeadDimQK, 3, dims, strides, box,
                         "prefill_attention_backward (cuda): d_q accumulator", CU_TENSOR_MAP_DATA_TYPE_FLOAT32);
}

// lse·log2(e) and D of all tokens, [2][H][total_q] at a row pitch of stats_stride floats; boxes of kStatsBox
// tokens × 1 head × both, from a token index that is a multiple of 4 (a tensor copy's innermost start must be
// 16-byte aligned: an unaligned one stops the kernel with an illegal instruction). A box past a sequence's last
// query reads the next sequence's values (or zeros past total_q): the kernel masks them.
CUtensorMap stats_map(const sm80::backward::Call& c) {
  // Without queries nothing is read: the map only has to be valid (one token, over k).
  const auto stride = static_cast<uint64_t>(std::max<int64_t>(sm80::backward::stats_stride(c.total_q), 4));
  const void* base = c.total_q > 0 ? static_cast<const void*>(sm80::backward::lse_log2(c)) : c.k;
  const uint64_t dims[3] = {static_cast<uint64_t>(std::max<int64_t>(c.total_q, 1)), static_cast<uint64_t>(c.heads), 2};
  const uint64_t strides[2] = {stride * 4, static_cast<uint64_t>(c.heads) * stride * 4};
  const uint32_t box[3] = {kStatsBox, 1, 2};
  return make_tensor_map(base, 3, dims, strides, box, "prefill_attention_backward (cuda): lse and D",
                         CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_SWIZZLE_NONE);
}

}  // namespace

void run_bf16_192_128(const sm80::backward::Call& c, cudaStream_t stream) {
  if (c.total_q == 0 && c.total_k == 0) return;
  sm80::backward::run_preprocess(c, stream);
  MLA_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
  Params p = sm80::backward::kernel_params(c);
  Maps maps;
  maps.stats = stats_map(c);
  bool first_launch = true;
  for (int64_t b = 0; b < c.batch; ++b) {
    if (!sm80::backward::set_sequence(p, c, b)) continue;
    // A sequence without queries still writes d_k = d_v = 0; its query maps then span keys (never read).
    maps.q = p.n_q > 0 ? map_rows(c.q, p.q_offset, p.n_q, c.heads, kHeadDimQK, kBlockM, "q")
                       : map_rows(c.k, p.k_offset, p.n_k, c.heads, kHeadDimQK, kBlockM, "q");
    maps.d_out = p.n_q > 0 ? map_rows(c.d_out, p.q_offset, p.n_q, c.heads, kHeadDimV, kBlockM, "d_out") : maps.q;
    maps.k = map_rows(c.k, p.k_offset, p.n_k, c.heads, kHeadDimQK, kBlockN, "k");
    maps.v = map_rows(c.v, p.k_offset, p.n_k, c.heads, kHeadDimV, kBlockN, "v");
    maps.d_q = accumulator_rows(p.d_q_accum, p.n_q > 0 ? p.q_offset : 0, p.n_q, c.heads);
    const dim3 grid((p.n_k + kBlockN - 1) / kBlockN, p.heads);  // key blocks that see the most queries first
    if (first_launch) {
      backward_kernel<<<grid, kThreads, kSmemBytes, stream>>>(p, maps);  // after the preprocess: a full dependency
      MLA_CUDA_LAUNCH_CHECK();
      first_launch = false;
    } else {
      launch_dependent(backward_kernel, grid, dim3(kThreads), kSmemBytes, stream, p, maps);
    }
  }
  sm80::backward::run_convert(c, stream);
}

}  // namespace mla::cuda::sm90::backward
