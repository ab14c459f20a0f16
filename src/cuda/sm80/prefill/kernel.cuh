// The sm80 expanded-prefill kernel (FlashAttention-2 schedule, mma.sync bf16): one block = 128 queries of
// one head; each warp owns 16 query rows for the whole key loop, so the softmax needs no shared memory and
// P goes from the S accumulators straight into A fragments (bf16, the P·V rounding point). K and V tiles
// arrive by cp.async, double-buffered; keys past n_k are zero-filled. Heavy (late, causal) query blocks are
// scheduled first.
#pragma once

#include <cuda_bf16.h>

#include <cmath>

#include "cuda/sm80/mma.cuh"
#include "cuda/sm80/prefill/config.h"

namespace mla::cuda::sm80::prefill {

template <bool kStrided>
__device__ __forceinline__ void load_kv_tile(uint16_t* sK, uint16_t* sV, const Params& p, int h, int t0) {
  const auto* gK = static_cast<const uint16_t*>(p.k);
  const auto* gKt = static_cast<const uint16_t*>(p.k_tail);
  const auto* gV = static_cast<const uint16_t*>(p.v);
  for (int idx = threadIdx.x; idx < kBlockN * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK, t = t0 + row;
    const bool valid = t < p.n_k;
    const uint16_t* src = gK;
    if (valid) {
      const int col = chunk * 8;
      if constexpr (kStrided)
        src = col < kStridedSplit ? gK + (p.k_offset + t) * p.k_row + h * p.k_head + col
                                  : gKt + (p.k_offset + t) * p.k_tail_row + h * p.k_tail_head + (col - kStridedSplit);
      else
        src = gK + ((p.k_offset + t) * p.heads + h) * kHeadDimQK + col;
    }
    cp_async_16(sK + swizzle<kChunksQK>(row, chunk * 8), src, valid);
  }
  for (int idx = threadIdx.x; idx < kBlockN * kChunksV; idx += kThreads) {
    const int row = idx / kChunksV, chunk = idx % kChunksV, t = t0 + row;
    const bool valid = t < p.n_k;
    const uint16_t* src = !valid   ? gV
                          : kStrided ? gV + (p.k_offset + t) * p.v_row + h * p.v_head + chunk * 8
                                     : gV + ((p.k_offset + t) * p.heads + h) * kHeadDimV + chunk * 8;
    cp_async_16(sV + swizzle<kChunksV>(row, chunk * 8), src, valid);
  }
}

template <bool kStrided>
__global__ void __launch_bounds__(kThreads, 1) prefill_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>(smem_raw);
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first
  const int m0 = m_block * kBlockM, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int diag = p.n_k - p.n_q;  // query r sees keys t <= r + diag (bottom-right)

  const int last_row = min(m0 + kBlockM, p.n_q) - 1;
  const int key_end = p.causal ? min(p.n_k, last_row + diag + 1) : p.n_k;
  const int tiles = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;

  const auto* gQ = static_cast<const uint16_t*>(p.q);
  for (int idx = threadIdx.x; idx < kBlockM * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK;
    const bool valid = m0 + row < p.n_q;
    const uint16_t* src = valid ? gQ + ((p.q_offset + m0 + row) * p.heads + h) * kHeadDimQK + chunk * 8 : gQ;
    cp_async_16(sm.q + swizzle<kChunksQK>(row, chunk * 8), src, valid);
  }
  if (tiles > 0) load_kv_tile<kStrided>(sm.k[0], sm.v[0], p, h, 0);
  cp_async_commit();

  const int r_local[2] = {16 * warp + lane / 4, 16 * warp + lane / 4 + 8};
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) limit[i] = p.causal ? min(p.n_k, m0 + r_local[i] + diag + 1) : p.n_k;

  uint32_t qf[kHeadDimQK / 16][4];  // this warp's Q rows as A fragments
  float o[kHeadDimV / 8][4];
#pragma unroll
  for (int j = 0; j < kHeadDimV / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = tile * kBlockN;
    if (tile + 1 < tiles) {
      load_kv_tile<kStrided>(sm.k[(tile + 1) % 2], sm.v[(tile + 1) % 2], p, h, t0 + kBlockN);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < kHeadDimQK / 16; ++kk)
        ldmatrix_x4(qf[kk], sm.q + swizzle<kChunksQK>(16 * warp + lane % 16, 16 * kk + (lane / 16) * 8));
    }
    const uint16_t* sK = sm.k[tile % 2];
    const uint16_t* sV = sm.v[tile % 2];

    float s[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDimQK / 16; ++kk)
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, sK + swizzle<kChunksQK>(16 * np + lane % 8 + (lane / 16) * 8, 16 * kk + ((lane / 8) % 2) * 8));
        mma_bf16_16816(s[2 * np], qf[kk], bf[0], bf[1]);
        mma_bf16_16816(s[2 * np + 1], qf[kk], bf[2], bf[3]);
      }

    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int t = t0 + 8 * j + 2 * (lane % 4) + e;
          const float x = t < limit[i] ? s[j][2 * i + e] * p.scale_log2 : -INFINITY;
          s[j][2 * i + e] = x;
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
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[j][2 * i + e] - m_use);
          s[j][2 * i + e] = pv;
          sum += pv;
        }
      l_run[i] = l_run[i] * alpha[i] + sum;
    }
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j) {
      o[j][0] *= alpha[0], o[j][1] *= alpha[0];
      o[j][2] *= alpha[1], o[j][3] *= alpha[1];
    }

    // O[16, 128] += P[16, 64] · V[64, 128]; P's C fragments of n-tiles 2kk, 2kk+1 are the A fragment of step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < kHeadDimV / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, sV + swizzle<kChunksV>(16 * kk + lane % 8 + ((lane / 8) % 2) * 8, 16 * np + (lane / 16) * 8));
        mma_bf16_16816(o[2 * np], a, bf[0], bf[1]);
        mma_bf16_16816(o[2 * np + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // this tile's buffers are free for the load two tiles ahead
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = m0 + r_local[i];
    if (r >= p.n_q) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    auto* out = static_cast<__nv_bfloat16*>(p.out) + ((p.q_offset + r) * p.heads + h) * kHeadDimV + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) = __floats2bfloat162_rn(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
    if (p.lse && lane % 4 == 0)
      p.lse[static_cast<int64_t>(h) * p.total_q + p.q_offset + r] =
          l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
  }
}

}  // namespace mla::cuda::sm80::prefill
