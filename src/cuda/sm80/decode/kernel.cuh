// The sm80 absorbed-decode kernel (mma.sync, bf16): one block = 64 query rows of one sequence × one split of
// its keys. Per 64-key tile: S = Q·Kᵀ (8 warps: 4 row groups × 2 key halves), online softmax in the log2
// domain with the row max shared across the halves through shared memory, P rounded to bf16 into shared
// memory, then O += P·V (each warp: its 16 rows × one 256-column half of the 512-wide value). K tiles arrive
// by cp.async, double-buffered; keys past the sequence are zero-filled and never read (NaN in unused slots
// cannot leak).
#pragma once

#include <cuda_bf16.h>

#include <cmath>

#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/mma.cuh"

namespace mla::cuda::sm80::decode {

// Issues cp.async for one [64, 576] tile starting at key `t0` (keys >= seqlen are zero-filled).
__device__ __forceinline__ void load_k_tile(uint16_t* sK, const Params& p, int b, int t0, int seqlen) {
  const auto* kv = static_cast<const uint16_t*>(p.kv);
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  const int page_mask = (1 << p.page_size_log2) - 1;
#pragma unroll 2
  for (int idx = threadIdx.x; idx < kBlockN * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK, t = t0 + row;
    const bool valid = t < seqlen;
    const uint16_t* src = kv;
    if (valid) {
      const int64_t slot = (static_cast<int64_t>(table[t >> p.page_size_log2]) << p.page_size_log2) + (t & page_mask);
      src = kv + slot * kHeadDim + chunk * 8;
    }
    cp_async_16(sK + swizzle<kChunksQK>(row, chunk * 8), src, valid);
  }
}

template <int kStages>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan<kStages>*>(smem_raw);
  const int m0 = blockIdx.x * kBlockM, b = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mw = warp & 3, nw = warp >> 2;  // row group (16 rows), half (32 keys in S / 256 columns in O)
  const int seqlen = p.seqlens[b];
  const int k_begin = split * p.keys_per_split;
  const int k_end = min(seqlen, k_begin + p.keys_per_split);
  const int tiles = k_end > k_begin ? (k_end - k_begin + kBlockN - 1) / kBlockN : 0;

  // Q [64, 576]: rows past `rows` are zero.
  const auto* gQ = static_cast<const uint16_t*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * kHeadDim;
  for (int idx = threadIdx.x; idx < kBlockM * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK;
    const bool valid = m0 + row < p.rows;
    cp_async_16(sm.q + swizzle<kChunksQK>(row, chunk * 8), valid ? gQ + row * kHeadDim + chunk * 8 : gQ, valid);
  }
  if (tiles > 0) load_k_tile(sm.k[0], p, b, k_begin, seqlen);
  cp_async_commit();

  // This thread's two rows (C fragment rows lane/4 and lane/4 + 8 of its warp's 16) and their key limits.
  const int r_local[2] = {16 * mw + lane / 4, 16 * mw + lane / 4 + 8};
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    const int qi = r / p.h_q;  // query index within s_q
    limit[i] = r >= p.rows ? 0 : (p.causal ? seqlen - (p.s_q - 1 - qi) : seqlen);
  }

  float o[kHeadDimV / 2 / 8][4];  // [32 n-tiles of 8 columns] of this warp's 256-column half
#pragma unroll
  for (int j = 0; j < kHeadDimV / 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = k_begin + tile * kBlockN;
    if (kStages == 2 && tile + 1 < tiles) {
      load_k_tile(sm.k[(tile + 1) % kStages], p, b, t0 + kBlockN, seqlen);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* sK = sm.k[tile % kStages];

    // S [16 rows, 32 keys] per warp = Q[16, 576] · K[32 keys, 576]ᵀ.
    float s[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sm.q + swizzle<kChunksQK>(16 * mw + lane % 16, 16 * kk + (lane / 16) * 8));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t bf[4];
        const int key = 32 * nw + 16 * np + lane % 8 + (lane / 16) * 8;
        ldmatrix_x4(bf, sK + swizzle<kChunksQK>(key, 16 * kk + ((lane / 8) % 2) * 8));
        mma_bf16_16816(s[2 * np], a, bf[0], bf[1]);
        mma_bf16_16816(s[2 * np + 1], a, bf[2], bf[3]);
      }
    }

    // Scale into the log2 domain, mask, and take this half's row max.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = t0 + 32 * nw + 8 * j + 2 * (lane % 4) + (e & 1);
        const float x = t < limit[e / 2] ? s[j][e] * p.scale_log2 : -INFINITY;
        s[j][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      if (lane % 4 == 0) sm.row_max[nw][r_local[i]] = tile_max[i];
    }
    __syncthreads();

    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m_run[i], fmaxf(sm.row_max[0][r_local[i]], sm.row_max[1][r_local[i]]));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: keep everything at 0
      alpha[i] = exp2f(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[j][2 * i + e] - m_use);
          s[j][2 * i + e] = pv;
          sum += pv;
        }
      l_run[i] = l_run[i] * alpha[i] + sum;  // fp32 sum of the unrounded probabilities (as the CPU does)
    }
    // P → shared memory as bf16 (the rounding point of the P·V product).
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int key = 32 * nw + 8 * j + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(sm.p + swizzle<kBlockN / 8>(r_local[i], key)) =
            pack_bf16(s[j][2 * i], s[j][2 * i + 1]);
      }
#pragma unroll
    for (int j = 0; j < kHeadDimV / 16; ++j) {
      o[j][0] *= alpha[0], o[j][1] *= alpha[0];
      o[j][2] *= alpha[1], o[j][3] *= alpha[1];
    }
    __syncthreads();

    // O[16, 256] += P[16, 64] · V[64, 256 of 512].
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sm.p + swizzle<kBlockN / 8>(16 * mw + lane % 16, 16 * kk + (lane / 16) * 8));
#pragma unroll
      for (int np = 0; np < kHeadDimV / 2 / 16; ++np) {
        uint32_t bf[4];
        const int key = 16 * kk + lane % 8 + ((lane / 8) % 2) * 8;
        const int col = (kHeadDimV / 2) * nw + 16 * np + (lane / 16) * 8;
        ldmatrix_x4_trans(bf, sK + swizzle<kChunksQK>(key, col));
        mma_bf16_16816(o[2 * np], a, bf[0], bf[1]);
        mma_bf16_16816(o[2 * np + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // the tile's buffer and sP are free for the next tile
    if (kStages == 1 && tile + 1 < tiles) {
      load_k_tile(sm.k[0], p, b, t0 + kBlockN, seqlen);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();

  // Row sums: over the quad, then over the two key halves.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    if (lane % 4 == 0) sm.row_sum[nw][r_local[i]] = l_run[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    if (r >= p.rows) continue;
    const float l = sm.row_sum[0][r_local[i]] + sm.row_sum[1][r_local[i]];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
    const int64_t row = static_cast<int64_t>(b) * p.rows + r;
    if (p.splits == 1) {
      auto* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + (kHeadDimV / 2) * nw + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < kHeadDimV / 16; ++j)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) = __floats2bfloat162_rn(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      if (p.lse && nw == 0 && lane % 4 == 0) {
        const int qi = r / p.h_q, h = r % p.h_q;
        p.lse[(static_cast<int64_t>(b) * p.h_q + h) * p.s_q + qi] = lse;
      }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * p.batch * p.rows + row;
      float* out = p.o_partial + prow * kHeadDimV + (kHeadDimV / 2) * nw + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < kHeadDimV / 16; ++j)
        *reinterpret_cast<float2*>(out + 8 * j) = make_float2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      if (nw == 0 && lane % 4 == 0) p.lse_partial[prow] = l > 0.f ? lse : -INFINITY;
    }
  }
}

}  // namespace mla::cuda::sm80::decode
