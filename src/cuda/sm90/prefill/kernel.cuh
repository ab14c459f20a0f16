// The sm90 expanded-prefill kernel (wgmma, bf16, q·k 192, v 128). One block = 128 queries of one head, two
// warpgroups of 64 query rows each; a warpgroup owns whole rows, so its softmax needs nobody else and the two
// only meet at the per-tile barrier that recycles the shared K/V buffers. Per 64-key tile and warpgroup:
// S = Q·Kᵀ (m64n64k16 × 12), masked online softmax in the log2 domain (bottom-right causal), P rounded to bf16
// in registers (the S accumulator fragment is the A fragment), O += P·V (m64n128k16 × 4, A from registers, V
// read transposed from shared memory). Same outputs and rounding points as the sm80 kernel
// (../../sm80/prefill/kernel.cuh).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/sm80/mma.cuh"
#include "cuda/sm80/prefill/config.h"
#include "cuda/sm90/wgmma.cuh"

namespace mla::cuda::sm90::prefill {

using sm80::prefill::kChunksQK;
using sm80::prefill::kChunksV;
using sm80::prefill::kHeadDimQK;
using sm80::prefill::kHeadDimV;
using sm80::prefill::kStridedSplit;
using sm80::prefill::Params;

constexpr int kBlockM = 128;
constexpr int kBlockN = 64;
constexpr int kThreads = 256;

struct SharedMemoryPlan {
  uint16_t q[kBlockM * kHeadDimQK];     // [3 blocks][128 rows][64], 128-byte swizzle
  uint16_t k[2][kBlockN * kHeadDimQK];  // [stage][3 blocks][64 keys][64]
  uint16_t v[2][kBlockN * kHeadDimV];   // [stage][2 blocks][64 keys][64]
};
constexpr size_t kSmemBytes = sizeof(SharedMemoryPlan) + 1024;

// Element offset of (row, col) in a tile of 64-column swizzle blocks of `kRows` rows.
template <int kRows>
__device__ __forceinline__ int blocked(int row, int col) {
  return (col >> 6) * (kRows * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Barrier of one warpgroup (ids 1, 2; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_barrier(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1) : "memory");
}

// K and V tiles by cp.async: 4 threads per key row (interleaved 16-byte chunks), so each thread computes its
// row addresses once per tile (strided layout: K columns past kStridedSplit from the tail rows); rows past n_k
// are zero-filled and never read.
template <bool kStrided>
__device__ __forceinline__ void load_kv_tile(uint16_t* sK, uint16_t* sV, const Params& p, int h, int t0) {
  static_assert(kThreads == 4 * kBlockN && kChunksQK % 4 == 0 && kChunksV % 4 == 0, "4 threads per key row");
  static_assert(kStridedSplit % 32 == 0, "a chunk column's source depends on j alone");
  const int row = threadIdx.x / 4, c0 = threadIdx.x % 4, t = t0 + row;
  const bool valid = t < p.n_k;
  const uint16_t *gK, *gKt, *gV;
  if constexpr (kStrided) {
    const int64_t token = valid ? p.k_offset + t : 0;
    gK = static_cast<const uint16_t*>(p.k) + (valid ? token * p.k_row + h * p.k_head : 0);
    gKt = static_cast<const uint16_t*>(p.k_tail) + (valid ? token * p.k_tail_row + h * p.k_tail_head : 0) -
          kStridedSplit;
    gV = static_cast<const uint16_t*>(p.v) + (valid ? token * p.v_row + h * p.v_head : 0);
  } else {
    const int64_t token = valid ? (p.k_offset + t) * p.heads + h : 0;
    gK = gKt = static_cast<const uint16_t*>(p.k) + token * kHeadDimQK;
    gV = static_cast<const uint16_t*>(p.v) + token * kHeadDimV;
  }
#pragma unroll
  for (int j = 0; j < kChunksQK / 4; ++j) {
    // Columns 32j + 8c0 (c0 < 4): below the split exactly when 32j < kStridedSplit, known at compile time.
    const int col = (c0 + 4 * j) * 8;
    const bool tail = kStrided && 32 * j >= kStridedSplit;
    sm80::cp_async_16(sK + blocked<kBlockN>(row, col), (tail ? gKt : gK) + col, valid);
  }
#pragma unroll
  for (int j = 0; j < kChunksV / 4; ++j) {
    const int chunk = c0 + 4 * j;
    sm80::cp_async_16(sV + blocked<kBlockN>(row, chunk * 8), gV + chunk * 8, valid);
  }
}

template <bool kStrided>
__global__ void __launch_bounds__(kThreads, 1) prefill_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm80;
  extern __shared__ unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first
  const int m0 = m_block * kBlockM, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4, mw = warp % 4;
  const int diag = p.n_k - p.n_q;

  const int last_row = min(m0 + kBlockM, p.n_q) - 1;
  const int key_end = p.causal ? min(p.n_k, last_row + diag + 1) : p.n_k;
  const int tiles = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;

  const auto* gQ = static_cast<const uint16_t*>(p.q);
  for (int idx = threadIdx.x; idx < kBlockM * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK;
    const bool valid = m0 + row < p.n_q;
    cp_async_16(sm.q + blocked<kBlockM>(row, chunk * 8),
                valid ? gQ + ((p.q_offset + m0 + row) * p.heads + h) * kHeadDimQK + chunk * 8 : gQ, valid);
  }
  if (tiles > 0) load_kv_tile<kStrided>(sm.k[0], sm.v[0], p, h, 0);
  cp_async_commit();

  // This thread's rows within its warpgroup's 64, and their key limits.
  const int r_local[2] = {16 * mw + lane / 4, 16 * mw + lane / 4 + 8};
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) limit[i] = p.causal ? min(p.n_k, m0 + 64 * wg + r_local[i] + diag + 1) : p.n_k;

  float o[kHeadDimV / 2];  // O[64, 128]: o[4j + e] = column chunk j, fragment element e
#pragma unroll
  for (int j = 0; j < kHeadDimV / 2; ++j) o[j] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  // Matrix descriptors of the tiles' first k-steps; a k-step further is a start address 16-byte units further.
  const uint64_t desc_q = make_desc(sm.q + 64 * wg * 64, 16, 1024);
  const uint64_t desc_k[2] = {make_desc(sm.k[0], 16, 1024), make_desc(sm.k[1], 16, 1024)};
  const uint64_t desc_v[2] = {make_desc(sm.v[0], kBlockN * 64 * 2, 1024), make_desc(sm.v[1], kBlockN * 64 * 2, 1024)};

  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = tile * kBlockN;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // tile landed; both warpgroups are done with the other buffers
    if (tile + 1 < tiles) {
      load_kv_tile<kStrided>(sm.k[(tile + 1) % 2], sm.v[(tile + 1) % 2], p, h, t0 + kBlockN);
      cp_async_commit();
    }
    const uint64_t dk = tile % 2 ? desc_k[1] : desc_k[0], dv = tile % 2 ? desc_v[1] : desc_v[0];  // no local memory

    float s[32];
    fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
      const int block = kk / 4, within = (kk % 4) * 16;  // elements; descriptors count 16-byte units
      wgmma_m64n64k16_ss(s, desc_q + (block * kBlockM * 64 + within) * 2 / 16, dk + (block * kBlockN * 64 + within) * 2 / 16,
                         kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);

    float alpha[2];
    const bool unmasked = t0 + kBlockN <= min(limit[0], limit[1]);  // every key of the tile visible to both rows
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int t = t0 + 8 * j + 2 * (lane % 4) + e;
          const float x = unmasked || t < limit[i] ? s[4 * j + 2 * i + e] * p.scale_log2 : -INFINITY;
          s[4 * j + 2 * i + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[i], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[i] = exp2f(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[4 * j + 2 * i + e] - m_use);
          s[4 * j + 2 * i + e] = pv;
          sum += pv;
        }
      l_run[i] = l_run[i] * alpha[i] + sum;
    }
    // P (bf16) stays in registers: the accumulator fragment of S is the A fragment of P·V (keys 16kk..16kk+15 =
    // S column chunks 2kk and 2kk+1), so P never goes through shared memory.
    uint32_t pf[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pf[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j) {
      o[4 * j + 0] *= alpha[0], o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1], o[4 * j + 3] *= alpha[1];
    }

    fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wgmma_m64n128k16_rs_tb(o, pf[kk], dv + kk * 16 * 64 * 2 / 16);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = m0 + 64 * wg + r_local[i];
    if (r >= p.n_q) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    auto* out = static_cast<__nv_bfloat16*>(p.out) + ((p.q_offset + r) * p.heads + h) * kHeadDimV + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) = __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    if (p.lse && lane % 4 == 0)
      p.lse[static_cast<int64_t>(h) * p.total_q + p.q_offset + r] =
          l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
  }
#else
  __trap();
#endif
}

}  // namespace mla::cuda::sm90::prefill
