// Shapes of the sm80 absorbed-decode kernel: MQA over 576-wide latent rows, value = the first 512 columns.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda::sm80::decode {

constexpr int kHeadDim = 576;    // d_c + d_r of every released checkpoint
constexpr int kHeadDimV = 512;   // d_c
constexpr int kBlockM = 64;      // query rows (s_q · h_q flattened) per block
constexpr int kBlockN = 64;      // keys per tile
constexpr int kWarps = 8;        // 4 row groups of 16 × 2 halves (keys for S, output columns for O)
constexpr int kThreads = kWarps * 32;
constexpr int kChunksQK = kHeadDim / 8;   // 16-byte chunks per row
static_assert(kHeadDim % 64 == 0 && kHeadDimV % 32 == 0, "tile shapes");

// Dynamic shared memory, in order. kStages K tiles (2 = double-buffered; 1 where the SM has < 225 KB).
template <int kStages>
struct SharedMemoryPlan {
  uint16_t q[kBlockM * kHeadDim];              // [64, 576] bf16, swizzled
  uint16_t k[kStages][kBlockN * kHeadDim];     // [stages][64, 576] bf16, swizzled; V = first 512 columns
  uint16_t p[kBlockM * kBlockN];               // [64, 64] bf16 probabilities, swizzled
  float row_max[2][kBlockM];                   // per key half
  float row_sum[2][kBlockM];
};

// One launch of the split kernel. Pointers are device memory.
struct Params {
  int batch = 0, s_q = 1, h_q = 0, rows = 0;  // rows = s_q · h_q
  int page_size_log2 = 6, max_pages = 0;
  const void* q = nullptr;                    // [batch, rows, 576] bf16
  const void* kv = nullptr;                   // [num_pages, page_size, 576] bf16
  const int32_t* block_table = nullptr;       // [batch, max_pages]
  const int32_t* seqlens = nullptr;           // [batch]
  float scale_log2 = 0.f;                     // softmax scale · log2(e)
  bool causal = false;
  int splits = 1, keys_per_split = 0;         // keys_per_split: a multiple of kBlockN
  void* out = nullptr;                        // [batch, rows, 512] bf16            (splits == 1)
  float* lse = nullptr;                       // [batch, h_q, s_q], may be null     (splits == 1)
  float* o_partial = nullptr;                 // [splits, batch, rows, 512] f32     (splits > 1)
  float* lse_partial = nullptr;               // [splits, batch, rows] (-inf: no key seen)
};

// Launches the kernel; stages chosen from the device's shared-memory limit.
void run_bf16_576(const Params& p, cudaStream_t stream);

}  // namespace mla::cuda::sm80::decode
