// The sm80 attention backward's main kernel (FlashAttention-2's schedule, mma.sync bf16, fp32 accumulation):
// one block = 64 keys of one head of one sequence, looping over the query tiles that see them. Each warp owns 16
// key rows and computes in key-major form, so that its dK [16, 192] and dV [16, 128] stay in registers for the
// whole loop and P, dS go from C fragments straight into A fragments (bf16, the rounding points):
//   Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − D)
//   dV += Pᵀ·dO, dK += dSᵀ·Q, and dQ += dS·K through shared memory and fp32 atomics into the workspace.
// K and V arrive once by cp.async; each step's Q and dO tiles are single-buffered (a __syncthreads on each side).
#pragma once

#include <cuda_bf16.h>

#include <cmath>

#include "cuda/sm80/backward/config.h"
#include "cuda/sm80/mma.cuh"

namespace mla::cuda::sm80::backward {

// rows [0, kRows) of head h from a [tokens, H, kChunks·8] bf16 tensor starting at token `first`; rows at or past
// `valid` are zero-filled.
template <int kChunks, int kRows>
__device__ __forceinline__ void load_rows(uint16_t* sX, const void* gX, int64_t first, int valid, int heads, int h) {
  const auto* g = static_cast<const uint16_t*>(gX);
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    const bool ok = row < valid;
    const uint16_t* src = ok ? g + ((first + row) * heads + h) * (kChunks * 8) + chunk * 8 : g;
    cp_async_16(sX + swizzle<kChunks>(row, chunk * 8), src, ok);
  }
}

// c [16, 8·kN] = A [16, 16·kK] · Bᵀ with A's rows at sA row a_row0.. (row-major, kChunksA chunks per row) and B's
// rows (the n index) at sB rows 0.. (row-major): both operands read by ldmatrix, k running along the rows.
template <int kK, int kN, int kChunksA, int kChunksB>
__device__ __forceinline__ void mma_abt(float (&c)[kN][4], const uint16_t* sA, int a_row0, const uint16_t* sB,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + swizzle<kChunksA>(a_row0 + lane % 16, 16 * kk + (lane / 16) * 8));
#pragma unroll
    for (int np = 0; np < kN / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, sB + swizzle<kChunksB>(16 * np + lane % 8 + (lane / 16) * 8, 16 * kk + ((lane / 8) % 2) * 8));
      mma_bf16_16816(c[2 * np], a, b[0], b[1]);
      mma_bf16_16816(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc [16, 8·kN] += X [16, kBlockM] · sB [kBlockM, 8·kN] with X in C-fragment form ([16, kBlockM] as
// kBlockM/8 n-tiles), rounded to bf16 into A fragments; sB row-major (k along its rows), read transposed.
template <int kN, int kChunksB>
__device__ __forceinline__ void mma_cb(float (&acc)[kN][4], const float (&x)[kBlockM / 8][4], const uint16_t* sB,
                                       int lane) {
#pragma unroll
  for (int kk = 0; kk < kBlockM / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack_bf16(x[2 * kk][0], x[2 * kk][1]);
    a[1] = pack_bf16(x[2 * kk][2], x[2 * kk][3]);
    a[2] = pack_bf16(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = pack_bf16(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
    for (int np = 0; np < kN / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + swizzle<kChunksB>(16 * kk + lane % 8 + ((lane / 8) % 2) * 8, 16 * np + (lane / 16) * 8));
      mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
      mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// dQ [kBlockM, 192] += dS [kBlockM, 64] · K [64, 192], split over the warps by (m-tile, 16-column group); fp32
// atomics into the accumulator (other key blocks add to the same rows).
__device__ __forceinline__ void accumulate_dq(const SharedMemoryPlan& sm, const Params& p, int h, int m0, int warp,
                                              int lane) {
  constexpr int kMTiles = kBlockM / 16, kGroups = kHeadDimQK / 16 / (kWarps / kMTiles);
  const int mt = warp % kMTiles, g0 = (warp / kMTiles) * kGroups;
  const int r_local[2] = {16 * mt + lane / 4, 16 * mt + lane / 4 + 8};
#pragma unroll 1
  for (int g = g0; g < g0 + kGroups; ++g) {
    float acc[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4], b[4];
      ldmatrix_x4(a, sm.d_s + swizzle<kChunksS>(16 * mt + lane % 16, 16 * kk + (lane / 16) * 8));
      ldmatrix_x4_trans(b, sm.k + swizzle<kChunksQK>(16 * kk + lane % 8 + ((lane / 8) % 2) * 8, 16 * g + (lane / 16) * 8));
      mma_bf16_16816(acc[0], a, b[0], b[1]);
      mma_bf16_16816(acc[1], a, b[2], b[3]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = m0 + r_local[i];
      if (r >= p.n_q) continue;
      float* row = p.d_q_accum + ((p.q_offset + r) * p.heads + h) * kHeadDimQK + 16 * g + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        atomicAdd(row + 8 * j, acc[j][2 * i]);
        atomicAdd(row + 8 * j + 1, acc[j][2 * i + 1]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) backward_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>(smem_raw);
  const int n0 = blockIdx.x * kBlockN, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int diag = p.n_k - p.n_q;  // query r sees keys t <= r + diag (bottom-right)

  load_rows<kChunksQK, kBlockN>(sm.k, p.k, p.k_offset + n0, p.n_k - n0, p.heads, h);
  load_rows<kChunksV, kBlockN>(sm.v, p.v, p.k_offset + n0, p.n_k - n0, p.heads, h);
  cp_async_commit();

  // This thread's two key rows (block-local) of every C fragment: c[0], c[1] and c[2], c[3].
  const int t_local[2] = {16 * warp + lane / 4, 16 * warp + lane / 4 + 8};
  float dk[kHeadDimQK / 8][4], dv[kHeadDimV / 8][4];  // [16, 192], [16, 128] this warp's key rows
#pragma unroll
  for (int j = 0; j < kHeadDimQK / 8; ++j) dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
#pragma unroll
  for (int j = 0; j < kHeadDimV / 8; ++j) dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;

  // The first query that sees key n0 is n0 − diag (causal); earlier tiles are skipped.
  const int m_first = p.causal ? max(0, n0 - diag) / kBlockM * kBlockM : 0;
  for (int m0 = m_first; m0 < p.n_q; m0 += kBlockM) {
    __syncthreads();  // the previous step's readers of q, d_o, d_s are done
    load_rows<kChunksQK, kBlockM>(sm.q, p.q, p.q_offset + m0, p.n_q - m0, p.heads, h);
    load_rows<kChunksV, kBlockM>(sm.d_o, p.d_out, p.q_offset + m0, p.n_q - m0, p.heads, h);
    cp_async_commit();
    if (threadIdx.x < kBlockM) {
      const int r = m0 + threadIdx.x;
      const int64_t at = static_cast<int64_t>(h) * p.stats_stride + p.q_offset + r;
      sm.lse_log2[threadIdx.x] = r < p.n_q ? p.lse_log2[at] : INFINITY;
      sm.delta[threadIdx.x] = r < p.n_q ? p.delta[at] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();

    float s[kBlockM / 8][4] = {}, dp[kBlockM / 8][4] = {};  // [16 keys, kBlockM queries]
    mma_abt<kHeadDimQK / 16, kBlockM / 8, kChunksQK, kChunksQK>(s, sm.k, 16 * warp, sm.q, lane);
    mma_abt<kHeadDimV / 16, kBlockM / 8, kChunksV, kChunksV>(dp, sm.v, 16 * warp, sm.d_o, lane);

    // s becomes Pᵀ, dp becomes dSᵀ (masked: 0 past n_q, n_k and the causal diagonal); dS also goes to shared.
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * j + 2 * (lane % 4) + (e & 1), r = m0 + c, t = n0 + t_local[e / 2];
        const bool seen = r < p.n_q && t < p.n_k && (!p.causal || t <= r + diag);
        const float pv = seen ? exp2f(s[j][e] * p.scale_log2 - sm.lse_log2[c]) : 0.f;
        const float ds = seen ? pv * (dp[j][e] - sm.delta[c]) : 0.f;
        s[j][e] = pv;
        dp[j][e] = ds;
        sm.d_s[swizzle<kChunksS>(c, t_local[e / 2])] = __bfloat16_as_ushort(__float2bfloat16_rn(ds));
      }
    mma_cb<kHeadDimV / 8, kChunksV>(dv, s, sm.d_o, lane);
    mma_cb<kHeadDimQK / 8, kChunksQK>(dk, dp, sm.q, lane);
    __syncthreads();  // d_s complete
    accumulate_dq(sm, p, h, m0, warp, lane);
  }
  cp_async_wait<0>();  // a block that saw no query still waits for its K / V loads before exiting

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int t = n0 + t_local[i];
    if (t >= p.n_k) continue;
    const int64_t row = (p.k_offset + t) * p.heads + h;
    auto* gdK = static_cast<__nv_bfloat16*>(p.d_k) + row * kHeadDimQK + 2 * (lane % 4);
    auto* gdV = static_cast<__nv_bfloat16*>(p.d_v) + row * kHeadDimV + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadDimQK / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(gdK + 8 * j) =
          __floats2bfloat162_rn(dk[j][2 * i] * p.scale, dk[j][2 * i + 1] * p.scale);
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(gdV + 8 * j) = __floats2bfloat162_rn(dv[j][2 * i], dv[j][2 * i + 1]);
  }
}

}  // namespace mla::cuda::sm80::backward
