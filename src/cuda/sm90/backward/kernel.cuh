// The sm90 attention backward's main kernel (wgmma + TMA, bf16, q·k 192, v 128, causal bottom-right): one block =
// 128 keys of one head of one sequence, looping over the 64-query tiles that see them. The same key-major math as
// the sm80 kernel (src/cuda/sm80/backward/kernel.cuh), on warpgroup MMAs:
//
//  - two warpgroups (256 threads, up to 255 registers each), 64 keys each, keep their dK [64, 192] and dV [64, 128]
//    in registers (160 of them) through the whole loop; per step of 64 queries:
//      Sᵀ = K·Qᵀ, then dPᵀ = V·dOᵀ               (shared × shared)
//      Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dSᵀ = Pᵀ ⊙ (dPᵀ − D)      (masked: 0 past n_q, n_k, the diagonal)
//      dV += Pᵀ·dO, dK += dSᵀ·Q                   (Pᵀ, dSᵀ from registers: the C fragments are the A fragments)
//      dQ[:, 64c..64c+63] = dS·K[:, 64c..]         (dSᵀ of both warpgroups through shared memory, 128 keys deep),
//    the three 64-column chunks of dQ split between the warpgroups (two and one, alternating by step), staged in
//    shared memory and added to the fp32 accumulator by tensor reductions (cp.reduce.async.bulk.tensor); dQ runs
//    one step behind, on a double-buffered dSᵀ with "full" / "empty" mbarriers, so that the warpgroups never
//    wait for each other unless one falls a whole step behind;
//  - no producer warpgroup (a 384-thread block leaves 168 registers a thread; dK and dV alone take 160): Q, dO and
//    the tile's lse·log2(e) and D (all by TMA) arrive in a two-stage ring, each stage refilled with the step after
//    next by one thread of whichever warpgroup finishes with it second, so that nobody waits for a release.
//
// The tensor maps of q, k, v, d_out and the accumulator cover this sequence's rows only, so that the copies read
// zeros past n_q and n_k (never another sequence's rows: 0·NaN would reach dK and dQ). The lse / D map spans all
// tokens (a sequence's rows need not start at a 16-byte boundary, which a per-sequence map's base must); past n_q
// the kernel masks P by selection and takes D as 0.
// P and dS are rounded to bf16 before their MMAs (the sm80 kernel's rounding points); 2^x is MUFU.EX2 (the forward's
// sm90 kernel's). Shared memory is addressed through smem_raw plus an offset, never through an integer: the
// compiler then emits shared loads and stores, not generic ones.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/common/dependent_launch.cuh"
#include "cuda/sm80/backward/config.h"
#include "cuda/sm80/mma.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace mla::cuda::sm90::backward {

using sm80::backward::kHeadDimQK;
using sm80::backward::kHeadDimV;
using sm80::backward::Params;

constexpr int kBlockN = 128;  // keys per block: two consumer warpgroups of 64
constexpr int kBlockM = 64;   // queries per step
constexpr int kThreads = 256;  // two warpgroups of 64 keys; no producer warpgroup (see the header)
constexpr uint32_t kKVBytes = kBlockN * (kHeadDimQK + kHeadDimV) * 2;
// A step's lse·log2(e) and D: the box starts at the 16-byte boundary at or before the step's first query and
// reaches 4 past its last, so that any start offset (q_offset % 4) fits.
constexpr int kStatsBox = kBlockM + 4;
constexpr uint32_t kStepBytes = kBlockM * (kHeadDimQK + kHeadDimV) * 2 + 2 * kStatsBox * 4;  // Q, dO, lse, D

// This sequence's q, k, v and d_out ([rows][heads][columns]); boxes of 64 columns × 1 head × 64 or 128 rows.
struct Maps {
  CUtensorMap q, k, v, d_out;
  CUtensorMap d_q;  // the fp32 accumulator's rows of this sequence, boxes of 32 columns × 1 head × 64 rows
  CUtensorMap stats;  // lse·log2(e) and D of all tokens [2][H][total_q] (fp32), boxes of kStatsBox tokens × 1 head × 2
};

struct alignas(128) StepStats {
  float v[2][kStatsBox];  // [lse·log2(e), D][first query − q_offset % 4 ..]
};

// Tiles in 64-column, 128-byte-swizzled blocks of their rows (the layout the copies write and wgmma reads).
struct SharedMemoryPlan {
  uint16_t k[kBlockN * kHeadDimQK];      // [3 blocks][128 keys][64]
  uint16_t v[kBlockN * kHeadDimV];       // [2 blocks][128 keys][64]
  uint16_t q[2][kBlockM * kHeadDimQK];   // [stage][3 blocks][64 queries][64]
  uint16_t d_o[2][kBlockM * kHeadDimV];  // [stage][2 blocks][64 queries][64]
  uint16_t d_s[2][kBlockN * kBlockM];    // [step parity][128 keys][64 queries]: dSᵀ, bf16
  float d_q[2][kBlockM * 64];            // [warpgroup] one 64-column chunk of dQ, fp32: [2 halves][64 rows][32], swizzled
  StepStats stats[2];                    // [stage]
  uint64_t kv_full, full[2];
  uint64_t ds_full[2], ds_empty[2];      // [step parity] dSᵀ stored by all 256 threads / read by both dQ
  int released[2];                       // [stage] warpgroups done with it, counted up forever (parity: who is second)
};
constexpr size_t kSmemBytes = sizeof(SharedMemoryPlan) + 1024;
static_assert(kSmemBytes <= 227 * 1024, "one block per SM");

constexpr int kDqStage = 2;  // named barriers 2, 3: warpgroup 0's / 1's dQ chunk staging

// Descriptor offsets (16-byte units) of k-step kk along a K-major tile of kRows rows (64-column blocks), and of
// 16 rows down an MN-major one.
template <int kRows>
__device__ __forceinline__ uint32_t k_major_step(int kk) {
  return static_cast<uint32_t>(((kk / 4) * kRows * 64 + (kk % 4) * 16) * 2 / 16);
}
__device__ __forceinline__ uint32_t mn_major_step(int kk) { return static_cast<uint32_t>(kk * 16 * 64 * 2 / 16); }

__device__ __forceinline__ uint32_t at32(uint32_t base, uint32_t offset) {
  asm volatile("" : "+r"(base));
  return base + offset;
}

// Every descriptor here has a 1024-byte stride offset and the 128-byte swizzle: its upper 32 bits are this
// constant, and only the lower half (start address, leading byte offset) is kept in a register and stepped.
constexpr uint64_t kDescHigh = (uint64_t{1024 >> 4} | (uint64_t{1} << 30)) << 32;
__device__ __forceinline__ uint32_t desc_low(const void* smem, uint32_t lbo_bytes) {
  return (sm80::smem_addr(smem) >> 4) | ((lbo_bytes >> 4) << 16);
}
// The descriptor `offset` 16-byte units past `base`. The bases derive from warp-uniform values only (see wg in the
// kernel), so the compiler keeps them in uniform registers. (With the bases in ordinary registers, every k-step's
// descriptor was formed at its MMA behind an empty volatile asm, else all were hoisted into a hundred-odd
// registers: 4-5% slower, same run.)
__device__ __forceinline__ uint64_t at(uint32_t base, uint32_t offset) { return kDescHigh | (base + offset); }

// c [64 keys, 64 queries] = A·Bᵀ over kSteps k-steps of 16, both K-major in shared memory: A this warpgroup's
// rows of K or V (blocks of kBlockN rows), B the step's Q or dO tile (blocks of kBlockM rows); returns once done.
template <int kSteps>
__device__ __forceinline__ void product_t(float (&c)[32], uint32_t desc_a, uint32_t desc_b) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    wgmma_m64n64k16_ss(c, at(desc_a, k_major_step<kBlockN>(kk)), at(desc_b, k_major_step<kBlockM>(kk)), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(c);
}

// Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e) in place over the tile's 64 queries; 0 where the key does not see the
// query (past n_q or n_k, or beyond the diagonal).
__device__ __forceinline__ void probabilities(float (&s)[32], const float* lse, int m0, int n0, const int (&key)[2],
                                              int diag, int lane, const Params& p) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = 8 * j + 2 * (lane % 4) + e, r = m0 + c;
      const float l = lse[c];
#pragma unroll
      for (int kh = 0; kh < 2; ++kh) {
        const int tk = n0 + key[kh];
        const bool seen = r < p.n_q && tk < p.n_k && (!p.causal || tk <= r + diag);
        float& x = s[4 * j + 2 * kh + e];
        x = seen ? ex2(fmaf(x, p.scale_log2, -l)) : 0.f;
      }
    }
}

// dSᵀ = Pᵀ ⊙ (dPᵀ − D) for one k-step (16 queries) of A fragments: pf[r] holds the bf16 Pᵀ of columns
// 8(r / 2) + 2(lane % 4) + {0, 1} of key row half r % 2, dp[kOffset + 2r + {0, 1}] the matching fp32 dPᵀ, d the
// step's 16 values of D.
template <int kOffset, bool kTail, int N>
__device__ __forceinline__ void d_scores(uint32_t (&sf)[4], const uint32_t (&pf)[4], const float (&dp)[N], const float* d,
                                         int valid, int lane) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float2 pv = make_float2(__uint_as_float(pf[r] << 16), __uint_as_float(pf[r] & 0xffff0000u));
    const int c = 8 * (r / 2) + 2 * (lane % 4);
    float2 dd = make_float2(d[c], d[c + 1]);
    if (kTail) dd = make_float2(c < valid ? dd.x : 0.f, c + 1 < valid ? dd.y : 0.f);
    sf[r] = sm80::pack_bf16(pv.x * (dp[kOffset + 2 * r] - dd.x), pv.y * (dp[kOffset + 2 * r + 1] - dd.y));
  }
}

// Step m0's Q and dO tiles and its 64 queries' lse·log2(e) and D into stage st, by tensor copies completing on
// full[st]. One thread. (The stats by 4-byte cp.async instead: 0-1.6% slower, same run.)
__device__ __forceinline__ void load_step(SharedMemoryPlan& sm, const Maps& maps, const Params& p, int h, int m0, int st) {
  mbarrier_arrive_expect_tx(&sm.full[st], kStepBytes);
  tma_load_3d(sm.stats[st].v[0], &maps.stats, &sm.full[st], static_cast<int>(p.q_offset & ~int64_t{3}) + m0, h, 0);
#pragma unroll
  for (int c = 0; c < 3; ++c) tma_load_3d(sm.q[st] + c * kBlockM * 64, &maps.q, &sm.full[st], 64 * c, h, m0);
#pragma unroll
  for (int c = 0; c < 2; ++c) tma_load_3d(sm.d_o[st] + c * kBlockM * 64, &maps.d_out, &sm.full[st], 64 * c, h, m0);
}

// dQ[m0.., :] += dS·K for step i's tile: dSᵀ of both warpgroups at desc_ds (128 keys deep), in 64-column chunks,
// warpgroup wg taking columns 0..127 on steps where i + wg is even and 128..191 on the others. Each chunk goes
// through this warpgroup's staging tile (free once the previous chunk's reduction has read it) and one thread
// adds it to the accumulator by two tensor reductions (rows past n_q fall outside the map); measured 7-10% faster
// than vector atomics from the registers (same run).
__device__ __forceinline__ void accumulate_dq(SharedMemoryPlan& sm, const Maps& maps, uint32_t desc_ds, uint32_t desc_k_mn,
                                              int m0, int i, int h, int t) {
  const int wg = t / 128, warp = (t / 32) % 4, lane = t % 32;
  const int c_begin = ((i + wg) & 1) ? 2 : 0, c_end = c_begin == 2 ? 3 : 2;
#pragma unroll 1
  for (int c = c_begin; c < c_end; ++c) {
    float dq[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      wgmma_m64n64k16_ss_tt(dq, at(desc_ds, mn_major_step(kk)), at(desc_k_mn, c * kBlockN * 64 * 2 / 16 + mn_major_step(kk)),
                            kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dq);
    if (t % 128 == 0) bulk_wait_read();
    named_sync(kDqStage + wg, 128);
    const uint32_t stage = sm80::smem_addr(sm.d_q[wg]);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = 16 * warp + lane / 4 + 8 * half;  // row % 8 = lane / 4
#pragma unroll
      for (int j0 = 0; j0 < 8; ++j0) {
        // Columns 8j + 2(lane % 4): tile half j / 4, 16-byte chunk 2(j % 4) + (lane % 4) / 2, swizzled by row % 8.
        // Rows r and r ^ 1 of a half-warp would hit the same chunk pair (two-way bank conflicts, measured); odd
        // rows store column group j ^ 2 in this instruction instead (same tile half).
        const bool odd = (lane / 4) % 2;
        const int j = odd ? j0 ^ 2 : j0;
        const uint32_t chunk = (2 * (j % 4) + (lane % 4) / 2) ^ (lane / 4);
        const float x = odd ? dq[4 * (j0 ^ 2) + 2 * half] : dq[4 * j0 + 2 * half];
        const float y = odd ? dq[4 * (j0 ^ 2) + 2 * half + 1] : dq[4 * j0 + 2 * half + 1];
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at32(stage, ((j / 4) * kBlockM * 32 + row * 32) * 4) +
                                                                 chunk * 16 + (lane % 2) * 8),
                     "f"(x), "f"(y)
                     : "memory");
      }
    }
    fence_proxy_async();
    named_sync(kDqStage + wg, 128);
    if (t % 128 == 0) {
      tma_reduce_add_3d(&maps.d_q, sm.d_q[wg], 64 * c, h, m0);
      tma_reduce_add_3d(&maps.d_q, sm.d_q[wg] + kBlockM * 32, 64 * c + 32, h, m0);
      bulk_commit();
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  // Aligned by pointer arithmetic on smem_raw (not through an integer): the compiler then knows every access is
  // to shared memory (LDS/STS, not generic loads).
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>(smem_raw + ((1024 - (sm80::smem_addr(smem_raw) & 1023)) & 1023));
  // The next sequence's grid (a programmatic dependent: it shares no data with this one) may start its blocks once
  // every block of this grid has started.
  allow_dependent_launch();
  const int n0 = blockIdx.x * kBlockN, h = blockIdx.y;
  const int diag = p.n_k - p.n_q;  // query r sees keys t <= r + diag
  // The first query that sees key n0 is n0 − diag (causal); earlier tiles are skipped.
  const int m_first = p.causal ? max(0, n0 - diag) / kBlockM * kBlockM : 0;
  const int steps = m_first < p.n_q ? (p.n_q - m_first + kBlockM - 1) / kBlockM : 0;
  // wg broadcast from lane 0: the compiler then knows it is warp-uniform and keeps what derives from it (the MMA
  // descriptors) in uniform registers.
  const int t = threadIdx.x, wg = __shfl_sync(0xffffffffu, t / 128, 0), warp = (t / 32) % 4, lane = t % 32;
  if (t == 0) {
    mbarrier_init(&sm.kv_full, 1);
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      mbarrier_init(&sm.full[st], 1), sm.released[st] = 0;
      mbarrier_init(&sm.ds_full[st], kThreads), mbarrier_init(&sm.ds_empty[st], kThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (t == 0 && steps > 0) {  // K and V, the first two steps (a block that sees no query loads nothing)
    mbarrier_arrive_expect_tx(&sm.kv_full, kKVBytes);
#pragma unroll
    for (int c = 0; c < 3; ++c) tma_load_3d(sm.k + c * kBlockN * 64, &maps.k, &sm.kv_full, 64 * c, h, n0);
#pragma unroll
    for (int c = 0; c < 2; ++c) tma_load_3d(sm.v + c * kBlockN * 64, &maps.v, &sm.kv_full, 64 * c, h, n0);
    for (int i = 0; i < min(steps, 2); ++i) load_step(sm, maps, p, h, m_first + i * kBlockM, i);
  }
  const int key[2] = {64 * wg + 16 * warp + lane / 4, 64 * wg + 16 * warp + lane / 4 + 8};  // block-local rows

  float dk[kHeadDimQK / 2], dv[kHeadDimV / 2];  // [64, 192], [64, 128]: element 4j + 2i + e = row half i, column 8j + 2(lane%4) + e
#pragma unroll
  for (int j = 0; j < kHeadDimQK / 2; ++j) dk[j] = 0.f;
#pragma unroll
  for (int j = 0; j < kHeadDimV / 2; ++j) dv[j] = 0.f;

  // K-major operands (Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ): this warpgroup's 64 rows of K and V, all rows of Q and dO. MN-major
  // ones (dV += Pᵀ·dO, dK += dSᵀ·Q, dQ = dS·K): rows along k, the 64-column blocks kRows·128 bytes apart. Stage 1
  // is stage 0's descriptor plus the stage's size (16-byte units): fewer registers held.
  const uint32_t desc_k = desc_low(sm.k + 64 * wg * 64, 16), desc_v = desc_low(sm.v + 64 * wg * 64, 16);
  const uint32_t desc_q = desc_low(sm.q[0], 16), desc_do = desc_low(sm.d_o[0], 16);
  const uint32_t desc_q_mn = desc_low(sm.q[0], kBlockM * 128), desc_do_mn = desc_low(sm.d_o[0], kBlockM * 128);
  const uint32_t desc_ds = desc_low(sm.d_s[0], kBlockN * 128), desc_k_mn = desc_low(sm.k, kBlockN * 128);

  if (steps > 0) mbarrier_wait(&sm.kv_full, 0);
#pragma unroll 1
  for (int i = 0; i < steps; ++i) {
    const int st = i & 1, m0 = m_first + i * kBlockM;
    // This step's descriptors (stage st).
    const uint32_t q_st = desc_q + st * (sizeof(sm.q[0]) / 16), do_st = desc_do + st * (sizeof(sm.d_o[0]) / 16);
    const uint32_t q_mn_st = desc_q_mn + st * (sizeof(sm.q[0]) / 16), do_mn_st = desc_do_mn + st * (sizeof(sm.d_o[0]) / 16);
    // Sᵀ, then dPᵀ (dK and dV hold 160 registers: the two fp32 tiles in flight together spill, and measured 6%
    // slower; in halves of 32 queries, 5% slower). Pᵀ waits in bf16 (its A fragments) while dPᵀ is computed;
    // dSᵀ = Pᵀ ⊙ (dPᵀ − D) takes that rounded Pᵀ.
    uint32_t pf[4][4], sf[4][4];  // A fragments of Pᵀ and dSᵀ
    mbarrier_wait(&sm.full[st], (i >> 1) & 1);
    const int shift = static_cast<int>(p.q_offset & 3);  // the step's first query within the stats box
    const float* lse = sm.stats[st].v[0] + shift;
    const float* d = sm.stats[st].v[1] + shift;
    {
      float s[32];  // Sᵀ [64 keys, 64 queries]
      product_t<kHeadDimQK / 16>(s, desc_k, q_st);
      probabilities(s, lse, m0, n0, key, diag, lane, p);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) pf[kk][r] = sm80::pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
    }
    {
      float dp[32];  // dPᵀ [64 keys, 64 queries]
      product_t<kHeadDimV / 16>(dp, desc_v, do_st);
      // Past n_q the stats tile holds other sequences' D (or zeros): 0 there, so that dSᵀ is exactly 0.
      const int valid = p.n_q - m0;
      if (valid >= kBlockM) {
        d_scores<0, false>(sf[0], pf[0], dp, d, valid, lane);
        d_scores<8, false>(sf[1], pf[1], dp, d + 16, valid - 16, lane);
        d_scores<16, false>(sf[2], pf[2], dp, d + 32, valid - 32, lane);
        d_scores<24, false>(sf[3], pf[3], dp, d + 48, valid - 48, lane);
      } else {
        d_scores<0, true>(sf[0], pf[0], dp, d, valid, lane);
        d_scores<8, true>(sf[1], pf[1], dp, d + 16, valid - 16, lane);
        d_scores<16, true>(sf[2], pf[2], dp, d + 32, valid - 32, lane);
        d_scores<24, true>(sf[3], pf[3], dp, d + 48, valid - 48, lane);
      }
    }

    // dSᵀ to shared memory for dQ (before the MMAs below read sf: no access to registers in flight), then
    // dV += Pᵀ·dO, dK += dSᵀ·Q.
    // Row key[half] of the swizzled tile holds columns 8j.. in 16-byte chunk j ^ (row % 8), row % 8 = lane / 4.
    // Each address is formed at its store (at32): hoisted out of the loop, the sixteen would hold sixteen registers.
    if (i >= 2) mbarrier_wait(&sm.ds_empty[st], ((i >> 1) - 1) & 1);  // both dQ of step i - 2 read this buffer
    const uint32_t ds_row = sm80::smem_addr(sm.d_s[st]) + (key[0] * 64 + 2 * (lane % 4)) * 2;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at32(ds_row, half * 8 * 64 * 2) + ((j ^ (lane / 4)) << 4)),
                     "r"(sf[j / 2][2 * (j % 2) + half])
                     : "memory");
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k16_rs_tb(dv, pf[kk], at(do_mn_st, mn_major_step(kk)));
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n192k16_rs_tb(dk, sf[kk], at(q_mn_st, mn_major_step(kk)));
    wgmma_commit();
    fence_proxy_async();  // generic stores, read by wgmma
    mbarrier_arrive(&sm.ds_full[st]);
    wgmma_wait<0>();  // dV, dK done: this stage's Q, dO, lse and D are no longer read
    fence_operands(dk);
    fence_operands(dv);
    // dQ of the previous step, whose dSᵀ both warpgroups stored by now unless one runs a step behind: one step
    // of slack between the warpgroups (a barrier on this step's dSᵀ kept them in lockstep: 2-3% slower; starting
    // warpgroup 1 half a step late on top: 1-2% slower, same runs).
    if (i > 0) {
      mbarrier_wait(&sm.ds_full[st ^ 1], ((i - 1) >> 1) & 1);
      accumulate_dq(sm, maps, desc_ds + (st ^ 1) * (sizeof(sm.d_s[0]) / 16), desc_k_mn, m0 - kBlockM, i - 1, h, t);
      mbarrier_arrive(&sm.ds_empty[st ^ 1]);
    }
    // The second warpgroup done with stage st refills it with step i + 2 (one thread; nobody waits). After dQ,
    // not before it: 1-1.5% faster (same run).
    if (t % 128 == 0 && i + 2 < steps && (atomicAdd(&sm.released[st], 1) & 1))
      load_step(sm, maps, p, h, m0 + 2 * kBlockM, st);
  }
  if (steps > 0) {
    mbarrier_wait(&sm.ds_full[(steps - 1) & 1], ((steps - 1) >> 1) & 1);
    accumulate_dq(sm, maps, desc_ds + ((steps - 1) & 1) * (sizeof(sm.d_s[0]) / 16), desc_k_mn,
                  m_first + (steps - 1) * kBlockM, steps - 1, h, t);
  }
  if (t % 128 == 0) bulk_wait();  // the reductions are done before the block's shared memory goes

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int tk = n0 + key[half];
    if (tk >= p.n_k) continue;
    const int64_t row = (p.k_offset + tk) * p.heads + h;
    auto* gdK = static_cast<__nv_bfloat16*>(p.d_k) + row * kHeadDimQK + 2 * (lane % 4);
    auto* gdV = static_cast<__nv_bfloat16*>(p.d_v) + row * kHeadDimV + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadDimQK / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(gdK + 8 * j) =
          __floats2bfloat162_rn(dk[4 * j + 2 * half] * p.scale, dk[4 * j + 2 * half + 1] * p.scale);
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(gdV + 8 * j) = __floats2bfloat162_rn(dv[4 * j + 2 * half], dv[4 * j + 2 * half + 1]);
  }
  // ... but no block ends before the grid it depends on has completed: completion chains back to the first
  // sequence, and whatever follows the last grid (the dQ conversion) sees every sequence's writes.
  grid_dependency_wait();
#else
  __trap();
#endif
}

}  // namespace mla::cuda::sm90::backward
