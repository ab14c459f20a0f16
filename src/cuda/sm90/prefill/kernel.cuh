// The sm90 expanded-prefill kernel (wgmma + TMA, bf16, q·k 192, v 128, causal bottom-right). A work item = 128
// queries of one head; a block does two (items_of_block), so that the second item's Q and first key tiles load
// while the first item's last P·V and epilogue run. Per warpgroup and key
// tile j (mainloop.cuh): issue S = Q·K_{j+1}ᵀ, then O += P_j·V_j, run the softmax of S while P·V is in flight
// (FlashAttention-3's intra-warpgroup overlap), and in addition:
//
//  - a producer warpgroup (24 registers after setmaxnreg; one thread issues the copies) loads each item's Q once
//    (after both consumer warpgroups have finished the previous item's last S: q_empty) and the K and V tiles of
//    128 keys by TMA into a two-stage ring that runs on across items; each stage has a "full" mbarrier
//    (transaction bytes) and an "empty" one that the 256 consumer threads arrive on once they have read it, so a
//    warpgroup only ever waits for data, never for the other warpgroup;
//  - the two consumer warpgroups (240 registers; 64 query rows each) take turns at the tensor pipe: a
//    warpgroup issues its S and P·V, then hands the turn to the other (two named barriers), so that one
//    warpgroup's exponentials run while the other's GEMMs do, on top of the overlap inside each warpgroup.
//
// The tensor maps span the whole packed q, k and v; an item reads its sequence's rows at its token offsets. Rows
// past n_q are computed but never stored; keys past n_k are masked by value (a NaN there never reaches the max or
// the sums), and the V rows past n_k of the last tile, which belong to the next sequence, are zeroed by the producer
// warpgroup before P·V reads them (P is 0 there, but 0·NaN is NaN). With device-side cu_seqlens (Params::cu_q) one
// launch covers the batch (find_slot: which sequence a query block of the batch belongs to). P is rounded to bf16
// before P·V, the row sums are fp32 sums of the unrounded probabilities, O is written in bf16 (the sm80 kernel's
// rounding points; not bitwise equal to it: the exponent is one FFMA and 2^x is MUFU.EX2 without exp2f's subnormal fixup).
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
  uint64_t q_full, q_empty, k_full[2], v_full[2], k_empty[2], v_empty[2], v_tail;
};
constexpr size_t kSmemBytes = sizeof(SharedMemoryPlan) + 1024;
static_assert(kSmemBytes <= 227 * 1024, "one block per SM");

enum NamedBarrier : int { kTurn0 = 1, kTurn1 = 2, kProducer = 3 };  // kTurn<g>: "warpgroup g may issue its GEMMs"

// One work item: 128 query rows (block m_block) of one sequence (m_block < 0: nothing to do), and its key tiles.
struct Slot {
  int n_q, n_k, m_block;
  int q_offset, k_offset;  // token offsets of the sequence (total_q, total_k < 2^31: checked on the host)
};

// The slot of the g-th query block of the launch, computed by a whole warp (every lane gets it). One sequence
// per launch: from the parameters, query blocks in reverse order (longest causal rows first). With device-side
// cu_seqlens: the warp scans the batch's query-block counts (32 sequences per step) for the g-th block of the
// batch, again longest rows first within each sequence; every bound is clamped into [0, total] so that unchecked
// lengths cannot reach outside the tensors.
__device__ __forceinline__ Slot find_slot(const Params& p, int g) {
  if (!p.cu_q) {
    const int blocks = (p.n_q + kBlockM - 1) / kBlockM;
    return {p.n_q, p.n_k, g < blocks ? blocks - 1 - g : -1, static_cast<int>(p.q_offset), static_cast<int>(p.k_offset)};
  }
  const int lane = threadIdx.x % 32, total_q = static_cast<int>(p.total_q), total_k = static_cast<int>(p.total_k);
  int before = 0;
  for (int base = 0; base < p.batch; base += 32) {
    const int b = base + lane;
    int q0 = 0, q1 = 0;
    if (b < p.batch) q0 = min(max(p.cu_q[b], 0), total_q), q1 = min(max(p.cu_q[b + 1], q0), total_q);
    const int blocks = (q1 - q0 + kBlockM - 1) / kBlockM;
    int incl = blocks;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += up;
    }
    const int start = before + incl - blocks;
    const unsigned hit = __ballot_sync(0xffffffffu, g >= start && g < start + blocks);
    if (hit) {
      const int src = __ffs(hit) - 1;
      const int bb = __shfl_sync(0xffffffffu, b, src);
      const int m_block = __shfl_sync(0xffffffffu, blocks - 1 - (g - start), src);
      q0 = __shfl_sync(0xffffffffu, q0, src), q1 = __shfl_sync(0xffffffffu, q1, src);
      const int k0 = min(max(p.cu_k[bb], 0), total_k), k1 = min(max(p.cu_k[bb + 1], k0), total_k);
      return {q1 - q0, k1 - k0, m_block, q0, k0};
    }
    before += __shfl_sync(0xffffffffu, incl, 31);
  }
  return {0, 0, -1, 0, 0};
}

// The items of block (x, h): query blocks x and blocks - 1 - x (find_slot) of head h. In a causal sequence the
// two together always hold about the same number of key tiles, the hardware's block scheduler balances the rest,
// and the second item's Q and first tiles load under the first item's last P·V and epilogue.
__device__ __forceinline__ int items_of_block(int blocks) { return 2 * blockIdx.x + 1 == blocks ? 1 : 2; }
__device__ __forceinline__ int query_block(int blocks, int i) { return i == 0 ? blockIdx.x : blocks - 1 - blockIdx.x; }

// Key tiles of an item: those up to the last key its last row sees (0: the item only writes zeros).
__device__ __forceinline__ int key_tiles(const Params& p, const Slot& s) {
  const int last_row = min((s.m_block + 1) * kBlockM, s.n_q) - 1;
  const int key_end = p.causal ? min(s.n_k, last_row + s.n_k - s.n_q + 1) : s.n_k;
  return key_end > 0 ? (key_end + kN - 1) / kN : 0;
}

// Whether the item's last tile runs past the sequence's keys into rows of the tensor (the next sequence's).
__device__ __forceinline__ bool has_v_tail(const Params& p, const Slot& s, int tiles) {
  return tiles > 0 && tiles * kN > s.n_k && int64_t{s.k_offset} + s.n_k < p.total_k;
}

// The producer's copies for one item (one thread): Q once both consumer warpgroups are done with the previous
// item's (q_empty), then per tile K then V, each into its stage of the ring (tile number c0 + j) once the stage's
// previous tile was released. With `tail`, the last V lands on v_tail instead of its v_full: zero_v_tail completes
// that v_full once the rows past the sequence are zeroed.
template <bool kStrided>
__device__ __forceinline__ void produce(SharedMemoryPlan& sm, const Maps& maps, int h, int h_tail, int q_row, int k_row,
                                        int tiles, int c0, int items_done, bool tail) {
  if (items_done > 0) mbarrier_wait(&sm.q_empty, (items_done - 1) & 1);
  mbarrier_arrive_expect_tx(&sm.q_full, kQBytes);
#pragma unroll
  for (int c = 0; c < 3; ++c) tma_load_3d(sm.q + c * kBlockM * 64, &maps.q, &sm.q_full, 64 * c, h, q_row);
  for (int j = 0; j < tiles; ++j) {
    const int st = (c0 + j) & 1, round = (c0 + j) >> 1;
    if (round > 0) mbarrier_wait(&sm.k_empty[st], (round - 1) & 1);
    mbarrier_arrive_expect_tx(&sm.k_full[st], kKBytes);
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      if (kStrided && c == 2) tma_load_3d(sm.k[st] + c * kN * 64, &maps.k_tail, &sm.k_full[st], 0, h_tail, k_row + j * kN);
      else tma_load_3d(sm.k[st] + c * kN * 64, &maps.k, &sm.k_full[st], 64 * c, h, k_row + j * kN);
    }
    if (round > 0) mbarrier_wait(&sm.v_empty[st], (round - 1) & 1);
    uint64_t* landed = tail && j == tiles - 1 ? &sm.v_tail : &sm.v_full[st];
    mbarrier_arrive_expect_tx(landed, kVBytes);
#pragma unroll
    for (int c = 0; c < 2; ++c) tma_load_3d(sm.v[st] + c * kN * 64, &maps.v, landed, 64 * c, h, k_row + j * kN);
  }
}

// The whole producer warpgroup, after its thread 0 issued an item's copies: zeroes the V rows [first, 128) of the
// tile in stage st (the next sequence's values), then completes the stage's v_full, which the consumers wait on as
// for any tile. Only thread 0 waits for the copy (v_tail, the tails-th use; one at a time, so the parity is exact).
// The warp is reconverged before each bar.sync, which needs whole warps.
__device__ __forceinline__ void zero_v_tail(SharedMemoryPlan& sm, int st, int first, int tails) {
  if (threadIdx.x == 0) mbarrier_wait(&sm.v_tail, tails & 1);
  __syncwarp();
  named_sync(kProducer, 128);
  for (int i = threadIdx.x; i < 2 * kN * 8; i += 128) {  // [2 blocks][kN rows][8 chunks of 16 bytes]
    const int block = i / (kN * 8), row = i / 8 % kN, chunk = i % 8;
    if (row >= first) *reinterpret_cast<uint4*>(sm.v[st] + block * kN * 64 + row * 64 + chunk * 8) = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();  // generic-proxy zeros, read by wgmma
  __syncwarp();
  named_sync(kProducer, 128);
  if (threadIdx.x == 0) mbarrier_arrive(&sm.v_full[st]);
}

template <bool kStrided>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps, int blocks) {
  const int items = items_of_block(blocks), h = blockIdx.y;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  if (threadIdx.x == 0) {
    mbarrier_init(&sm.q_full, 1), mbarrier_init(&sm.q_empty, kConsumerThreads), mbarrier_init(&sm.v_tail, 1);
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      mbarrier_init(&sm.k_full[st], 1), mbarrier_init(&sm.v_full[st], 1);
      mbarrier_init(&sm.k_empty[st], kConsumerThreads), mbarrier_init(&sm.v_empty[st], kConsumerThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  // Both sides walk the same items and count the same tiles (c: the ring's tile number) and Q loads.
  if (threadIdx.x < 128) {  // producer warpgroup
    set_max_registers_dec<24>();  // the consumers' 2 · 128 · 240 fit only beside 24 (168 at launch)
    int c = 0, loaded = 0, tails = 0;
    for (int i = 0; i < items; ++i) {
      const Slot s = find_slot(p, query_block(blocks, i));
      if (s.m_block < 0) continue;
      const int tiles = key_tiles(p, s);
      if (tiles == 0) continue;
      const bool tail = has_v_tail(p, s, tiles);
      if (threadIdx.x == 0)
        produce<kStrided>(sm, maps, h, p.k_tail_head != 0 ? h : 0, s.q_offset + s.m_block * kBlockM, s.k_offset, tiles, c, loaded, tail);
      __syncwarp();
      if (tail) zero_v_tail(sm, (c + tiles - 1) & 1, s.n_k - (tiles - 1) * kN, tails++);
      c += tiles, ++loaded;
    }
    return;
  }
  set_max_registers_inc<240>();
  const int t = threadIdx.x - 128, wg = t / 128, lane = t % 32, mw = (t / 32) % 4;
  const int r_local[2] = {16 * mw + lane / 4, 16 * mw + lane / 4 + 8};
  const uint64_t desc_q = make_desc(sm.q + 64 * wg * 64, 16, 1024);
  const uint64_t desc_k[2] = {make_desc(sm.k[0], 16, 1024), make_desc(sm.k[1], 16, 1024)};
  const uint64_t desc_v[2] = {make_desc(sm.v[0], kN * 64 * 2, 1024), make_desc(sm.v[1], kN * 64 * 2, 1024)};
  const int my_turn = wg == 0 ? kTurn0 : kTurn1, other_turn = wg == 0 ? kTurn1 : kTurn0;
  int c = 0, loaded = 0;

#pragma unroll 1
  for (int i = 0; i < items; ++i) {
    const Slot slot = find_slot(p, query_block(blocks, i));
    if (slot.m_block < 0) continue;
    const int n_k = slot.n_k, m0 = slot.m_block * kBlockM, diag = n_k - slot.n_q;
    const int tiles = key_tiles(p, slot);
    // Tiles [0, first_masked) end at or before the smallest key limit of the item's rows: no mask needed.
    const int limit_min = p.causal ? min(n_k, m0 + diag + 1) : n_k;
    const int first_masked = limit_min > 0 ? limit_min / kN : 0;
    int limit[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = p.causal ? min(n_k, m0 + 64 * wg + r_local[i] + diag + 1) : n_k;

    float o[kHeadDimV / 2];  // O[64, 128]: o[4j + e] = column chunk j, fragment element e
#pragma unroll
    for (int j = 0; j < kHeadDimV / 2; ++j) o[j] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2] = {0.f, 0.f};

    if (tiles > 0) {
      float s[kN / 2];
      uint32_t pf[kN / 16][4];
      mbarrier_wait(&sm.q_full, loaded & 1);
      mbarrier_wait(&sm.k_full[c & 1], (c >> 1) & 1);
      fence_operands(s);
      wgmma_fence();
      issue_s<kN>(s, desc_q, c & 1 ? desc_k[1] : desc_k[0]);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s);
      mbarrier_arrive(&sm.k_empty[c & 1]);
      softmax_tile<kN>(s, first_masked == 0, 0, limit, lane, p.scale_log2, m_run, l_run, alpha);
      pack_p<kN>(pf, s);

      // Steps j = 0 .. tiles-2, in turns: warpgroup 0 first; warpgroup 1's last hand-over is skipped so that
      // every arrival on a turn barrier is matched by a wait (within the item, so across items too).
      const int steps = tiles - 1;
      if (wg == 1 && steps > 0) named_arrive(kTurn0, kConsumerThreads);
      int j = 0;
#pragma unroll
      for (int pass = 0; pass < 2; ++pass) {
        const bool masked = pass == 1;
        const int j_end = masked ? steps : min(steps, first_masked - 1);
#pragma unroll 1
        for (; j < j_end; ++j) {
          const int next = (c + j + 1) & 1, cur = (c + j) & 1;
          mbarrier_wait(sm.k_full + next, ((c + j + 1) >> 1) & 1);
          named_sync(my_turn, kConsumerThreads);
          wgmma_fence();
          issue_s<kN>(s, desc_q, next ? desc_k[1] : desc_k[0]);  // selects: no local memory
          wgmma_commit();
          fence_operands(o);
          rescale_o(o, alpha);
          mbarrier_wait(&sm.v_full[cur], ((c + j) >> 1) & 1);
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
      mbarrier_arrive(&sm.q_empty);  // every S of the item is done: the producer may load the next Q

      // P·V of the last tile.
      const int last = c + tiles - 1;
      mbarrier_wait(&sm.v_full[last & 1], (last >> 1) & 1);
      rescale_o(o, alpha);
      fence_operands(o);
      wgmma_fence();
      issue_pv<kN>(o, pf, last & 1 ? desc_v[1] : desc_v[0]);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o);
      mbarrier_arrive(&sm.v_empty[last & 1]);
      c += tiles, ++loaded;
    }

    // The slot again (a few loads and shuffles) rather than its fields kept in registers through the main loop.
    const Slot out_slot = find_slot(p, query_block(blocks, i));
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = l_run[i];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = out_slot.m_block * kBlockM + 64 * wg + r_local[i];
      if (r >= out_slot.n_q) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      auto* out = static_cast<__nv_bfloat16*>(p.out) + ((int64_t{out_slot.q_offset} + r) * p.heads + h) * kHeadDimV + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < kHeadDimV / 8; ++j)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) =
            __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      if (p.lse && lane % 4 == 0)
        p.lse[static_cast<int64_t>(h) * p.total_q + out_slot.q_offset + r] =
            l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
    }
  }
#else
  __trap();
#endif
}

}  // namespace mla::cuda::sm90::prefill
