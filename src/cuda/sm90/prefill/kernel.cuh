// The sm90 expanded-prefill kernel (wgmma + TMA, bf16, q·k 192, v 128, causal bottom-right). One block = 128
// queries of one head. Per warpgroup and key tile j (mainloop.cuh): issue S = Q·K_{j+1}ᵀ, then O += P_j·V_j, run
// the softmax of S while P·V is in flight (FlashAttention-3's intra-warpgroup overlap), and in addition:
//
//  - a producer warpgroup (24 registers after setmaxnreg; one thread issues the copies) loads Q once and the K
//    and V tiles of 128 keys by TMA into a two-stage ring; each stage has a "full" mbarrier (transaction bytes) and an
//    "empty" one that the 256 consumer threads arrive on once they have read it, so a warpgroup only ever
//    waits for data, never for the other warpgroup;
//  - the two consumer warpgroups (240 registers; 64 query rows each) take turns at the tensor pipe: a
//    warpgroup issues its S and P·V, then hands the turn to the other (two named barriers), so that one
//    warpgroup's exponentials run while the other's GEMMs do, on top of the overlap inside each warpgroup.
//
// The tensor maps span the whole packed q, k and v; a block reads its sequence's rows at its token offsets. Rows
// past n_q are computed but never stored; keys past n_k are masked by value (a NaN there never reaches the max or
// the sums), and the V rows past n_k of the last tile, which belong to the next sequence, are zeroed by the producer
// warpgroup before P·V reads them (P is 0 there, but 0·NaN is NaN). With device-side cu_seqlens (Params::cu_q) one
// launch covers the batch: block g is the g-th 128-row query block of the batch (find_slot). P is rounded to bf16 before P·V, the row sums are fp32 sums of the
// unrounded probabilities, O is written in bf16 (the sm80 kernel's rounding points; not bitwise equal to it: the
// exponent is one FFMA and 2^x is MUFU.EX2 without exp2f's subnormal fixup).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/sm80/mma.cuh"
#include "cuda/sm80/prefill/config.h"
#include "cuda/sm90/prefill/mainloop.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace mla::cuda::sm90::prefill {

constexpr int kN = 128;                 // keys per tile
constexpr int kConsumerThreads = 256;   // two warpgroups of 64 query rows
constexpr int kThreads = 128 + kConsumerThreads;
constexpr uint32_t kQBytes = kBlockM * kHeadDimQK * 2, kKBytes = kN * kHeadDimQK * 2, kVBytes = kN * kHeadDimV * 2;

// The tensors of one sequence, [tokens][heads][columns] with columns contiguous. k_tail is used by the strided
// layout only (K columns 128..191 from the latent rows).
struct Maps {
  CUtensorMap q, k, k_tail, v;
};

struct SharedMemoryPlan {
  uint16_t q[kBlockM * kHeadDimQK];  // [3 blocks][128 rows][64]
  uint16_t k[2][kN * kHeadDimQK];    // [stage][3 blocks][128 keys][64]
  uint16_t v[2][kN * kHeadDimV];     // [stage][2 blocks][128 keys][64]
  float sink[2 * kConsumerThreads];  // see pin_wait_behind
  uint64_t q_full, k_full[2], v_full[2], k_empty[2], v_empty[2], v_zeroed;
};
constexpr size_t kSmemBytes = sizeof(SharedMemoryPlan) + 1024;
static_assert(kSmemBytes <= 227 * 1024, "one block per SM");

enum NamedBarrier : int { kTurn0 = 1, kTurn1 = 2, kProducer = 3 };  // "warpgroup g may issue its GEMMs"

// What one block works on: 128 query rows (block m_block) of one sequence (m_block < 0: nothing). Kept in shared
// memory, so that the offsets the epilogue needs hold no registers through the main loop.
struct Slot {
  int n_q, n_k, m_block;
  int64_t q_offset, k_offset;
};

// The block's slot. One sequence per launch: from the parameters, query blocks in reverse order (longest causal
// rows first). With device-side cu_seqlens: warp 0 scans the batch's query-block counts (32 sequences per step)
// and takes block blockIdx.x of the batch, again longest rows first within each sequence; every bound is clamped
// into [0, total] so that unchecked lengths cannot reach outside the tensors (a spare block of the launch gets
// m_block = -1). Ends with a block barrier.
__device__ __forceinline__ void find_slot(const Params& p, Slot& slot) {
  if (!p.cu_q) {
    if (threadIdx.x == 0) slot = {p.n_q, p.n_k, static_cast<int>(gridDim.x - 1 - blockIdx.x), p.q_offset, p.k_offset};
    __syncthreads();
    return;
  }
  __shared__ long long found[4];  // b (-1: none), m_block, q0, q1 of the sequence
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const long long g = blockIdx.x;
    long long before = 0;
    if (lane == 0) found[0] = -1;
    __syncwarp();
    for (int base = 0; base < p.batch; base += 32) {
      const int b = base + lane;
      long long q0 = 0, q1 = 0;
      if (b < p.batch) {
        q0 = min(max(static_cast<long long>(p.cu_q[b]), 0LL), static_cast<long long>(p.total_q));
        q1 = min(max(static_cast<long long>(p.cu_q[b + 1]), q0), static_cast<long long>(p.total_q));
      }
      const int blocks = static_cast<int>((q1 - q0 + kBlockM - 1) / kBlockM);
      int incl = blocks;
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += up;
      }
      const long long start = before + incl - blocks;
      const bool mine = g >= start && g < start + blocks;
      if (mine) found[0] = b, found[1] = blocks - 1 - (g - start), found[2] = q0, found[3] = q1;
      if (__ballot_sync(0xffffffffu, mine)) break;
      before += __shfl_sync(0xffffffffu, incl, 31);
    }
    __syncwarp();
    if (lane == 0) {
      const long long b = found[0];
      if (b < 0) {
        slot.m_block = -1;
      } else {
        const long long k0 = min(max(static_cast<long long>(p.cu_k[b]), 0LL), static_cast<long long>(p.total_k));
        const long long k1 = min(max(static_cast<long long>(p.cu_k[b + 1]), k0), static_cast<long long>(p.total_k));
        slot = {static_cast<int>(found[3] - found[2]), static_cast<int>(k1 - k0), static_cast<int>(found[1]), found[2], k0};
      }
    }
  }
  __syncthreads();
}

// The whole producer warpgroup, after its thread 0 issued the last copies: zeroes the V rows [n_k, 128·tiles) of
// the last tile, which hold the next sequence's values, then lets the consumers read that tile (v_zeroed instead
// of its v_full). Only thread 0 waits, once produce() has issued the last copy: the stage's earlier rounds are then
// complete (their V was released), so the barrier is in the last round's phase and its parity wait is exact (a
// parity wait is only meaningful at most one phase ahead: earlier, it passes at once; two behind, it never does).
// The warp is reconverged before each bar.sync, which needs whole warps.
__device__ __forceinline__ void zero_v_tail(SharedMemoryPlan& sm, int tiles, int n_k) {
  const int last = tiles - 1, st = last & 1, first = n_k - last * kN;
  if (threadIdx.x == 0) mbarrier_wait(&sm.v_full[st], (last >> 1) & 1);
  __syncwarp();
  named_sync(kProducer, 128);
  for (int i = threadIdx.x; i < 2 * kN * 8; i += 128) {  // [2 blocks][kN rows][8 chunks of 16 bytes]
    const int block = i / (kN * 8), row = i / 8 % kN, chunk = i % 8;
    if (row >= first) *reinterpret_cast<uint4*>(sm.v[st] + block * kN * 64 + row * 64 + chunk * 8) = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();  // generic-proxy zeros, read by wgmma
  __syncwarp();
  named_sync(kProducer, 128);
  if (threadIdx.x == 0) mbarrier_arrive(&sm.v_zeroed);
}

// The producer's loop (one thread): Q, then per tile K then V, each into its stage once both consumer
// warpgroups have released the stage's previous tile.
template <bool kStrided>
__device__ __forceinline__ void produce(SharedMemoryPlan& sm, const Maps& maps, int h, int h_tail, int q_row, int k_row,
                                        int tiles) {
  mbarrier_arrive_expect_tx(&sm.q_full, kQBytes);
#pragma unroll
  for (int c = 0; c < 3; ++c) tma_load_3d(sm.q + c * kBlockM * 64, &maps.q, &sm.q_full, 64 * c, h, q_row);
  for (int j = 0; j < tiles; ++j) {
    const int st = j & 1, round = j >> 1;
    if (round > 0) mbarrier_wait(&sm.k_empty[st], (round - 1) & 1);
    mbarrier_arrive_expect_tx(&sm.k_full[st], kKBytes);
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      if (kStrided && c == 2) tma_load_3d(sm.k[st] + c * kN * 64, &maps.k_tail, &sm.k_full[st], 0, h_tail, k_row + j * kN);
      else tma_load_3d(sm.k[st] + c * kN * 64, &maps.k, &sm.k_full[st], 64 * c, h, k_row + j * kN);
    }
    if (round > 0) mbarrier_wait(&sm.v_empty[st], (round - 1) & 1);
    mbarrier_arrive_expect_tx(&sm.v_full[st], kVBytes);
#pragma unroll
    for (int c = 0; c < 2; ++c) tma_load_3d(sm.v[st] + c * kN * 64, &maps.v, &sm.v_full[st], 64 * c, h, k_row + j * kN);
  }
}

template <bool kStrided>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  if (threadIdx.x == 0) {
    mbarrier_init(&sm.q_full, 1), mbarrier_init(&sm.v_zeroed, 1);
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      mbarrier_init(&sm.k_full[st], 1), mbarrier_init(&sm.v_full[st], 1);
      mbarrier_init(&sm.k_empty[st], kConsumerThreads), mbarrier_init(&sm.v_empty[st], kConsumerThreads);
    }
    fence_barrier_init();
  }
  __shared__ Slot slot;
  find_slot(p, slot);  // ends with a block barrier: the mbarriers are initialised too
  if (slot.m_block < 0) return;
  const int n_q = slot.n_q, n_k = slot.n_k;
  const int m0 = slot.m_block * kBlockM, h = blockIdx.y;
  const int diag = n_k - n_q;
  const int last_row = min(m0 + kBlockM, n_q) - 1;
  const int key_end = p.causal ? min(n_k, last_row + diag + 1) : n_k;
  const int tiles = key_end > 0 ? (key_end + kN - 1) / kN : 0;
  // The last tile runs past the sequence's keys into rows of the tensor (the next sequence's): zero its V tail.
  const bool zero_tail = tiles > 0 && tiles * kN > n_k && slot.k_offset + n_k < p.total_k;

  if (threadIdx.x < 128) {  // producer warpgroup
    set_max_registers_dec<24>();  // the consumers' 2 · 128 · 240 fit only beside 24 (168 at launch)
    if (threadIdx.x == 0)
      produce<kStrided>(sm, maps, h, p.k_tail_head != 0 ? h : 0, static_cast<int>(slot.q_offset + m0),
                        static_cast<int>(slot.k_offset), tiles);
    __syncwarp();
    if (zero_tail) zero_v_tail(sm, tiles, n_k);
    return;
  }
  set_max_registers_inc<240>();
  const int t = threadIdx.x - 128, wg = t / 128, lane = t % 32, mw = (t / 32) % 4;
  // Tiles [0, first_masked) end at or before the smallest key limit of the block's rows: no mask needed.
  const int limit_min = p.causal ? min(n_k, m0 + diag + 1) : n_k;
  const int first_masked = limit_min > 0 ? limit_min / kN : 0;
  const int r_local[2] = {16 * mw + lane / 4, 16 * mw + lane / 4 + 8};
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) limit[i] = p.causal ? min(n_k, m0 + 64 * wg + r_local[i] + diag + 1) : n_k;

  float o[kHeadDimV / 2];  // O[64, 128]: o[4j + e] = column chunk j, fragment element e
#pragma unroll
  for (int j = 0; j < kHeadDimV / 2; ++j) o[j] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2] = {0.f, 0.f};
  const uint64_t desc_q = make_desc(sm.q + 64 * wg * 64, 16, 1024);
  const uint64_t desc_k[2] = {make_desc(sm.k[0], 16, 1024), make_desc(sm.k[1], 16, 1024)};
  const uint64_t desc_v[2] = {make_desc(sm.v[0], kN * 64 * 2, 1024), make_desc(sm.v[1], kN * 64 * 2, 1024)};
  const int my_turn = wg == 0 ? kTurn0 : kTurn1, other_turn = wg == 0 ? kTurn1 : kTurn0;

  if (tiles > 0) {
    float s[kN / 2];
    uint32_t pf[kN / 16][4];
    mbarrier_wait(&sm.q_full, 0);
    mbarrier_wait(&sm.k_full[0], 0);
    fence_operands(s);
    wgmma_fence();
    issue_s<kN>(s, desc_q, desc_k[0]);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);
    mbarrier_arrive(&sm.k_empty[0]);
    softmax_tile<kN>(s, first_masked == 0, 0, limit, lane, p.scale_log2, m_run, l_run, alpha);
    pack_p<kN>(pf, s);

    // Steps j = 0 .. tiles-2, in turns: warpgroup 0 first; warpgroup 1's last hand-over is skipped so that
    // every arrival on a turn barrier is matched by a wait.
    const int steps = tiles - 1;
    if (wg == 1 && steps > 0) named_arrive(kTurn0, kConsumerThreads);
    int j = 0;
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const bool masked = pass == 1;
      const int j_end = masked ? steps : min(steps, first_masked - 1);
#pragma unroll 1
      for (; j < j_end; ++j) {
        const int next = (j + 1) & 1, cur = j & 1;
        mbarrier_wait(sm.k_full + next, ((j + 1) >> 1) & 1);
        named_sync(my_turn, kConsumerThreads);
        wgmma_fence();
        issue_s<kN>(s, desc_q, next ? desc_k[1] : desc_k[0]);  // selects: no local memory
        wgmma_commit();
        fence_operands(o);
        rescale_o(o, alpha);
        mbarrier_wait(&sm.v_full[cur], (j >> 1) & 1);
        wgmma_fence();
        issue_pv<kN>(o, pf, cur ? desc_v[1] : desc_v[0]);
        wgmma_commit();
        if (wg == 0 || j + 1 < steps) named_arrive(other_turn, kConsumerThreads);
        wgmma_wait<1>();  // S done, P·V in flight
        fence_operands(s);
        mbarrier_arrive(&sm.k_empty[next]);
        softmax_tile<kN>(s, masked, (j + 1) * kN, limit, lane, p.scale_log2, m_run, l_run, alpha);
        pin_wait_behind(sm.sink + 2 * t, l_run);
        wgmma_wait<0>();  // P·V done: pf, o and V_j free
        fence_operands(s);
        fence_operands(o);
        mbarrier_arrive(&sm.v_empty[cur]);
        pack_p<kN>(pf, s);
      }
    }

    // P·V of the last tile.
    const int last = tiles - 1;
    if (zero_tail) mbarrier_wait(&sm.v_zeroed, 0);
    else mbarrier_wait(&sm.v_full[last & 1], (last >> 1) & 1);
    rescale_o(o, alpha);
    fence_operands(o);
    wgmma_fence();
    issue_pv<kN>(o, pf, last & 1 ? desc_v[1] : desc_v[0]);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = m0 + 64 * wg + r_local[i];
    if (r >= slot.n_q) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    auto* out = static_cast<__nv_bfloat16*>(p.out) + ((slot.q_offset + r) * p.heads + h) * kHeadDimV + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadDimV / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) =
          __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    if (p.lse && lane % 4 == 0)
      p.lse[static_cast<int64_t>(h) * p.total_q + slot.q_offset + r] =
          l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
  }
#else
  __trap();
#endif
}

}  // namespace mla::cuda::sm90::prefill
