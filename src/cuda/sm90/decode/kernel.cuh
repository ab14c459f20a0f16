// The sm90 absorbed-decode split kernel (bf16, 576/512, 64 query rows per block), "seesaw" schedule: the two
// warpgroups alternate between softmax and tensor-core work so that the tensor pipe is fed while either one
// computes exponentials. Same work list, masking, outputs and LSE as the sm80 kernel (../../sm80/decode).
//
// Warpgroup 0 owns O[:, 0:256) and takes the even key tiles of a pair, warpgroup 1 owns O[:, 256:512) and the
// odd ones. Each computes the full S = Q·Kᵀ of its tile (m64n64k16 × 36, Q and K read from shared memory).
// Per pair of tiles (K0, K1), with the running row max m in shared memory:
//   wg0: softmax(S0) → m', scale0; O_L += P0·V0_L (P0 from registers)            | wg1: waits for scale0
//   wg1: softmax(S1) → m'', scale1; O_R = O_R·scale0·scale1 + P1·V1_R; P1 → smem | wg0: waits for scale1
//   wg0: P0·scale1 → smem; O_L = O_L·scale1 + P1·V1_L; S0 of the next pair        | wg1: O_R += P0·V0_R
//   wg1: S1 of the next pair
// K tiles arrive by TMA, one 64-column block per mbarrier, so a warpgroup starts on the blocks that landed and
// each block is refilled as soon as its last reader is done (V halves by their owner, the rope block 8 after S;
// block 8 then holds the pair's P for the other warpgroup). Rows past the sequence are zeroed before P·V reads
// them (P is 0 there, but 0·NaN is NaN); masked scores never reach the max.
//
// The wgmma waits sit where ptxas can see that no in-flight accumulator is touched on any path (each pair ends
// with wait_group 0; the variants of the last pairs are separate instantiations): otherwise ptxas serialises
// every wgmma (warning C7514).
//
// fp8 cache rows (fp8_ds_mla, mla/cache.hpp): a third, producer warpgroup dequantises. The thread that would
// load latent block j (columns 64j..64j+63) copies its 64 × 64 fp8 bytes by TMA into the upper half of the
// block's own 8 KB (and, with block 0, the tile's per-128-column scales into `scales`), completing on
// `landed`; the producer waits there, reads the bytes into registers, meets its warpgroup (rows 32..63 of the
// bf16 block overwrite the fp8 bytes), writes bf16(fp8 · scale) in the swizzled layout and arrives on the
// block's barrier, which the consumers wait on exactly as on a bf16 TMA copy. The rope block is bf16 in the row
// and arrives by TMA as before. The producer takes the tiles in order; a block's copy is only ever issued once
// the S of the tile two back, which waited for all of that tile's blocks, is done, so the order cannot deadlock.
// The producer keeps 72 registers, the consumers 216 (setmaxnreg; neither spills in the loop).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/common/dependent_launch.cuh"
#include "cuda/common/fp8_row.cuh"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/mma.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace mla::cuda::sm90::decode {

using sm80::decode::kBlockN;
using sm80::decode::kChunksQK;
using sm80::decode::kHeadDim;
using sm80::decode::kHeadDimV;
using sm80::decode::kMaxSplits;
using sm80::decode::Params;
using sm80::decode::SequenceSchedule;

constexpr int kBlockM = 64;
constexpr int kBlockElems = 64 * 64;           // one [64 rows][64 columns] 128-byte-swizzle block
constexpr int kBlocks = kHeadDim / 64;         // 9: V_L = blocks 0-3, V_R = 4-7, rope = 8
constexpr uint32_t kBlockBytes = kBlockElems * 2;
constexpr float kMaxInit = -1e30f;             // finite, so that exp2(m_old - m_new) is never inf - inf
constexpr int kLatentBlocks = 8;               // fp8 rows: blocks 0-7 dequantised, block 8 (rope) bf16
constexpr uint32_t kFp8BlockBytes = 64 * 64;   // fp8 bytes of one latent block, staged at its upper half
constexpr uint32_t kScaleBytes = kBlockN * 16; // [64 keys][4] fp32 scales of a tile

template <int kBoxRows_, bool kFp8_>
struct Cache {
  static constexpr int kBoxRows = kBoxRows_;  // rows per tensor copy: min(page size, 64)
  static constexpr int kBoxes = kBlockN / kBoxRows;
  static constexpr bool kFp8 = kFp8_;
  static constexpr int kThreads = kFp8 ? 384 : 256;  // + the dequantising producer warpgroup
};

// What the tensor copies read. bf16 rows: `kv` is [rows, 576]. fp8 rows: `kv` is the rope columns [rows, 64]
// (bf16, swizzled like a bf16 block), `latent` the e4m3 bytes [rows, 512] (unswizzled), `scales` [rows, 4] fp32.
struct TensorMaps {
  CUtensorMap kv, latent, scales;
};

struct SharedMemoryPlan {
  uint16_t q[kBlockM * kHeadDim];     // [9 blocks][64 rows][64]
  uint16_t k[2][kBlockN * kHeadDim];  // K0, K1: [9 blocks][64 keys][64]; block 8 holds P once S is done
  float scales[2][kBlockN][4];        // fp8 rows: the scales of the tile in K0, K1 (128-byte aligned for TMA)
  float m[kBlockM];                   // running row max (log2 domain, scaled)
  float scale0[kBlockM], scale1[kBlockM];
  float l[2][kBlockM];
  uint64_t bar[2][kBlocks];           // one per K block
  uint64_t landed[2][kLatentBlocks];  // fp8 rows: a latent block's bytes have landed (then bar: dequantised)
};
constexpr size_t kSmemBytes = sizeof(SharedMemoryPlan) + 1024;  // + room to align the base to 1024 bytes

enum NamedBarrier : int {
  kScale0Ready = 1, kScale1Ready = 2, kP0Ready = 3, kO1Issued = 4, kWarpgroupOwn = 5,  // + wg: 5, 6
  kDequantise = 7, kEpilogue = 8
};

// Element offset of (row, col) in a tile of 64-column swizzle blocks.
__device__ __forceinline__ int blocked(int row, int col) {
  return (col >> 6) * kBlockElems + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void fence_operands(uint32_t (&r)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// What both warpgroups' pair steps need; one per thread.
struct Context {
  SharedMemoryPlan* sm;
  const TensorMaps* maps;
  const int32_t* table;
  int page_log2, seqlen, k_begin, tiles;
  int wg, idx, lane;  // warpgroup, thread within it, lane
  int r[2];           // this thread's two C-fragment rows within the block
  int limit[2];       // keys visible to each row (causal and split end)
  float scale_log2;
};

// Cache rows of the 64 / kBoxRows boxes of tile `tile` (row 0 past the sequence: loaded, zeroed before use).
template <int kBoxRows>
__device__ __forceinline__ void tile_rows(const Context& c, int tile, int (&rows)[kBlockN / kBoxRows]) {
  const int t0 = c.k_begin + tile * kBlockN;
#pragma unroll
  for (int j = 0; j < kBlockN / kBoxRows; ++j) {
    const int t = t0 + j * kBoxRows;
    rows[j] = t < c.seqlen ? (c.table[t >> c.page_log2] << c.page_log2) + (t & ((1 << c.page_log2) - 1)) : 0;
  }
}

// One thread: tensor copies of K block `block` of a tile into buffer `buf` (fp8 rows: a latent block's bytes
// into the block's upper half for the producer, with the tile's scales alongside block 0).
template <class Cache>
__device__ __forceinline__ void load_block(const Context& c, int buf, int block, const int (&rows)[Cache::kBoxes]) {
  uint16_t* dst = c.sm->k[buf] + block * kBlockElems;
  if (Cache::kFp8 && block < kLatentBlocks) {
    uint64_t* landed = &c.sm->landed[buf][block];
    mbarrier_arrive_expect_tx(landed, kFp8BlockBytes + (block == 0 ? kScaleBytes : 0));
    auto* staged = reinterpret_cast<uint8_t*>(dst) + kFp8BlockBytes;
#pragma unroll
    for (int j = 0; j < Cache::kBoxes; ++j) {
      tma_load_2d(staged + j * Cache::kBoxRows * 64, &c.maps->latent, landed, block * 64, rows[j]);
      if (block == 0) tma_load_2d(&c.sm->scales[buf][j * Cache::kBoxRows][0], &c.maps->scales, landed, 0, rows[j]);
    }
    return;
  }
  uint64_t* bar = &c.sm->bar[buf][block];
  mbarrier_arrive_expect_tx(bar, kBlockBytes);
  const int column = Cache::kFp8 ? 0 : block * 64;  // fp8 rows: the rope map holds only block 8's columns
#pragma unroll
  for (int j = 0; j < Cache::kBoxes; ++j)
    tma_load_2d(dst + j * Cache::kBoxRows * 64, &c.maps->kv, bar, column, rows[j]);
}

// Shared-memory accesses by 32-bit address (generic pointers into the plan cost a 64-bit address computation and
// a generic-to-shared conversion per access).
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ float lds32f(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// The producer warpgroup of the fp8 kernel (see the top of this file): dequantises latent blocks 0-7 of every
// tile in order, four blocks a step (one barrier and one proxy fence for all four). Thread i takes 16 columns
// (16i mod 64..) of rows i/4 and 32 + i/4 of each block, so that each quarter-warp reads 128 contiguous staged
// bytes and writes 8 distinct 16-byte chunks of two swizzled rows.
// Registers after setmaxnreg (384 threads launch with 168 each, 64512 in all: 128 · 72 + 256 · 216): enough for the
// producer to hold four blocks at once, and the consumers still do not spill (same-run A/B on the H200,
// bench/results/2026-12-01-h200-fp8-sm90.md: 40/232 with two blocks a step was 7% slower; 96/200 with eight spills).
constexpr int kProducerRegisters = 72, kConsumerRegisters = 216;
constexpr int kDequantBlocks = 4;
static_assert(kLatentBlocks % kDequantBlocks == 0 && kDequantBlocks % 2 == 0, "steps of whole scale groups");
__device__ __forceinline__ void dequantise_tiles(SharedMemoryPlan& sm, int tiles) {
  constexpr int kGroups = kDequantBlocks / 2;  // 128-column scale groups a step covers
  const int i = threadIdx.x - 256, quarter = i % 4, row0 = i / 4;
  // Byte offsets within a tile buffer (block 0) and within a buffer's scales, for rows row0 and row0 + 32.
  uint32_t read[2], write[2][2], scale_at[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 32 * h;
    read[h] = kFp8BlockBytes + row * 64 + quarter * 16;
#pragma unroll
    for (int half = 0; half < 2; ++half) write[h][half] = 2 * blocked(row, 16 * quarter + 8 * half);
    scale_at[h] = row * 16;
  }
  for (int t = 0; t < tiles; ++t) {
    const int buf = t & 1, parity = (t >> 1) & 1;
    const uint32_t tile = sm80::smem_addr(sm.k[buf]), scales = sm80::smem_addr(sm.scales[buf]);
#pragma unroll 1
    for (int first = 0; first < kLatentBlocks; first += kDequantBlocks) {
      uint4 v[kDequantBlocks][2];
      float scale[kGroups][2];
#pragma unroll
      for (int j = 0; j < kDequantBlocks; ++j) {
        mbarrier_wait(&sm.landed[buf][first + j], parity);
#pragma unroll
        for (int h = 0; h < 2; ++h) v[j][h] = lds128(tile + (first + j) * kBlockBytes + read[h]);
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int h = 0; h < 2; ++h) scale[g][h] = lds32f(scales + scale_at[h] + (first / 2 + g) * 4);
      named_sync(kDequantise, 128);  // every staged byte read before rows 32.. overwrite them
#pragma unroll
      for (int j = 0; j < kDequantBlocks; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t w[4] = {v[j][h].x, v[j][h].y, v[j][h].z, v[j][h].w};
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            uint32_t out[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const __nv_bfloat162 pair =
                  fp8x2_dequantize(static_cast<uint16_t>(w[2 * half + k / 2] >> (16 * (k % 2))), scale[j / 2][h]);
              out[k] = *reinterpret_cast<const uint32_t*>(&pair);
            }
            sts128(tile + (first + j) * kBlockBytes + write[h][half], out[0], out[1], out[2], out[3]);
          }
        }
      fence_proxy_async();  // generic-proxy writes, read by wgmma
#pragma unroll
      for (int j = 0; j < kDequantBlocks; ++j) mbarrier_arrive(&sm.bar[buf][first + j]);
    }
  }
}

// Issues S = Q·K[buf]ᵀ over blocks [kFirst, kLast), each once its copy has landed; one commit group per block.
template <int kFirst, int kLast>
__device__ __forceinline__ void issue_s(float (&s)[32], const Context& c, int buf, int parity) {
  const uint64_t dq = make_desc(c.sm->q, 16, 1024), dk = make_desc(c.sm->k[buf], 16, 1024);
#pragma unroll
  for (int block = kFirst; block < kLast; ++block) {
    mbarrier_wait(&c.sm->bar[buf][block], parity);
    wgmma_fence();  // after the wait's branch: ptxas would otherwise insert one and serialise
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int step = (block * kBlockElems + kk * 16) * 2 / 16;  // descriptors count 16-byte units
      wgmma_m64n64k16_ss(s, dq + step, dk + step, block > 0 || kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  }
}

// Descriptor of V[buf] columns [256·half, 256·half + 256) (read transposed) and of the P held in block 8.
__device__ __forceinline__ uint64_t desc_v(const Context& c, int buf, int half) {
  return make_desc(c.sm->k[buf] + 4 * half * kBlockElems, kBlockElems * 2, 1024);
}
__device__ __forceinline__ uint64_t desc_p(const Context& c, int buf) {
  return make_desc(c.sm->k[buf] + 8 * kBlockElems, 16, 1024);
}

// O += P·V with P from registers (the S accumulator fragment is the A fragment: keys 16kk.. = chunks 2kk, 2kk+1).
__device__ __forceinline__ void issue_pv_rs(float (&o)[128], const uint32_t (&pa)[4][4], uint64_t dv) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_rs_tb(o, pa[kk], dv + kk * 16 * 64 * 2 / 16);
  wgmma_commit();
}
// O += P·V with P from shared memory.
__device__ __forceinline__ void issue_pv_ss(float (&o)[128], uint64_t dp, uint64_t dv) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_ss_tb(o, dp + kk * 16 * 2 / 16, dv + kk * 16 * 64 * 2 / 16, 1);
  wgmma_commit();
}

// Masks the raw scores of keys [t0, t0 + 64) to -inf by the row limits; returns each row's max of the scaled
// scores (max(x)·c = max(x·c) for c > 0, so the scale moves into the exponent's FMA).
__device__ __forceinline__ void mask_and_max(float (&s)[32], const Context& c, int t0, float (&mx)[2]) {
  const bool unmasked = t0 + kBlockN <= min(c.limit[0], c.limit[1]);
  mx[0] = mx[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = t0 + 8 * j + 2 * (c.lane % 4) + (e & 1);
      if (!unmasked && t >= c.limit[e / 2]) s[4 * j + e] = -INFINITY;
      mx[e / 2] = fmaxf(mx[e / 2], s[4 * j + e]);
    }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    mx[i] *= c.scale_log2;
  }
}

// 2^x by one MUFU.EX2 (exp2f wraps it in a subnormal-result fixup; results below 2^-126 become 0 here, far
// below a bf16 probability next to the row maximum's 1).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// s ← exp2(s·scale - m) per row (masked scores are -inf: 0); returns the row sums of this thread's entries.
__device__ __forceinline__ void exponentiate(float (&s)[32], float scale, const float (&m)[2], float (&sum)[2]) {
  sum[0] = sum[1] = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pv = ex2(fmaf(s[4 * j + e], scale, -m[e / 2]));
      s[4 * j + e] = pv;
      sum[e / 2] += pv;
    }
}

__device__ __forceinline__ void scale_rows(float (&o)[128], const float (&f)[2]) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j + 0] *= f[0], o[4 * j + 1] *= f[0];
    o[4 * j + 2] *= f[1], o[4 * j + 3] *= f[1];
  }
}

__device__ __forceinline__ void pack_p(const float (&s)[32], uint32_t (&pa)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) pa[kk][i] = sm80::pack_bf16(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
}

// P fragment → block 8 of K[buf] as the [64 rows][64 keys] A operand of the other warpgroup.
__device__ __forceinline__ void store_p(const Context& c, int buf, const uint32_t (&pa)[4][4]) {
  uint16_t* dst = c.sm->k[buf] + 8 * kBlockElems;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = 16 * kk + 8 * (i / 2) + 2 * (c.lane % 4);
      *reinterpret_cast<uint32_t*>(dst + blocked(c.r[i % 2], key)) = pa[kk][i];
    }
}

// Zeroes V rows past the sequence in the four blocks of V[buf]'s `half` (tile starting at key t0), and makes
// the zeros visible to this warpgroup's tensor-core reads.
__device__ __forceinline__ void zero_tail(const Context& c, int buf, int half, int t0) {
  const int first = max(0, c.seqlen - t0);
  uint16_t* base = c.sm->k[buf] + 4 * half * kBlockElems;
  for (int i = c.idx; i < 4 * kBlockN * 8; i += 128) {
    const int block = i / (kBlockN * 8), row = i / 8 % kBlockN, chunk = i % 8;
    if (row >= first) *reinterpret_cast<uint4*>(base + block * kBlockElems + row * 64 + chunk * 8) = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();
  named_sync(kWarpgroupOwn + c.wg, 128);
}

// Warpgroup 0's part of the pair (tile t, t + 1). On entry s = S of tile t; on exit s = S of tile t + 2.
template <bool kHas1, bool kNext0, class Cache>
__device__ __forceinline__ void pair_wg0(const Context& c, int t, float (&s)[32], float (&o)[128], float (&l)[2],
                                         int& parity0) {
  const int t0 = c.k_begin + t * kBlockN;
  int rows0[Cache::kBoxes], rows1[Cache::kBoxes];
  if (kNext0) tile_rows<Cache::kBoxRows>(c, t + 2, rows0), tile_rows<Cache::kBoxRows>(c, t + 3, rows1);

  float mx[2], m_new[2], scale0[2], sum[2];
  mask_and_max(s, c, t0, mx);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float m_old = c.sm->m[c.r[i]];
    m_new[i] = fmaxf(m_old, mx[i]);
    scale0[i] = ex2(m_old - m_new[i]);
  }
  __syncwarp();  // the quad's reads of m before its write
  if (c.lane % 4 == 0)
#pragma unroll
    for (int i = 0; i < 2; ++i) c.sm->scale0[c.r[i]] = scale0[i], c.sm->m[c.r[i]] = m_new[i];
  exponentiate(s, c.scale_log2, m_new, sum);
#pragma unroll
  for (int i = 0; i < 2; ++i) l[i] = l[i] * scale0[i] + sum[i];
  scale_rows(o, scale0);
  uint32_t pa[4][4];
  pack_p(s, pa);
  named_arrive(kScale0Ready, 256);

  if (t0 + kBlockN > c.seqlen) zero_tail(c, 0, 0, t0);
  fence_operands(o);
  issue_pv_rs(o, pa, desc_v(c, 0, 0));
  wgmma_wait<0>();
  fence_operands(o);
  fence_operands(pa);

  named_sync(kScale1Ready, 256);
  if (kNext0 && c.idx == 0)
#pragma unroll
    for (int block = 0; block < 4; ++block) load_block<Cache>(c, 0, block, rows0);
  float scale1[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) scale1[i] = c.sm->scale1[c.r[i]];
  // P0 relative to the pair's final max, for warpgroup 1's half of O.
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[4 * j + e] *= scale1[e / 2];
  pack_p(s, pa);
  store_p(c, 0, pa);
  fence_proxy_async();
  named_arrive(kP0Ready, 256);

  if (kHas1) {
    if (t0 + 2 * kBlockN > c.seqlen) zero_tail(c, 1, 0, t0 + kBlockN);
    named_sync(kO1Issued, 256);
    scale_rows(o, scale1);
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] *= scale1[i];
    fence_operands(o);
    issue_pv_ss(o, desc_p(c, 1), desc_v(c, 1, 0));
  }
  if (kNext0) {
    fence_operands(s);
    issue_s<0, 4>(s, c, 0, parity0);
    wgmma_wait<4>();  // O_L += P1·V1_L done: K1's blocks 0-3 and 8 are free
    if (c.idx == 0 && t + 3 < c.tiles) {
#pragma unroll
      for (int block = 0; block < 4; ++block) load_block<Cache>(c, 1, block, rows1);
      load_block<Cache>(c, 1, 8, rows1);
    }
    issue_s<4, kBlocks>(s, c, 0, parity0);
    parity0 ^= 1;
  }
  wgmma_wait<0>();
  fence_operands(o);
  fence_operands(s);
}

// Warpgroup 1's part of the pair (tile t, t + 1). On entry s = S of tile t + 1; on exit s = S of tile t + 3.
template <bool kHas1, bool kNext0, bool kNext1, class Cache>
__device__ __forceinline__ void pair_wg1(const Context& c, int t, float (&s)[32], float (&o)[128], float (&l)[2],
                                         int& parity1) {
  const int t0 = c.k_begin + t * kBlockN, t1 = t0 + kBlockN;
  int rows0[Cache::kBoxes], rows1[Cache::kBoxes];
  if (kNext0) tile_rows<Cache::kBoxRows>(c, t + 2, rows0);
  if (kNext1) tile_rows<Cache::kBoxRows>(c, t + 3, rows1);
  uint32_t pa[4][4];

  named_sync(kScale0Ready, 256);
  float scale[2];
  if (kHas1) {
    float mx[2], m_new[2], scale1[2], sum[2];
    mask_and_max(s, c, t1, mx);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_old = c.sm->m[c.r[i]];
      m_new[i] = fmaxf(m_old, mx[i]);
      scale1[i] = ex2(m_old - m_new[i]);
      scale[i] = c.sm->scale0[c.r[i]] * scale1[i];
    }
    __syncwarp();
    if (c.lane % 4 == 0)
#pragma unroll
      for (int i = 0; i < 2; ++i) c.sm->m[c.r[i]] = m_new[i], c.sm->scale1[c.r[i]] = scale1[i];
    exponentiate(s, c.scale_log2, m_new, sum);
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] = l[i] * scale[i] + sum[i];
    pack_p(s, pa);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) scale[i] = c.sm->scale0[c.r[i]], l[i] *= scale[i];
    if (c.lane % 4 == 0)
#pragma unroll
      for (int i = 0; i < 2; ++i) c.sm->scale1[c.r[i]] = 1.f;
  }
  scale_rows(o, scale);
  named_arrive(kScale1Ready, 256);

  if (kHas1) {
    store_p(c, 1, pa);
    if (t1 + kBlockN > c.seqlen) zero_tail(c, 1, 1, t1);
    fence_proxy_async();
    fence_operands(o);
    issue_pv_rs(o, pa, desc_v(c, 1, 1));
  } else {
    fence_operands(o);
  }
  named_sync(kP0Ready, 256);
  if (t0 + kBlockN > c.seqlen) zero_tail(c, 0, 1, t0);
  issue_pv_ss(o, desc_p(c, 0), desc_v(c, 0, 1));
  if (kHas1) named_arrive(kO1Issued, 256);
  if (kNext1) {
    wgmma_wait<1>();  // O_R += P1·V1_R done: K1's blocks 4-7 are free
    if (c.idx == 0)
#pragma unroll
      for (int block = 4; block < 8; ++block) load_block<Cache>(c, 1, block, rows1);
  }
  if (kNext0) {
    wgmma_wait<0>();  // O_R += P0·V0_R done: K0's blocks 4-8 are free
    if (c.idx == 0)
#pragma unroll
      for (int block = 4; block < kBlocks; ++block) load_block<Cache>(c, 0, block, rows0);
  }
  if (kNext1) {
    fence_operands(s);
    issue_s<0, kBlocks>(s, c, 1, parity1);
    parity1 ^= 1;
  }
  wgmma_wait<0>();
  fence_operands(o);
  fence_operands(s);
  fence_operands(pa);
}

template <class Cache>
__global__ void __launch_bounds__(Cache::kThreads, 1)
    seesaw_kernel(const __grid_constant__ Params p, const __grid_constant__ TensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});

  grid_dependency_wait();  // the scheduler's work list (a no-op unless launched as its dependent)
  allow_dependent_launch();
  const int item = p.work[sm80::decode::block_work(p)];
  if (item < 0) return;
  const int b = item / kMaxSplits, split = item % kMaxSplits;
  const SequenceSchedule sched = p.schedule[b];
  const int m0 = sm80::decode::block_row_block(p) * kBlockM;
  if (m0 >= p.rows) return;

  Context c;
  c.sm = &sm, c.maps = &maps;
  c.table = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  c.page_log2 = p.page_size_log2;
  c.seqlen = p.seqlens[b];
  c.k_begin = split * sched.keys_per_split;
  const int k_end = min(c.seqlen, c.k_begin + sched.keys_per_split);
  c.tiles = k_end > c.k_begin ? (k_end - c.k_begin + kBlockN - 1) / kBlockN : 0;
  c.wg = threadIdx.x / 128, c.idx = threadIdx.x % 128, c.lane = threadIdx.x % 32;
  const int warp = c.idx / 32;
  c.r[0] = 16 * warp + c.lane / 4, c.r[1] = c.r[0] + 8;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + c.r[i];
    c.limit[i] = r >= p.rows ? 0 : min(k_end, p.causal ? c.seqlen - (p.s_q - 1 - r / p.h_q) : c.seqlen);
  }
  c.scale_log2 = p.scale_log2;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int block = 0; block < kBlocks; ++block) {
        // fp8 rows: the producer warpgroup's 128 threads complete a latent block, a copy the rope block.
        mbarrier_init(&sm.bar[i][block], Cache::kFp8 && block < kLatentBlocks ? 128 : 1);
        if (Cache::kFp8 && block < kLatentBlocks) mbarrier_init(&sm.landed[i][block], 1);
      }
    fence_barrier_init();
  }
  const auto* gQ = static_cast<const uint16_t*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * kHeadDim;
  for (int i = threadIdx.x; i < kBlockM * kChunksQK; i += Cache::kThreads) {
    const int row = i / kChunksQK, chunk = i % kChunksQK;
    const bool valid = m0 + row < p.rows;
    sm80::cp_async_16(sm.q + blocked(row, chunk * 8), valid ? gQ + row * kHeadDim + chunk * 8 : gQ, valid);
  }
  sm80::cp_async_commit();
  if (threadIdx.x < kBlockM) sm.m[threadIdx.x] = kMaxInit;
  __syncthreads();  // barriers initialised
  if (threadIdx.x == 0) {
    int rows[Cache::kBoxes];
    for (int tile = 0; tile < min(c.tiles, 2); ++tile) {
      tile_rows<Cache::kBoxRows>(c, tile, rows);
#pragma unroll
      for (int block = 0; block < kBlocks; ++block) load_block<Cache>(c, tile, block, rows);
    }
  }
  sm80::cp_async_wait<0>();
  fence_proxy_async();  // Q written through the generic proxy, read by wgmma
  __syncthreads();
  if constexpr (Cache::kFp8) {
    if (c.wg == 2) {
      set_max_registers_dec<kProducerRegisters>();
      dequantise_tiles(sm, c.tiles);
      return;
    }
    set_max_registers_inc<kConsumerRegisters>();
  }

  float o[128];  // O[64 rows, this warpgroup's 256 columns]: o[4j + e] = column chunk j, fragment element e
#pragma unroll
  for (int j = 0; j < 128; ++j) o[j] = 0.f;
  float l[2] = {0.f, 0.f};
  float s[32];
  if (c.wg == 0) {
    int parity0 = 0;
    if (c.tiles > 0) {
      fence_operands(s);
      issue_s<0, kBlocks>(s, c, 0, parity0);
      wgmma_wait<0>();
      fence_operands(s);
      parity0 = 1;
    }
    int t = 0;
    for (; t + 2 < c.tiles; t += 2) pair_wg0<true, true, Cache>(c, t, s, o, l, parity0);
    if (t + 1 < c.tiles) pair_wg0<true, false, Cache>(c, t, s, o, l, parity0);
    else if (t < c.tiles) pair_wg0<false, false, Cache>(c, t, s, o, l, parity0);
  } else {
    int parity1 = 0;
    if (c.tiles > 1) {
      fence_operands(s);
      issue_s<0, kBlocks>(s, c, 1, parity1);
      wgmma_wait<0>();
      fence_operands(s);
      parity1 = 1;
    }
    int t = 0;
    for (; t + 3 < c.tiles; t += 2) pair_wg1<true, true, true, Cache>(c, t, s, o, l, parity1);
    if (t + 2 < c.tiles) {
      pair_wg1<true, true, false, Cache>(c, t, s, o, l, parity1);
      pair_wg1<false, false, false, Cache>(c, t + 2, s, o, l, parity1);
    } else if (t + 1 < c.tiles) {
      pair_wg1<true, false, false, Cache>(c, t, s, o, l, parity1);
    } else if (t < c.tiles) {
      pair_wg1<false, false, false, Cache>(c, t, s, o, l, parity1);
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    if (c.lane % 4 == 0) sm.l[c.wg][c.r[i]] = l[i];
  }
  named_sync(kEpilogue, 256);  // the two consumer warpgroups (an fp8 producer has left)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + c.r[i];
    if (r >= p.rows) continue;
    const float lt = sm.l[0][c.r[i]] + sm.l[1][c.r[i]];
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    const float lse = lt > 0.f ? sm.m[c.r[i]] * 0.69314718055994531f + logf(lt) : INFINITY;
    const int col0 = 256 * c.wg + 2 * (c.lane % 4);
    if (sched.splits == 1) {
      const int64_t row = static_cast<int64_t>(b) * p.rows + r;
      auto* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) =
            __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      if (p.lse && c.wg == 0 && c.lane % 4 == 0)
        p.lse[(static_cast<int64_t>(b) * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(sched.offset + split) * p.rows + r;
      float* out = p.o_partial + prow * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(out + 8 * j) = make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      if (c.wg == 0 && c.lane % 4 == 0) p.lse_partial[prow] = lt > 0.f ? lse : -INFINITY;
    }
  }
#else
  __trap();
#endif
}

}  // namespace mla::cuda::sm90::decode
