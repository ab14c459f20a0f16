// Shapes of the sm80 absorbed-decode kernel: MQA over 576-wide latent rows, value = the first 512 columns.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

namespace mla::cuda::sm80::decode {

constexpr int kHeadDim = 576;    // d_c + d_r of every released checkpoint
constexpr int kHeadDimV = 512;   // d_c
constexpr int kBlockN = 64;      // keys per tile
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunksQK = kHeadDim / 8;   // 16-byte chunks per row
constexpr int kMaxSplits = 128;           // key ranges per sequence
constexpr int kMinTilesPerSplit = 2;      // smallest split (tiles) when the batch is too small to fill the SMs;
                                          // 2 measured best (bench/results/2026-12-01-h200-decode-splits.md)
static_assert(kHeadDim % 64 == 0 && kHeadDimV % 64 == 0, "tile shapes");

// Two warp layouts. kRowGroups = 4: 64 query rows per block, warps = 4 row groups × 2 key/column halves
// (h_q·s_q > 16: the compute-bound V3 case). kRowGroups = 1: 16 rows, warps = 1 × 8 key/column eighths,
// Q held in registers (h_q·s_q <= 16: tensor-parallel shards, memory-bound; 4x less padding work).
template <int kRowGroups>
struct Layout {
  static constexpr int kBlockM = 16 * kRowGroups;
  static constexpr int kKeyGroups = kWarps / kRowGroups;
  static constexpr int kKeysPerWarp = kBlockN / kKeyGroups;        // S columns per warp
  static constexpr int kColsPerWarp = kHeadDimV / kKeyGroups;      // O columns per warp
  static constexpr int kSTiles = kKeysPerWarp / 8;
  static constexpr int kOTiles = kColsPerWarp / 8;
  static_assert(kSTiles == 1 || kSTiles % 2 == 0, "S n-tiles come in pairs (ldmatrix.x4) or alone (x2)");
};

// Dynamic shared memory, in order. kStages K tiles (2 = double-buffered; 1 where the SM has less memory).
template <int kStages, int kRowGroups>
struct SharedMemoryPlan {
  static constexpr int kBlockM = Layout<kRowGroups>::kBlockM, kKeyGroups = Layout<kRowGroups>::kKeyGroups;
  uint16_t k[kStages][kBlockN * kHeadDim];     // [stages][64, 576] bf16, swizzled; V = first 512 columns
  uint16_t q[kBlockM * kHeadDim];              // [BLOCK_M, 576] bf16, swizzled
  uint16_t p[kBlockM * kBlockN];               // [BLOCK_M, 64] bf16 probabilities, swizzled
  float row_max[kKeyGroups][kBlockM];
  float row_sum[kKeyGroups][kBlockM];
};

// Per-sequence schedule written by the scheduler kernel (device memory): split s of sequence b covers keys
// [s·keys_per_split, min(len, (s+1)·keys_per_split)); its partial results live at row (offset + s) · rows.
struct SequenceSchedule {
  int offset, splits, keys_per_split;
};

// One launch of the split kernel. Pointers are device memory.
struct Params {
  int batch = 0, s_q = 1, h_q = 0, rows = 0;  // rows = s_q · h_q
  int page_size_log2 = 6, max_pages = 0;
  int64_t num_pages = 0;                      // pages in kv (the sm90 kernel's tensor map spans them all)
  const void* q = nullptr;                    // [batch, rows, 576] bf16
  const void* kv = nullptr;                   // [num_pages, page_size, 576] bf16, or fp8_ds_mla rows (656 bytes)
  bool fp8 = false;                           // kv holds fp8 rows
  const int32_t* block_table = nullptr;       // [batch, max_pages]
  const int32_t* seqlens = nullptr;           // [batch]
  float scale_log2 = 0.f;                     // softmax scale · log2(e)
  bool causal = false;
  const SequenceSchedule* schedule = nullptr; // [batch]
  const int32_t* work = nullptr;              // [max_work] b · kMaxSplits + split, -1 past the end
  int max_work = 0;                           // batch + SM count bounds Σ splits
  int m_blocks = 1;                           // row blocks per sequence; grid.x = max_work · m_blocks, the row
                                              // blocks of one work item adjacent (they share K tiles in L2)
  bool rows_adjacent = true;                  // false (MLA_CUDA_DECODE_GRID=0): the old order, work item fastest
  void* out = nullptr;                        // [batch, rows, 512] bf16 (sequences with one split)
  float* lse = nullptr;                       // [batch, h_q, s_q], may be null
  float* o_partial = nullptr;                 // [max_work, rows, 512] f32
  float* lse_partial = nullptr;               // [max_work, rows] (-inf: no key seen)
};

// Work-list index and row block of this block (grid.x = max_work · m_blocks).
#ifdef __CUDACC__
__device__ __forceinline__ int block_work(const Params& p) {
  return static_cast<int>(p.rows_adjacent ? blockIdx.x / p.m_blocks : blockIdx.x % p.max_work);
}
__device__ __forceinline__ int block_row_block(const Params& p) {
  return static_cast<int>(p.rows_adjacent ? blockIdx.x % p.m_blocks : blockIdx.x / p.max_work);
}
#endif

// The 16-row fp8 kernel (fp8_rows16.cu: dequantisation in the MMA fragments, ceil(rows / 16) row blocks of a
// sequence side by side) for an fp8 cache with h_q·s_q <= 32, any GPU since Ampere. Opt-in until it has run on a
// GPU: MLA_CUDA_DECODE_FP8_ROWS16=1 (read on every call) selects it; it was written in a session without device
// time (2026-12-08, bench/results/2026-12-08-fp8-rows16-unmeasured.md). Its tests set the variable.
constexpr int kFp8Rows16MaxRows = 32;
inline bool uses_fp8_rows16(bool fp8, int rows) {
  if (!fp8 || rows > kFp8Rows16MaxRows) return false;
  const char* on = std::getenv("MLA_CUDA_DECODE_FP8_ROWS16");
  return on && *on == '1';
}

// Rows of query per block for a batch shape: 64 for h_q·s_q > 16. The small shapes (tensor-parallel shards) take
// the 16-row sm80 kernel, except where the sm90 kernel can run (sm90_capable: Hopper, pages of 16 and up) and the
// batch has 64 sequences or more: padded to 64 rows it streams the cache faster there (H200, same run, 2026-11-30:
// b128 s_k32768 h16 1.196 vs 1.589 ms, b128 s_k8192 0.327 vs 0.345; slower at b8 and b4: 0.0249 vs 0.0208 ms,
// 0.0639 vs 0.0564). MLA_CUDA_DECODE_SM90_SMALL=1 / 0 forces either (an A/B knob, read on every call).
inline int block_rows(int rows, bool sm90_capable = false, int64_t batch = 0) {
  if (rows > 16) return 64;
  if (!sm90_capable) return 16;
  if (const char* force = std::getenv("MLA_CUDA_DECODE_SM90_SMALL"); force && *force) return *force == '1' ? 64 : 16;
  return batch >= 64 ? 64 : 16;
}

// Scheduler (from the device-side sequence lengths; writes p.schedule and p.work), then split kernel and
// combine kernel, on one stream; `schedule` / `attend` select the two parts.
void run_bf16_576(const Params& p, int num_sms, cudaStream_t stream, bool schedule = true, bool attend = true);
// The fp8 16-row split kernel (fp8_rows16.cu) alone; p.m_blocks set.
void launch_fp8_rows16(const Params& p, int smem_limit, cudaStream_t stream);

}  // namespace mla::cuda::sm80::decode
