// The per-warpgroup steps of the sm90 expanded-prefill kernel (kernel.cuh): 64 query rows × a tile of kN keys,
// S = Q·Kᵀ and O += P·V on warpgroup MMAs, the online softmax in the log2 domain between them. Kept apart from
// the kernel's schedule (who loads, who waits, whose turn it is) so that each reads on its own.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/sm80/mma.cuh"
#include "cuda/sm80/prefill/config.h"
#include "cuda/sm90/wgmma.cuh"

namespace mla::cuda::sm90::prefill {

using sm80::prefill::kHeadDimQK;
using sm80::prefill::kHeadDimV;
using sm80::prefill::Params;

constexpr int kBlockM = 128;  // query rows per block: two warpgroups of 64

// Element offset of (row, col) in a tile of 64-column, 128-byte-swizzled blocks of `kRows` rows (the layout the
// tensor copies write and wgmma reads).
template <int kRows>
__device__ __forceinline__ int blocked(int row, int col) {
  return (col >> 6) * (kRows * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

// S = Q·K_tileᵀ for this warpgroup's 64 rows: 12 k-steps of m64nNk16, both operands in shared memory.
template <int kN>
__device__ __forceinline__ void issue_s(float (&s)[kN / 2], uint64_t desc_q, uint64_t desc_k) {
#pragma unroll
  for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
    const int block = kk / 4, within = (kk % 4) * 16;  // elements; descriptors count 16-byte units
    const uint64_t dq = desc_q + (block * kBlockM * 64 + within) * 2 / 16;
    const uint64_t dk = desc_k + (block * kN * 64 + within) * 2 / 16;
    static_assert(kN == 128, "the kernel's key tile");
    wgmma_m64n128k16_ss(s, dq, dk, kk > 0 ? 1 : 0);
  }
}

// O += P·V_tile: P from registers (the S accumulator fragment of keys 16kk..16kk+15 is the A fragment of
// k-step kk), V read MN-major ("transposed") from shared memory.
template <int kN>
__device__ __forceinline__ void issue_pv(float (&o)[kHeadDimV / 2], const uint32_t (&pf)[kN / 16][4], uint64_t desc_v) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) wgmma_m64n128k16_rs_tb(o, pf[kk], desc_v + kk * 16 * 64 * 2 / 16);
}

// Online softmax of one S tile (log2 domain, raw scores scaled inside the exponent's FMA). `masked`: apply
// the per-row key limits (causal diagonal, n_k); tiles left of every row's limit skip it. Leaves the
// probabilities (fp32, unrounded) in s, the running max / partial sum updated and alpha = the factor by which
// the O accumulated so far must be scaled.
template <int kN>
__device__ __forceinline__ void softmax_tile(float (&s)[kN / 2], bool masked, int t0, const int (&limit)[2], int lane,
                                             float scale, float (&m_run)[2], float (&l_run)[2], float (&alpha)[2]) {
#pragma unroll
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * j + 2 * i + e];
        if (masked && t0 + 8 * j + 2 * (lane % 4) + e >= limit[i]) x = -INFINITY;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // max(round(x·c)) = round(max(x)·c) for c > 0: the same running max as the sm80 kernel's scale-then-max.
    const float m_new = fmaxf(m_run[i], mx * scale);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    alpha[i] = ex2(m_run[i] - m_use);
    m_run[i] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * j + 2 * i + e];
        x = ex2(fmaf(x, scale, -m_use));
        sum += x;
      }
    l_run[i] = l_run[i] * alpha[i] + sum;  // this thread's columns; summed over the quad at the end (as the sm80 kernel)
  }
}

// A shared-memory store of values that depend on every exponential of the tile, issued just before the
// wait for P·V. ptxas (13.0) hoists a wgmma.wait_group above independent arithmetic (it put the wait right
// behind the first max shuffle, so the softmax no longer overlapped P·V), but not above a shared-memory store:
// this store pins the wait behind the whole softmax. The slot is this thread's own and never read.
__device__ __forceinline__ void pin_wait_behind(float* slot, const float (&l_run)[2]) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(slot))),
               "f"(l_run[0]), "f"(l_run[1])
               : "memory");
}

template <int kN>
__device__ __forceinline__ void pack_p(uint32_t (&pf)[kN / 16][4], const float (&s)[kN / 2]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) pf[kk][r] = sm80::pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

__device__ __forceinline__ void rescale_o(float (&o)[kHeadDimV / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kHeadDimV / 8; ++j) {
    o[4 * j + 0] *= alpha[0], o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1], o[4 * j + 3] *= alpha[1];
  }
}

}  // namespace mla::cuda::sm90::prefill
