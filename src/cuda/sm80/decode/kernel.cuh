// The sm80 absorbed-decode kernels (mma.sync, bf16).
//
// Split kernel: one block = BLOCK_M query rows (s_q · h_q flattened) of one sequence × one key range (split)
// from the device-side schedule. Per 64-key tile: S = Q·Kᵀ, warps split over row groups × key groups; online
// softmax in the log2 domain with each row's max shared across its key groups through shared memory; P
// rounded to bf16 into shared memory (the P·V rounding point); O += P·V with each warp owning its rows × one
// column slice of the 512-wide value. K tiles arrive by cp.async, double-buffered; keys past the sequence are
// zero-filled and never read, so NaN in unused cache slots cannot leak. Sequences with one split write the
// final bf16 output; others write fp32 partials + LSE for the combine kernel.
//
// Scheduler: one block turns the sequence lengths into per-sequence split counts (about total work / SMs
// tiles per block) and a work list, so one long sequence among short ones still fills the GPU.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <type_traits>

#include "cuda/common/dependent_launch.cuh"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/decode/loader.cuh"
#include "cuda/sm80/decode/softmax.cuh"
#include "cuda/sm80/mma.cuh"

namespace mla::cuda::sm80::decode {

// kFp8: the cache holds fp8_ds_mla rows, read through Fp8TileLoader (registers a tile ahead, dequantised into
// the same bf16 tiles); otherwise bf16 rows by cp.async.
template <int kStages, int kRowGroups, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ Params p) {
  using L = Layout<kRowGroups>;
  constexpr int kBlockM = L::kBlockM;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SharedMemoryPlan<kStages, kRowGroups>*>(smem_raw);

  const int item = p.work[block_work(p)];
  if (item < 0) return;
  const int b = item / kMaxSplits, split = item % kMaxSplits;
  const SequenceSchedule sched = p.schedule[b];
  const int m0 = block_row_block(p) * kBlockM;
  if (m0 >= p.rows) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mw = warp % kRowGroups, nw = warp / kRowGroups;  // row group, key group (S) / column group (O)
  const int seqlen = p.seqlens[b];
  const int k_begin = split * sched.keys_per_split;
  const int k_end = min(seqlen, k_begin + sched.keys_per_split);
  const int tiles = k_end > k_begin ? (k_end - k_begin + kBlockN - 1) / kBlockN : 0;

  // Q [BLOCK_M, 576]: rows past `rows` are zero.
  const auto* gQ = static_cast<const uint16_t*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * kHeadDim;
  for (int idx = threadIdx.x; idx < kBlockM * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK;
    const bool valid = m0 + row < p.rows;
    cp_async_16(sm.q + swizzle<kChunksQK>(row, chunk * 8), valid ? gQ + row * kHeadDim + chunk * 8 : gQ, valid);
  }
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  auto offset = [](int row, int col) { return swizzle<kChunksQK>(row, col); };
  std::conditional_t<kFp8, Fp8TileLoader, TileLoader> loader;
  loader.prefetch(p, table, k_begin, seqlen);
  if constexpr (kFp8) {  // tile 0 into shared memory, tile 1 into registers
    if (tiles > 0) loader.fetch(p.kv), loader.store(sm.k[0], offset);
    cp_async_commit();
    loader.prefetch(p, table, k_begin + kBlockN, seqlen);
    if (tiles > 1) loader.fetch(p.kv);
    loader.prefetch(p, table, k_begin + 2 * kBlockN, seqlen);
  } else {
    if (tiles > 0) loader.issue(sm.k[0], p.kv, offset);
    cp_async_commit();
    loader.prefetch(p, table, k_begin + kBlockN, seqlen);
  }

  // This thread's two rows (C-fragment rows lane/4 and lane/4 + 8 of its warp's 16) and their key limits.
  const int r_local[2] = {16 * mw + lane / 4, 16 * mw + lane / 4 + 8};
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    limit[i] = r >= p.rows ? 0 : (p.causal ? seqlen - (p.s_q - 1 - r / p.h_q) : seqlen);
  }

  float o[L::kOTiles][4];  // this warp's 16 rows × kColsPerWarp columns
#pragma unroll
  for (int j = 0; j < L::kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  // Q as A fragments, kept in registers when the block has one row group (every warp needs all of Q).
  constexpr bool kQInRegisters = kRowGroups == 1;
  uint32_t qf[kQInRegisters ? kHeadDim / 16 : 1][4];

  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = k_begin + tile * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // tile `tile` landed for everyone; everyone is done with tile-1's buffers
    if (kStages == 2 && tile + 1 < tiles) {
      if constexpr (kFp8) {
        loader.store(sm.k[(tile + 1) % 2], offset);  // visible after the next __syncthreads
        if (tile + 2 < tiles) loader.fetch(p.kv);
        loader.prefetch(p, table, t0 + 3 * kBlockN, seqlen);
      } else {
        loader.issue(sm.k[(tile + 1) % 2], p.kv, offset);
        cp_async_commit();
        loader.prefetch(p, table, t0 + 2 * kBlockN, seqlen);
      }
    }
    const uint16_t* sK = sm.k[tile % kStages];
    if constexpr (kQInRegisters) {
      if (tile == 0) {
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk)
          ldmatrix_x4(qf[kk], sm.q + swizzle<kChunksQK>(lane % 16, 16 * kk + (lane / 16) * 8));
      }
    }

    // S [16 rows, kKeysPerWarp keys] per warp = Q[16, 576] · K[keys, 576]ᵀ.
    float s[L::kSTiles][4];
#pragma unroll
    for (int j = 0; j < L::kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      if constexpr (kQInRegisters) {
        a[0] = qf[kk][0], a[1] = qf[kk][1], a[2] = qf[kk][2], a[3] = qf[kk][3];
      } else {
        ldmatrix_x4(a, sm.q + swizzle<kChunksQK>(16 * mw + lane % 16, 16 * kk + (lane / 16) * 8));
      }
      if constexpr (L::kSTiles == 1) {
        uint32_t bf[2];
        ldmatrix_x2(bf, sK + swizzle<kChunksQK>(L::kKeysPerWarp * nw + lane % 8, 16 * kk + ((lane / 8) % 2) * 8));
        mma_bf16_16816(s[0], a, bf[0], bf[1]);
      } else {
#pragma unroll
        for (int np = 0; np < L::kSTiles / 2; ++np) {
          uint32_t bf[4];
          const int key = L::kKeysPerWarp * nw + 16 * np + lane % 8 + (lane / 16) * 8;
          ldmatrix_x4(bf, sK + swizzle<kChunksQK>(key, 16 * kk + ((lane / 8) % 2) * 8));
          mma_bf16_16816(s[2 * np], a, bf[0], bf[1]);
          mma_bf16_16816(s[2 * np + 1], a, bf[2], bf[3]);
        }
      }
    }

    // Scale into the log2 domain, mask, and take this key group's row max.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < L::kSTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = t0 + L::kKeysPerWarp * nw + 8 * j + 2 * (lane % 4) + (e & 1);
        const float x = t < limit[e / 2] ? s[j][e] * p.scale_log2 : -INFINITY;
        s[j][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    publish_row_max(tile_max, sm.row_max, nw, r_local, lane);
    __syncthreads();

    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_use = advance_row_max<L::kKeyGroups>(m_run[i], sm.row_max, r_local[i], alpha[i]);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < L::kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[j][2 * i + e] - m_use);
          s[j][2 * i + e] = pv;
          sum += pv;
        }
      l_run[i] = l_run[i] * alpha[i] + sum;  // fp32 sum of the unrounded probabilities (as the CPU does)
    }
#pragma unroll
    for (int j = 0; j < L::kSTiles; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int key = L::kKeysPerWarp * nw + 8 * j + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(sm.p + swizzle<kBlockN / 8>(r_local[i], key)) =
            pack_bf16(s[j][2 * i], s[j][2 * i + 1]);
      }
#pragma unroll
    for (int j = 0; j < L::kOTiles; ++j) {
      o[j][0] *= alpha[0], o[j][1] *= alpha[0];
      o[j][2] *= alpha[1], o[j][3] *= alpha[1];
    }
    __syncthreads();  // P complete; row_max free again

    // O[16, kColsPerWarp] += P[16, 64] · V[64, kColsPerWarp].
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sm.p + swizzle<kBlockN / 8>(16 * mw + lane % 16, 16 * kk + (lane / 16) * 8));
#pragma unroll
      for (int np = 0; np < L::kOTiles / 2; ++np) {
        uint32_t bf[4];
        const int key = 16 * kk + lane % 8 + ((lane / 8) % 2) * 8;
        const int col = L::kColsPerWarp * nw + 16 * np + (lane / 16) * 8;
        ldmatrix_x4_trans(bf, sK + swizzle<kChunksQK>(key, col));
        mma_bf16_16816(o[2 * np], a, bf[0], bf[1]);
        mma_bf16_16816(o[2 * np + 1], a, bf[2], bf[3]);
      }
    }
    if (kStages == 1 && tile + 1 < tiles) {
      __syncthreads();
      if constexpr (kFp8) {
        loader.store(sm.k[0], offset);
        if (tile + 2 < tiles) loader.fetch(p.kv);
        loader.prefetch(p, table, t0 + 3 * kBlockN, seqlen);
      } else {
        loader.issue(sm.k[0], p.kv, offset);
        cp_async_commit();
        loader.prefetch(p, table, t0 + 2 * kBlockN, seqlen);
      }
    }
  }
  cp_async_wait<0>();

  // Row sums: over the quad, then over the key groups.
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
    float l = 0.f;
#pragma unroll
    for (int g = 0; g < L::kKeyGroups; ++g) l += sm.row_sum[g][r_local[i]];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
    const int col0 = L::kColsPerWarp * nw + 2 * (lane % 4);
    if (sched.splits == 1) {
      const int64_t row = static_cast<int64_t>(b) * p.rows + r;
      auto* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < L::kOTiles; ++j)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) = __floats2bfloat162_rn(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      if (p.lse && nw == 0 && lane % 4 == 0)
        p.lse[(static_cast<int64_t>(b) * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(sched.offset + split) * p.rows + r;
      float* out = p.o_partial + prow * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < L::kOTiles; ++j)
        *reinterpret_cast<float2*>(out + 8 * j) = make_float2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      if (nw == 0 && lane % 4 == 0) p.lse_partial[prow] = l > 0.f ? lse : -INFINITY;
    }
  }
}

// One block of kScheduleThreads: split counts from the lengths, then an exclusive scan into offsets (where each
// sequence's partials go) and the work list. Each split gets about (total tiles · m_blocks) / SMs tiles, at least
// kMinTilesPerSplit. The work list holds the splits longest first (a counting sort by tiles): blocks start in
// work-list order, one per SM, so a long split that started last would finish alone; longest-first keeps a
// batch of mixed lengths within a split of the ideal (a varlen batch of 64 lengths in 1..8192 at s_q 2 ran 1.8x
// the time of an even spread in sequence order). Sums and scans go through warp shuffles: this kernel runs on
// every decode call that has no reusable work list, and the 1024-thread tree version took 5.5 µs on the H200.
constexpr int kScheduleThreads = 256;
constexpr int kSizeBuckets = 4 * kScheduleThreads;  // split sizes in tiles; larger ones share the last bucket
__device__ __forceinline__ long long block_sum(long long v, long long* warp_totals) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
  __syncthreads();
  long long total = 0;
#pragma unroll
  for (int w = 0; w < kScheduleThreads / 32; ++w) total += warp_totals[w];
  __syncthreads();  // warp_totals is reused
  return total;
}
__global__ void __launch_bounds__(kScheduleThreads) schedule_kernel(const int32_t* __restrict__ seqlens, int batch,
                                                                    int m_blocks, int num_sms, int min_tiles,
                                                                    SequenceSchedule* __restrict__ schedule,
                                                                    int32_t* __restrict__ work, int max_work) {
  __shared__ long long warp_totals[kScheduleThreads / 32];
  __shared__ int bucket[kSizeBuckets];  // splits per size, then the next work-list slot of each size
  for (int i = threadIdx.x; i < kSizeBuckets; i += kScheduleThreads) bucket[i] = 0;
  allow_dependent_launch();  // the split kernel may start its blocks now; it waits for this grid's writes
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  auto tiles_of = [&](int b) { return (max(seqlens[b], 0) + kBlockN - 1) / kBlockN; };
  long long tiles_local = 0;
  for (int b = tid; b < batch; b += kScheduleThreads) tiles_local += tiles_of(b);
  const long long total = block_sum(tiles_local, warp_totals) * m_blocks;
  const long long target = max(static_cast<long long>(min_tiles), (total + num_sms - 1) / num_sms);
  auto splits_of = [&](int tiles) {
    const long long s = (tiles + target / 2) / target;
    return static_cast<int>(min(static_cast<long long>(kMaxSplits), max(1LL, s)));
  };
  // Each thread takes a contiguous run of sequences, so the work list comes out in sequence order.
  const int chunk = (batch + kScheduleThreads - 1) / kScheduleThreads, b0 = min(batch, tid * chunk),
            b1 = min(batch, b0 + chunk);
  long long mine = 0;
  for (int b = b0; b < b1; ++b) mine += splits_of(tiles_of(b));
  long long incl = mine;  // inclusive scan: within the warp, then over the warp totals
  for (int d = 1; d < 32; d <<= 1) {
    const long long up = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += up;
  }
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  long long before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kScheduleThreads / 32; ++w) {
    before += w < warp ? warp_totals[w] : 0;
    all += warp_totals[w];
  }
  int offset = static_cast<int>(before + incl - mine);
  // Split s of a sequence covers tiles [s·per, min(tiles, (s+1)·per)); its bucket is min(that count, last).
  auto bucket_of = [](int tiles, int per, int s) { return min(kSizeBuckets - 1, max(0, min(per, tiles - s * per))); };
  for (int b = b0; b < b1; ++b) {
    const int tiles = tiles_of(b), splits = splits_of(tiles);
    const int per = max(1, (tiles + splits - 1) / splits);
    schedule[b] = {offset, splits, per * kBlockN};
    for (int s = 0; s < splits; ++s) atomicAdd(&bucket[bucket_of(tiles, per, s)], 1);
    offset += splits;
  }
  __syncthreads();
  // Exclusive scan of the buckets, largest size first: thread t owns sizes kSizeBuckets-1-4t .. -4t-3.
  constexpr int kPer = kSizeBuckets / kScheduleThreads;
  int counts[kPer], own = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) counts[i] = bucket[kSizeBuckets - 1 - (kPer * tid + i)], own += counts[i];
  long long run = own;
  for (int d = 1; d < 32; d <<= 1) {
    const long long up = __shfl_up_sync(0xffffffffu, run, d);
    if (lane >= d) run += up;
  }
  __syncthreads();  // warp_totals' last readers are done
  if (lane == 31) warp_totals[warp] = run;
  __syncthreads();
  long long start = run - own;
  for (int w = 0; w < warp; ++w) start += warp_totals[w];
#pragma unroll
  for (int i = 0; i < kPer; ++i) bucket[kSizeBuckets - 1 - (kPer * tid + i)] = static_cast<int>(start), start += counts[i];
  __syncthreads();
  for (int b = b0; b < b1; ++b) {
    const int tiles = tiles_of(b), splits = splits_of(tiles), per = max(1, (tiles + splits - 1) / splits);
    for (int s = 0; s < splits; ++s) {
      const int slot = atomicAdd(&bucket[bucket_of(tiles, per, s)], 1);
      if (slot < max_work) work[slot] = b * kMaxSplits + s;
    }
  }
  for (int w = static_cast<int>(all) + tid; w < max_work; w += kScheduleThreads) work[w] = -1;
}

// Merges split partials by log-sum-exp: a block of kCombineThreads per (sequence, row), each thread owning 4
// of the 512 columns; sequences with one split are done. The split weights are computed once per row into
// shared memory, so the column loop issues independent loads (a split per warp-row loop with a dependent LSE
// load per split was latency-bound: 64 splits took tens of microseconds). The grid is capped and strides over
// the rows, so a batch with no split sequence costs a few microseconds, not a block per row.
constexpr int kCombineThreads = kHeadDimV / 4;
__device__ __forceinline__ void combine_row(const Params& p, int64_t row, float* weight, float* reduce) {
  static_assert(kMaxSplits <= kCombineThreads, "one split weight per thread");
  const int b = static_cast<int>(row / p.rows), r = static_cast<int>(row % p.rows);
  const SequenceSchedule sched = p.schedule[b];
  if (sched.splits == 1) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const float ls = tid < sched.splits ? p.lse_partial[(static_cast<int64_t>(sched.offset) + tid) * p.rows + r] : -INFINITY;
  float mx = ls;
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) reduce[warp] = mx;
  __syncthreads();
  mx = reduce[0];
#pragma unroll
  for (int w = 1; w < kCombineThreads / 32; ++w) mx = fmaxf(mx, reduce[w]);
  const float w = ls == -INFINITY ? 0.f : exp2f((ls - mx) * 1.4426950408889634f);  // ls = -inf: no key seen
  if (tid < kMaxSplits) weight[tid] = w;
  float sum = w;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  __syncthreads();  // everyone has read reduce[] (the max) and written weight[]
  if (lane == 0) reduce[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int i = 0; i < kCombineThreads / 32; ++i) sum += reduce[i];

  const float* part = p.o_partial + (static_cast<int64_t>(sched.offset) * p.rows + r) * kHeadDimV + 4 * tid;
  const int64_t split_stride = static_cast<int64_t>(p.rows) * kHeadDimV;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = 0; s < sched.splits; ++s) {
    const float ws = weight[s];
    if (ws == 0.f) continue;  // may hold garbage (-inf LSE: the split saw no key)
    const float4 v = *reinterpret_cast<const float4*>(part + s * split_stride);
    acc.x += ws * v.x, acc.y += ws * v.y, acc.z += ws * v.z, acc.w += ws * v.w;
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  auto* out = reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + 4 * tid);
  out[0] = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
  out[1] = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
  if (p.lse && tid == 0)
    p.lse[(static_cast<int64_t>(b) * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = sum > 0.f ? mx + logf(sum) : INFINITY;
  __syncthreads();  // weight[] and reduce[] are reused by the block's next row
}

__global__ void __launch_bounds__(kCombineThreads) combine_kernel(Params p) {
  grid_dependency_wait();  // the split kernel's partials (a no-op unless launched as its dependent)
  __shared__ float weight[kMaxSplits];
  __shared__ float reduce[kCombineThreads / 32];
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.rows;
  for (int64_t row = blockIdx.x; row < rows_total; row += gridDim.x)  // b · rows + r; the block's row is uniform
    combine_row(p, row, weight, reduce);
}

}  // namespace mla::cuda::sm80::decode
