// Shapes of the sm80 expanded-prefill kernel: per-head q·k width 192, v width 128 (every released MLA model).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda::sm80::prefill {

constexpr int kHeadDimQK = 192;
constexpr int kHeadDimV = 128;
constexpr int kBlockM = 128;  // queries per block: 8 warps × 16 rows
constexpr int kBlockN = 64;   // keys per tile
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunksQK = kHeadDimQK / 8;
constexpr int kChunksV = kHeadDimV / 8;
constexpr int kStridedSplit = 128;  // the strided layout's k_split

struct SharedMemoryPlan {
  uint16_t q[kBlockM * kHeadDimQK];     // [128, 192] bf16, swizzled (read once into registers)
  uint16_t k[2][kBlockN * kHeadDimQK];  // [2][64, 192]
  uint16_t v[2][kBlockN * kHeadDimV];   // [2][64, 128]
};

// One sequence (n_q queries over n_k keys, bottom-right causal), all heads; or, with cu_q / cu_k set (the sm90
// kernel only), a whole batch in one launch, each block finding its sequence in the device-side prefix sums.
struct Params {
  int heads = 0, n_q = 0, n_k = 0;
  int64_t q_offset = 0, k_offset = 0, total_q = 0;  // token offsets of this sequence; rows of lse
  int64_t total_k = 0;                               // rows of K / V (the sm90 kernel's tensor maps span them)
  const int32_t* cu_q = nullptr;  // [batch + 1] in device memory (sm90): replaces n_q, n_k, q_offset, k_offset
  const int32_t* cu_k = nullptr;
  int batch = 0;
  const void* q = nullptr;  // [total_q, H, 192] bf16
  // Keys and values of token t (global index k_offset + t), head h, in elements: K columns [0, k_split) at
  // k + t·k_row + h·k_head, columns [k_split, 192) at k_tail + t·k_tail_row + h·k_tail_head (k_tail_head = 0:
  // one row shared by every head, the layer's rope key), V at v + t·v_row + h·v_head. run_prefill sets the
  // dense layout ([total_k, H, 192] and [total_k, H, 128]); the layer points them into the expansion GEMM's
  // output and the latent rows instead of copying. Every row start is a multiple of 8 elements. The kernels
  // are compiled for two layouts: dense (k_split = 192: the exact address arithmetic of a [total_k, H, 192]
  // tensor, k_tail unused) and split at kStridedSplit (every released MLA model: d_nope 128, d_rope 64), so the
  // source of each 16-byte chunk is known at compile time.
  const void* k = nullptr;
  int64_t k_row = 0, k_head = 0;
  const void* k_tail = nullptr;
  int64_t k_tail_row = 0, k_tail_head = 0;
  int k_split = kHeadDimQK;
  const void* v = nullptr;
  int64_t v_row = 0, v_head = 0;
  float scale_log2 = 0.f;
  bool causal = true;
  void* out = nullptr;      // [total_q, H, 128] bf16
  float* lse = nullptr;     // [H, total_q], may be null
};

void run_bf16_192_128(const Params& p, cudaStream_t stream);

}  // namespace mla::cuda::sm80::prefill
