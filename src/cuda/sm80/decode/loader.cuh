// Loads 64-key tiles of the paged latent cache into shared memory with cp.async, for both decode kernels.
// Each thread owns one key row of the tile (4 threads per row, 18 interleaved 16-byte chunks each), so it
// needs one block-table entry per tile; that entry is read a tile ahead, so the dependent global load is off
// the critical path. Rows past the sequence are zero-filled and their slots never read.
#pragma once

#include <cstdint>

#include "cuda/common/fp8_row.cuh"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/mma.cuh"

namespace mla::cuda::sm80::decode {

static_assert(kThreads == 4 * kBlockN && kChunksQK % 4 == 0, "4 threads per key row");

// The key row of a tile a thread loads (4 threads per row) and its cache slot in the next tile to load.
struct TileRow {
  int row, lane4;          // key row of the tile, and which of the row's 4 threads
  int64_t slot = 0;        // cache row of this thread's key in the next tile to issue
  bool valid = false;

  __device__ __forceinline__ TileRow() : row(threadIdx.x / 4), lane4(threadIdx.x % 4) {}

  // Looks up the page of key t0 + row (a global load; issue well before the tile's loads).
  __device__ __forceinline__ void prefetch(const Params& p, const int32_t* table, int t0, int seqlen) {
    const int t = t0 + row;
    valid = t < seqlen;
    if (valid) {
      const int page_mask = (1 << p.page_size_log2) - 1;
      slot = (static_cast<int64_t>(table[t >> p.page_size_log2]) << p.page_size_log2) + (t & page_mask);
    }
  }
};

struct TileLoader : TileRow {
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

// The fp8 twin, for caches of fp8_ds_mla rows (656 bytes: 512 e4m3, 4 fp32 scales, 64 bf16 rope values; see
// mla/cache.hpp). cp.async cannot convert, so a tile goes through registers: `fetch` issues this thread's global
// loads a tile ahead, `store` dequantises them into the same swizzled bf16 tile the bf16 loader fills
// (bf16(fp8 · scale), as every other path), so the kernel's consumers are unchanged. Thread lane4 of a row owns
// latent group lane4 (128 bytes and its scale) and rope values 16·lane4 .. 16·lane4 + 15.
constexpr int kFp8RowBytes = 656, kFp8ScaleOffset = 512, kFp8RopeOffset = 528;
static_assert(kHeadDimV == 4 * 128 && kHeadDim - kHeadDimV == 4 * 16, "one latent group and 16 rope values per thread");

struct Fp8TileLoader : TileRow {
  uint4 latent[8], rope[2];  // the fetched tile row part: 128 fp8 bytes, 16 bf16
  float scale = 0.f;

  __device__ __forceinline__ void fetch(const void* kv) {
    if (!valid) {  // rows past the sequence become zeros, never the slot's bytes
#pragma unroll
      for (int i = 0; i < 8; ++i) latent[i] = make_uint4(0, 0, 0, 0);
      rope[0] = rope[1] = make_uint4(0, 0, 0, 0);
      scale = 0.f;
      return;
    }
    const auto* src = static_cast<const unsigned char*>(kv) + slot * kFp8RowBytes;
    const auto* lat = reinterpret_cast<const uint4*>(src + 128 * lane4);
#pragma unroll
    for (int i = 0; i < 8; ++i) latent[i] = __ldg(lat + i);
    scale = __ldg(reinterpret_cast<const float*>(src + kFp8ScaleOffset) + lane4);
    const auto* rp = reinterpret_cast<const uint4*>(src + kFp8RopeOffset + 32 * lane4);
    rope[0] = __ldg(rp), rope[1] = __ldg(rp + 1);
  }

  template <class Offset>
  __device__ __forceinline__ void store(uint16_t* sK, Offset offset) const {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t w[4] = {latent[i].x, latent[i].y, latent[i].z, latent[i].w};
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // 8 fp8 bytes → one 16-byte chunk of 8 bf16
        uint32_t out[4];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const uint32_t word = w[2 * half + k];
          const __nv_bfloat162 lo = fp8x2_dequantize(static_cast<uint16_t>(word & 0xffffu), scale);
          const __nv_bfloat162 hi = fp8x2_dequantize(static_cast<uint16_t>(word >> 16), scale);
          out[2 * k] = *reinterpret_cast<const uint32_t*>(&lo), out[2 * k + 1] = *reinterpret_cast<const uint32_t*>(&hi);
        }
        *reinterpret_cast<uint4*>(sK + offset(row, 128 * lane4 + 16 * i + 8 * half)) =
            make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) *reinterpret_cast<uint4*>(sK + offset(row, kHeadDimV + 16 * lane4 + 8 * i)) = rope[i];
  }
};

}  // namespace mla::cuda::sm80::decode
