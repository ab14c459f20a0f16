// Shapes of the sm80 expanded-attention backward (FlashAttention-2's schedule): per-head q·k width 192, v width
// 128, bf16 (every released MLA model). Schedule and math: docs/ops.md, "prefill_attention_backward".
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda::sm80::backward {

constexpr int kHeadDimQK = 192;
constexpr int kHeadDimV = 128;
constexpr int kBlockN = 64;  // keys per block: 4 warps × 16 key rows, dK and dV of them kept in registers
constexpr int kBlockM = 16;  // queries per step of the block's loop (32 spills: dK + dV take 160 registers)
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunksQK = kHeadDimQK / 8;  // 16-byte chunks per row
constexpr int kChunksV = kHeadDimV / 8;
constexpr int kChunksS = kBlockN / 8;
static_assert(kBlockN == 16 * kWarps, "each warp owns 16 key rows");
static_assert(kBlockM % 16 == 0 && kWarps % (kBlockM / 16) == 0, "the dQ step splits m-tiles over the warps");
static_assert((kHeadDimQK / 16) % (kWarps / (kBlockM / 16)) == 0, "dQ's 16-column groups split evenly");

struct SharedMemoryPlan {
  uint16_t k[kBlockN * kHeadDimQK];    // [64, 192] bf16, swizzled, loaded once
  uint16_t v[kBlockN * kHeadDimV];     // [64, 128]
  uint16_t q[kBlockM * kHeadDimQK];    // [16, 192] this step's queries
  uint16_t d_o[kBlockM * kHeadDimV];   // [16, 128] their d_out
  uint16_t d_s[kBlockM * kBlockN];     // [16, 64] dS = P ⊙ (dP − D), queries as rows, for dQ = dS·K
  float lse_log2[kBlockM];             // [16] lse·log2(e); +inf past n_q (P = 0)
  float delta[kBlockM];                // [16] D = rowsum(d_out ⊙ out)
};

// One sequence (n_q queries over n_k keys, bottom-right causal), all heads: the main kernel's launch.
struct Params {
  int heads = 0, n_q = 0, n_k = 0;
  int64_t q_offset = 0, k_offset = 0;  // token offsets of this sequence
  int64_t stats_stride = 0;     // row pitch (floats) of lse_log2 and delta: total_q rounded up to 4 (16 bytes)
  const void* q = nullptr;      // [total_q, H, 192] bf16
  const void* k = nullptr;      // [total_k, H, 192] bf16
  const void* v = nullptr;      // [total_k, H, 128] bf16
  const void* d_out = nullptr;  // [total_q, H, 128] bf16
  const float* lse_log2 = nullptr;  // [H, stats_stride] lse·log2(e) (+inf for a row that saw no key), preprocess
  const float* delta = nullptr;     // [H, stats_stride] D = rowsum(d_out ⊙ out), preprocess
  float scale = 0.f;            // softmax scale
  float scale_log2 = 0.f;       // scale·log2(e)
  bool causal = true;
  float* d_q_accum = nullptr;   // [total_q, H, 192] fp32, zeroed before the first launch; atomics add dS·K
  void* d_k = nullptr;          // [total_k, H, 192] bf16 written (scale folded in)
  void* d_v = nullptr;          // [total_k, H, 128] bf16 written
};

// The whole call: D = rowsum(d_out ⊙ out) and a zeroed dQ accumulator, the main kernel once per sequence, then
// d_q = bf16(scale · accumulator). Host cu_seqlens.
struct Call {
  int64_t batch = 0, heads = 0, total_q = 0, total_k = 0;
  const int32_t* cu_q = nullptr;  // [batch + 1] host
  const int32_t* cu_k = nullptr;  // [batch + 1] host
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;    // [total_q, H, 128] bf16
  const void* d_out = nullptr;
  const float* lse = nullptr;
  float scale = 0.f;
  bool causal = true;
  void* d_q = nullptr;          // [total_q, H, 192] bf16
  void* d_k = nullptr;
  void* d_v = nullptr;
  void* workspace = nullptr;    // workspace_bytes(total_q, heads)
};

// fp32 dQ accumulator [total_q, H, 192], then lse·log2(e) and D, each [H, stats_stride(total_q)] (adjacent: the
// sm90 kernel reads both through one tensor map); each part 256-byte aligned.
int64_t workspace_bytes(int64_t total_q, int64_t heads, int64_t head_dim_qk);
constexpr int64_t stats_stride(int64_t total_q) { return (total_q + 3) / 4 * 4; }
float* d_q_accumulator(const Call& c);
float* lse_log2(const Call& c);
float* delta(const Call& c);

// The main kernel's parameters for the whole call (the sm90 kernel takes the same), and those of sequence b: false
// when it has no keys (no launch: d_q = 0 comes from the zeroed accumulator, nothing else is written).
Params kernel_params(const Call& c);
bool set_sequence(Params& p, const Call& c, int64_t b);

// The steps around the main kernel, shared with the sm90 kernel (src/cuda/sm90/backward): lse·log2(e), D and a
// zeroed accumulator before it, d_q = bf16(scale · accumulator) after it.
void run_preprocess(const Call& c, cudaStream_t stream);
void run_convert(const Call& c, cudaStream_t stream);

void run_bf16_192_128(const Call& c, cudaStream_t stream);

}  // namespace mla::cuda::sm80::backward
