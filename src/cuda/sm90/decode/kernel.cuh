// The sm90 absorbed-decode split kernel (wgmma, bf16, 576/512, 64 query rows per block). Same schedule, work
// list, masking, rounding points and outputs as the sm80 kernel (../../sm80/decode/kernel.cuh), with the two
// products on warpgroup MMAs reading shared memory directly: warpgroup g computes S_g = Q·K[32g, 32g+32)ᵀ
// (m64n32k16 × 36), the row max is shared through shared memory, P (bf16) goes to shared memory, then
// warpgroup g computes O[:, 256g, 256g+256) += P·V (m64n256k16 × 4, V read transposed from the K tile).
// Q and K tiles are stored as nine 64-column blocks of [rows][64] with the 128-byte swizzle wgmma expects.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/decode/loader.cuh"
#include "cuda/sm80/mma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace mla::cuda::sm90::decode {

using sm80::decode::kBlockN;
using sm80::decode::kChunksQK;
using sm80::decode::kHeadDim;
using sm80::decode::kHeadDimV;
using sm80::decode::kMaxSplits;
using sm80::decode::Params;
using sm80::decode::SequenceSchedule;
using sm80::decode::block_row_block;
using sm80::decode::block_work;

constexpr int kBlockM = 64;
constexpr int kThreads = 256;  // two warpgroups
constexpr int kBlockElems = 64 * 64;  // one [64 rows][64 columns] swizzle block

struct SharedMemoryPlan {
  uint16_t k[2][kBlockN * kHeadDim];  // [stage][9 blocks][64 keys][64]; V = blocks 0..7
  uint16_t q[kBlockM * kHeadDim];     // [9 blocks][64 rows][64]
  uint16_t p[kBlockM * kBlockN];      // [64 rows][64 keys]
  float row_max[2][kBlockM];
  float row_sum[2][kBlockM];
};
constexpr size_t kSmemBytes = sizeof(SharedMemoryPlan) + 1024;  // + room to align the base to 1024 bytes

// Element offset of (row, col) in a tile of 64-column swizzle blocks.
__device__ __forceinline__ int blocked(int row, int col) {
  return (col >> 6) * kBlockElems + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm80;
  extern __shared__ unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});

  const int item = p.work[block_work(p)];
  if (item < 0) return;
  const int b = item / kMaxSplits, split = item % kMaxSplits;
  const SequenceSchedule sched = p.schedule[b];
  const int m0 = block_row_block(p) * kBlockM;
  if (m0 >= p.rows) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mw = warp % 4, wg = warp / 4;  // 16-row group within the warpgroup; warpgroup = key / column half
  const int seqlen = p.seqlens[b];
  const int k_begin = split * sched.keys_per_split;
  const int k_end = min(seqlen, k_begin + sched.keys_per_split);
  const int tiles = k_end > k_begin ? (k_end - k_begin + kBlockN - 1) / kBlockN : 0;

  const auto* gQ = static_cast<const uint16_t*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * kHeadDim;
  for (int idx = threadIdx.x; idx < kBlockM * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK;
    const bool valid = m0 + row < p.rows;
    cp_async_16(sm.q + blocked(row, chunk * 8), valid ? gQ + row * kHeadDim + chunk * 8 : gQ, valid);
  }
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  auto offset = [](int row, int col) { return blocked(row, col); };
  sm80::decode::TileLoader loader;
  loader.prefetch(p, table, k_begin, seqlen);
  if (tiles > 0) loader.issue(sm.k[0], p.kv, offset);
  cp_async_commit();
  loader.prefetch(p, table, k_begin + kBlockN, seqlen);

  const int r_local[2] = {16 * mw + lane / 4, 16 * mw + lane / 4 + 8};
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    limit[i] = r >= p.rows ? 0 : (p.causal ? seqlen - (p.s_q - 1 - r / p.h_q) : seqlen);
  }

  float o[128];  // O[64 rows, 256 columns of this warpgroup's half]: o[4j + e] = chunk j, fragment element e
#pragma unroll
  for (int j = 0; j < 128; ++j) o[j] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  // Matrix descriptors of the tiles' first k-steps; a k-step further is a start address 16-byte units further.
  const uint64_t desc_q = make_desc(sm.q, 16, 1024), desc_p = make_desc(sm.p, 16, 1024);
  const uint64_t desc_k[2] = {make_desc(sm.k[0] + 32 * wg * 64, 16, 1024), make_desc(sm.k[1] + 32 * wg * 64, 16, 1024)};
  const uint64_t desc_v[2] = {make_desc(sm.k[0] + 4 * wg * kBlockElems, kBlockElems * 2, 1024),
                              make_desc(sm.k[1] + 4 * wg * kBlockElems, kBlockElems * 2, 1024)};

  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = k_begin + tile * kBlockN;
    cp_async_wait<0>();
    fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads through the async proxy
    __syncthreads();
    if (tile + 1 < tiles) {
      loader.issue(sm.k[(tile + 1) % 2], p.kv, offset);
      cp_async_commit();
      loader.prefetch(p, table, t0 + 2 * kBlockN, seqlen);
    }
    const uint64_t dk = tile % 2 ? desc_k[1] : desc_k[0], dv = tile % 2 ? desc_v[1] : desc_v[0];  // no local memory

    // S[64, 32] of this warpgroup's keys.
    float s[16];
    fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const int step = (kk / 4 * kBlockElems + (kk % 4) * 16) * 2 / 16;  // 16-byte units
      wgmma_m64n32k16_ss(s, desc_q + step, dk + step, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);

    float tile_max[2] = {-INFINITY, -INFINITY};
    const bool unmasked = t0 + kBlockN <= min(limit[0], limit[1]);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = t0 + 32 * wg + 8 * j + 2 * (lane % 4) + (e & 1);
        const float x = unmasked || t < limit[e / 2] ? s[4 * j + e] * p.scale_log2 : -INFINITY;
        s[4 * j + e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      if (lane % 4 == 0) sm.row_max[wg][r_local[i]] = tile_max[i];
    }
    __syncthreads();

    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m_run[i], fmaxf(sm.row_max[0][r_local[i]], sm.row_max[1][r_local[i]]));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[i] = exp2f(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[4 * j + 2 * i + e] - m_use);
          s[4 * j + 2 * i + e] = pv;
          sum += pv;
        }
      l_run[i] = l_run[i] * alpha[i] + sum;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int key = 32 * wg + 8 * j + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(sm.p + blocked(r_local[i], key)) = pack_bf16(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]);
      }
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      o[4 * j + 0] *= alpha[0], o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1], o[4 * j + 3] *= alpha[1];
    }
    fence_proxy_async();  // P written by ordinary stores, read by wgmma
    __syncthreads();

    // O[64, 256] += P[64, 64] · V[64 keys, 256 columns].
    fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wgmma_m64n256k16_ss_tb(o, desc_p + kk * 16 * 2 / 16, dv + kk * 16 * 64 * 2 / 16, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    if (lane % 4 == 0) sm.row_sum[wg][r_local[i]] = l_run[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    if (r >= p.rows) continue;
    const float l = sm.row_sum[0][r_local[i]] + sm.row_sum[1][r_local[i]];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
    const int col0 = 256 * wg + 2 * (lane % 4);
    if (sched.splits == 1) {
      const int64_t row = static_cast<int64_t>(b) * p.rows + r;
      auto* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) =
            __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      if (p.lse && wg == 0 && lane % 4 == 0)
        p.lse[(static_cast<int64_t>(b) * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(sched.offset + split) * p.rows + r;
      float* out = p.o_partial + prow * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(out + 8 * j) = make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      if (wg == 0 && lane % 4 == 0) p.lse_partial[prow] = l > 0.f ? lse : -INFINITY;
    }
  }
#else
  __trap();
#endif
}

}  // namespace mla::cuda::sm90::decode
