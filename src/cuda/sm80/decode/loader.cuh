// Loads 64-key tiles of the paged latent cache into shared memory with cp.async, for both decode kernels.
// Each thread owns one key row of the tile (4 threads per row, 18 interleaved 16-byte chunks each), so it
// needs one block-table entry per tile; that entry is read a tile ahead, so the dependent global load is off
// the critical path. Rows past the sequence are zero-filled and their slots never read.
#pragma once

#include <cstdint>

#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/mma.cuh"

namespace mla::cuda::sm80::decode {

static_assert(kThreads == 4 * kBlockN && kChunksQK % 4 == 0, "4 threads per key row");

struct TileLoader {
  int row, lane4;          // key row of the tile, and which of the row's 4 threads
  int64_t slot = 0;        // cache row of this thread's key in the next tile to issue
  bool valid = false;

  __device__ __forceinline__ TileLoader() : row(threadIdx.x / 4), lane4(threadIdx.x % 4) {}

  // Looks up the page of key t0 + row (a global load; issue well before `issue`).
  __device__ __forceinline__ void prefetch(const Params& p, const int32_t* table, int t0, int seqlen) {
    const int t = t0 + row;
    valid = t < seqlen;
    if (valid) {
      const int page_mask = (1 << p.page_size_log2) - 1;
      slot = (static_cast<int64_t>(table[t >> p.page_size_log2]) << p.page_size_log2) + (t & page_mask);
    }
  }

  // cp.async of this thread's 18 chunks; `offset(row, col)` places element (row, col) in shared memory.
  template <class Offset>
  __device__ __forceinline__ void issue(uint16_t* sK, const void* kv, Offset offset) const {
    const auto* src = static_cast<const uint16_t*>(kv) + (valid ? slot * kHeadDim : 0);
#pragma unroll
    for (int c = 0; c < kChunksQK / 4; ++c) {
      const int chunk = lane4 + 4 * c;
      cp_async_16(sK + offset(row, chunk * 8), src + (valid ? chunk * 8 : 0), valid);
    }
  }
};

}  // namespace mla::cuda::sm80::decode
