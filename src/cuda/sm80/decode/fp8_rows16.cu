// The fp8 cache's decode kernel for 16 query rows a block (h_q·s_q <= 32: tensor-parallel shards, memory-bound),
// mma.sync, any GPU since Ampere. It streams the 656-byte fp8_ds_mla rows as stored (cp.async, kStages tiles in
// flight) and dequantises nothing in shared memory: the e4m3 bytes become the MMA's bf16 fragments in registers.
//
// The conversion is a shift: an e4m3 byte's 7 exponent-and-mantissa bits, moved 4 places down a bf16, read as
// bf16 = that fp8 value · 2^-120 exactly (exponent bias 7 → 127; subnormals land on bf16 subnormals), so each
// value costs about one ALU instruction instead of a convert-multiply-round chain. The scales are applied in fp32
// where they are per key: S = Σ_g scale_g · (q · fp8)_g + q_rope · k_rope with one accumulator per 128-column
// group, and for O each group's probabilities enter the product already scaled, P'_g = bf16(p · scale_g · 2^60)
// (the 2^60 keeps products far from fp32's subnormals; the output is multiplied back). Q's latent columns enter
// multiplied by 2^32 for the same reason (exact in bf16). So this kernel multiplies the fp8 values themselves,
// not bf16(fp8 · scale) as the other paths do: it rounds the dequantised value nowhere (docs/mla.md, "FP8 cache").
//
// To let a thread's fragments come from contiguous bytes, the columns are permuted consistently on both sides of
// each product (a dot product does not care): for S, thread (key n, quad q) feeds latent columns
// 128g + 32q .. 128g + 32q + 31 of group g, and Q's fragments are gathered in the same order; for O, column n of
// n-tile j is value column 64·warp + 8n + j, so a thread's 16 output columns per row come out contiguous.
//
// Block: 8 warps. Warp w computes S for keys 8w .. 8w+7 of each 64-key tile (all 576 columns, Q in registers),
// the row maxima meet in shared memory, then warp w accumulates O's value columns 64w .. 64w+63 (latent group
// w / 2) over all 64 keys. Scheduler, work list, split layout and combine are the bf16 kernels' (kernel.cuh).
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/decode/loader.cuh"
#include "cuda/sm80/decode/softmax.cuh"
#include "cuda/sm80/mma.cuh"
#include "mla/error.hpp"

namespace mla::cuda::sm80::decode {
namespace {

constexpr int kRowBytes = kFp8RowBytes;             // 656
constexpr int kRowChunks = kRowBytes / 16;          // 41 16-byte chunks
constexpr int kBlockM16 = 16;
constexpr int kGroups = kHeadDimV / 128;            // 4 latent groups, one fp32 scale each
static_assert(kRowBytes % 16 == 0 && kGroups == 4 && kWarps == 2 * kGroups, "two warps' O columns per group");
constexpr float kQScale = 4294967296.f;             // 2^32: Q's latent columns as they enter S
constexpr float kSUnscale = 3.0948500982134507e26f; // 2^88 = 2^120 / 2^32: back to q · fp8
constexpr float kPScale = 1.152921504606846976e18f; // 2^60: P'_g = p · scale_g · 2^60; O is multiplied back

template <int kStages>
struct Fp8Plan {
  unsigned char kv[kStages][kBlockN * kRowBytes];  // tiles of rows as stored
  uint16_t q[kBlockM16 * kHeadDim];                // [16, 576] bf16 in S's column order, swizzled (read once)
  uint16_t p[kGroups][kBlockM16 * kBlockN];        // P'_g [16, 64] bf16, swizzled
  float row_max[kWarps][kBlockM16], row_sum[kWarps][kBlockM16];
};

// Bytes 1 and 3 of w as two bf16 lanes: each e4m3 value · 2^-120, exactly.
__device__ __forceinline__ uint32_t e4m3_odd_bytes(uint32_t w) { return (w & 0x80008000u) | ((w >> 4) & 0x07f007f0u); }
// Bytes 0 and 2.
__device__ __forceinline__ uint32_t e4m3_even_bytes(uint32_t w) { return e4m3_odd_bytes(w << 8); }

// Where Q's column d goes in S's fragment order (see the file comment): column 16·kk + k of k-step kk holds the
// latent column 128g + 32q + 4s + high + 2·odd for kk = 8g + s, k = 2q + odd + 8·high (b0 = bytes 0 and 2 of the
// thread's word s, b1 = bytes 1 and 3); the rope columns keep their order.
__device__ __forceinline__ int s_position(int d) {
  if (d >= kHeadDimV) return d;
  const int g = d / 128, q = d % 128 / 32, s = d % 32 / 4, t = d % 4;
  return 16 * (8 * g + s) + 2 * q + t / 2 + 8 * (t % 2);
}

// Raw row loader: 4 threads per key row, 41 chunks between them.
struct RawTileLoader : TileRow {
  __device__ __forceinline__ void issue(unsigned char* tile, const void* kv) const {
    const auto* src = static_cast<const unsigned char*>(kv) + (valid ? slot * kRowBytes : 0);
#pragma unroll
    for (int c = 0; c < (kRowChunks + 3) / 4; ++c) {
      const int chunk = lane4 + 4 * c;
      if (chunk < kRowChunks) cp_async_16(tile + row * kRowBytes + chunk * 16, src + (valid ? chunk * 16 : 0), valid);
    }
  }
};

template <int kStages>
__global__ void __launch_bounds__(kThreads, 1) fp8_rows16_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<Fp8Plan<kStages>*>(smem_raw);

  const int item = p.work[block_work(p)];
  if (item < 0) return;
  const int b = item / kMaxSplits, split = item % kMaxSplits;
  const SequenceSchedule sched = p.schedule[b];
  const int m0 = block_row_block(p) * kBlockM16;
  if (m0 >= p.rows) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane % 4, group_id = lane / 4;
  const int seqlen = p.seqlens[b];
  const int k_begin = split * sched.keys_per_split;
  const int k_end = min(seqlen, k_begin + sched.keys_per_split);
  const int tiles = k_end > k_begin ? (k_end - k_begin + kBlockN - 1) / kBlockN : 0;

  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  RawTileLoader loader;
  loader.prefetch(p, table, k_begin, seqlen);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) loader.issue(sm.kv[s], p.kv);
    cp_async_commit();
    loader.prefetch(p, table, k_begin + (s + 1) * kBlockN, seqlen);
  }

  // Q rows [m0, m0 + 16) (zeros past `rows`) into S's column order, the latent columns times 2^32 (exact).
  const auto* gQ = static_cast<const uint16_t*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * kHeadDim;
  for (int idx = threadIdx.x; idx < kBlockM16 * kChunksQK; idx += kThreads) {
    const int row = idx / kChunksQK, chunk = idx % kChunksQK;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (m0 + row < p.rows) raw = __ldg(reinterpret_cast<const uint4*>(gQ + row * kHeadDim + chunk * 8));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = chunk * 8 + e;
      uint32_t v = (w[e / 2] >> (16 * (e % 2))) & 0xffffu;
      if (d < kHeadDimV) v = __float_as_uint(__uint_as_float(v << 16) * kQScale) >> 16;  // exact: no rounding
      sm.q[swizzle<kChunksQK>(row, s_position(d))] = static_cast<uint16_t>(v);
    }
  }

  const int r_local[2] = {group_id, group_id + 8};  // this thread's rows (C fragment)
  int limit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    limit[i] = r >= p.rows ? 0 : (p.causal ? seqlen - (p.s_q - 1 - r / p.h_q) : seqlen);
  }
  const int key_b = 8 * warp + group_id;  // the key whose columns this thread feeds to S (B fragment)
  const int key_c = 8 * warp + 2 * quad;  // the first of its two S columns' keys (C fragment)
  const int group = warp / 2;             // latent group of this warp's O columns

  float o[8][4];  // 16 rows × this warp's 64 value columns (permuted, see above)
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  uint32_t qf[kHeadDim / 16][4];  // Q's A fragments in S's column order

  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = k_begin + tile * kBlockN;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` landed for everyone; everyone is done with tile - 1's buffers
    {
      const int next = tile + kStages - 1;
      if (next < tiles) loader.issue(sm.kv[next % kStages], p.kv);
      cp_async_commit();
      loader.prefetch(p, table, k_begin + (next + 1) * kBlockN, seqlen);
    }
    if (tile == 0) {  // Q's stores are visible after the barrier above
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)
        ldmatrix_x4(qf[kk], sm.q + swizzle<kChunksQK>(lane % 16, 16 * kk + (lane / 16) * 8));
    }
    const unsigned char* kv = sm.kv[tile % kStages];

    // S [16 rows, 8 keys] per warp: one accumulator per latent group, one for the rope columns.
    float acc[kGroups][4], rope[4] = {0.f, 0.f, 0.f, 0.f};
    const unsigned char* krow = kv + key_b * kRowBytes + 32 * quad;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f;
      const uint4 x0 = *reinterpret_cast<const uint4*>(krow + 128 * g);
      const uint4 x1 = *reinterpret_cast<const uint4*>(krow + 128 * g + 16);
      const uint32_t w[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int s = 0; s < 8; ++s) mma_bf16_16816(acc[g], qf[8 * g + s], e4m3_even_bytes(w[s]), e4m3_odd_bytes(w[s]));
    }
#pragma unroll
    for (int kk = 0; kk < (kHeadDim - kHeadDimV) / 16; ++kk) {
      uint32_t bf[2];
      ldmatrix_x2(bf, kv + (8 * warp + lane % 8) * kRowBytes + kFp8RopeOffset + 2 * (16 * kk + ((lane / 8) % 2) * 8));
      mma_bf16_16816(rope, qf[kHeadDimV / 16 + kk], bf[0], bf[1]);
    }
    float4 scale[2];  // the scales of keys key_c, key_c + 1
#pragma unroll
    for (int e = 0; e < 2; ++e)
      scale[e] = *reinterpret_cast<const float4*>(kv + (key_c + e) * kRowBytes + kFp8ScaleOffset);

    // Scale into the log2 domain, mask, and take this warp's row max.
    float s[4], tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float4& sc = scale[e & 1];
      const float latent = (acc[0][e] * kSUnscale) * sc.x + (acc[1][e] * kSUnscale) * sc.y +
                           (acc[2][e] * kSUnscale) * sc.z + (acc[3][e] * kSUnscale) * sc.w;
      const int t = t0 + key_c + (e & 1);
      s[e] = t < limit[e / 2] ? (latent + rope[e]) * p.scale_log2 : -INFINITY;
      tile_max[e / 2] = fmaxf(tile_max[e / 2], s[e]);
    }
    publish_row_max(tile_max, sm.row_max, warp, r_local, lane);
    __syncthreads();

    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_use = advance_row_max<kWarps>(m_run[i], sm.row_max, r_local[i], alpha[i]);
      const float p0 = exp2f(s[2 * i] - m_use), p1 = exp2f(s[2 * i + 1] - m_use);
      l_run[i] = l_run[i] * alpha[i] + (p0 + p1);  // fp32 sum of the unrounded probabilities
      const float a0 = p0 * kPScale, a1 = p1 * kPScale;
      const float sc0[kGroups] = {scale[0].x, scale[0].y, scale[0].z, scale[0].w};
      const float sc1[kGroups] = {scale[1].x, scale[1].y, scale[1].z, scale[1].w};
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
        *reinterpret_cast<uint32_t*>(sm.p[g] + swizzle<kBlockN / 8>(r_local[i], key_c)) =
            pack_bf16(a0 * sc0[g], a1 * sc1[g]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      o[j][0] *= alpha[0], o[j][1] *= alpha[0];
      o[j][2] *= alpha[1], o[j][3] *= alpha[1];
    }
    __syncthreads();  // P' complete; row_max free again

    // O[16, 64 columns] += P'_group[16, 64] · V[64 keys, 64 columns]: per k-step a thread reads 8 bytes (its
    // column n = group_id of all 8 n-tiles) of each of its 4 keys and pairs them by key with a byte permute.
    const uint16_t* pg = sm.p[group];
    const unsigned char* vcol = kv + 64 * warp + 8 * group_id;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, pg + swizzle<kBlockN / 8>(lane % 16, 16 * kk + (lane / 16) * 8));
      const int k0 = 16 * kk + 2 * quad;
      const uint2 v0 = *reinterpret_cast<const uint2*>(vcol + k0 * kRowBytes);
      const uint2 v1 = *reinterpret_cast<const uint2*>(vcol + (k0 + 1) * kRowBytes);
      const uint2 v8 = *reinterpret_cast<const uint2*>(vcol + (k0 + 8) * kRowBytes);
      const uint2 v9 = *reinterpret_cast<const uint2*>(vcol + (k0 + 9) * kRowBytes);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t sel = (j % 4) * 0x0011u + 0x4400u + (j % 4) * 0x1100u;  // bytes (x_j, x_j, y_j, y_j)
        const uint32_t lo = __byte_perm(j < 4 ? v0.x : v0.y, j < 4 ? v1.x : v1.y, sel);
        const uint32_t hi = __byte_perm(j < 4 ? v8.x : v8.y, j < 4 ? v9.x : v9.y, sel);
        mma_bf16_16816(o[j], a, e4m3_odd_bytes(lo), e4m3_odd_bytes(hi));
      }
    }
  }
  cp_async_wait<0>();

  // Row sums: over the quad, then over the warps.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    if (quad == 0) sm.row_sum[warp][r_local[i]] = l_run[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_local[i];
    if (r >= p.rows) continue;
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) l += sm.row_sum[w][r_local[i]];
    const float inv = l > 0.f ? kPScale / l : 0.f;
    const float lse = l > 0.f ? m_run[i] * 0.69314718055994531f + logf(l) : INFINITY;
    // Columns n = 2·quad and 2·quad + 1 of n-tile j are value columns col0 + j and col0 + 8 + j.
    const int col0 = 64 * warp + 16 * quad;
    float v[16];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = o[j][2 * i] * inv, v[8 + j] = o[j][2 * i + 1] * inv;
    if (sched.splits == 1) {
      const int64_t row = static_cast<int64_t>(b) * p.rows + r;
      auto* out = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + col0);
#pragma unroll
      for (int h = 0; h < 2; ++h)
        out[h] = make_uint4(pack_bf16(v[8 * h], v[8 * h + 1]), pack_bf16(v[8 * h + 2], v[8 * h + 3]),
                            pack_bf16(v[8 * h + 4], v[8 * h + 5]), pack_bf16(v[8 * h + 6], v[8 * h + 7]));
      if (p.lse && warp == 0 && quad == 0)
        p.lse[(static_cast<int64_t>(b) * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(sched.offset + split) * p.rows + r;
      auto* out = reinterpret_cast<float4*>(p.o_partial + prow * kHeadDimV + col0);
#pragma unroll
      for (int h = 0; h < 4; ++h) out[h] = make_float4(v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
      if (warp == 0 && quad == 0) p.lse_partial[prow] = l > 0.f ? lse : -INFINITY;
    }
  }
}

}  // namespace

void launch_fp8_rows16(const Params& p, int smem_limit, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.max_work) * static_cast<unsigned>(p.m_blocks));
  auto launch = [&](auto kernel, size_t bytes) {
    MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    kernel<<<grid, kThreads, bytes, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
  };
  // As many tiles in flight as fit: 4 on Hopper (191 KB), 3 on an A100 (150 KB), 2 elsewhere.
  if (smem_limit >= static_cast<int>(sizeof(Fp8Plan<4>))) launch(fp8_rows16_kernel<4>, sizeof(Fp8Plan<4>));
  else if (smem_limit >= static_cast<int>(sizeof(Fp8Plan<3>))) launch(fp8_rows16_kernel<3>, sizeof(Fp8Plan<3>));
  else if (smem_limit >= static_cast<int>(sizeof(Fp8Plan<2>))) launch(fp8_rows16_kernel<2>, sizeof(Fp8Plan<2>));
  else
    throw InvalidArgument("decode_attention (cuda): the GPU allows " + std::to_string(smem_limit) +
                          " bytes of shared memory per block; the fp8 16-row kernel needs " +
                          std::to_string(sizeof(Fp8Plan<2>)));
}

}  // namespace mla::cuda::sm80::decode
