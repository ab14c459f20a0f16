// The sm80 attention backward for bf16, q·k 192, v 128: D = rowsum(d_out ⊙ out) and lse·log2(e), the main kernel
// (kernel.cuh) once per sequence, and the conversion of the fp32 dQ accumulator. Four stream-ordered steps, nothing
// allocated. The first and last steps serve the sm90 kernel too.
#include <cuda_bf16.h>

#include <algorithm>

#include "cuda/common/check.hpp"
#include "cuda/sm80/backward/kernel.cuh"

namespace mla::cuda::sm80::backward {
namespace {

constexpr int kRowsPerBlock = 8;  // preprocess: one warp per (token, head) row

// delta [H, stride] = Σ_e d_out ⊙ out over each row's 128 values, fp32, and lse_log2 [H, stride] = lse·log2(e)
// (lse [H, total_q]).
__global__ void __launch_bounds__(32 * kRowsPerBlock) stats_kernel(const __nv_bfloat16* __restrict__ out,
                                                                   const __nv_bfloat16* __restrict__ d_out,
                                                                   const float* __restrict__ lse,
                                                                   float* __restrict__ lse_log2,
                                                                   float* __restrict__ delta, int64_t total_q,
                                                                   int64_t stride, int heads) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;  // token · H + head
  const int lane = threadIdx.x % 32;
  if (row >= total_q * heads) return;
  // 128 values = 32 lanes × 4: two bf16 pairs per lane
  const auto* o2 = reinterpret_cast<const __nv_bfloat162*>(out + row * kHeadDimV) + 2 * lane;
  const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(d_out + row * kHeadDimV) + 2 * lane;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 o = __bfloat1622float2(o2[i]), g = __bfloat1622float2(g2[i]);
    sum += o.x * g.x + o.y * g.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const int64_t h = row % heads, token = row / heads;
    delta[h * stride + token] = sum;
    lse_log2[h * stride + token] = lse[h * total_q + token] * 1.4426950408889634f;
  }
}

// d_q = bf16(scale · accumulator), elementwise over [total_q, H, 192].
__global__ void convert_kernel(const float* __restrict__ acc, __nv_bfloat16* __restrict__ d_q, int64_t n, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    d_q[i] = __float2bfloat16_rn(acc[i] * scale);
}

constexpr int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

}  // namespace

int64_t workspace_bytes(int64_t total_q, int64_t heads, int64_t head_dim_qk) {
  return align256(total_q * heads * head_dim_qk * 4) + align256(2 * heads * stats_stride(total_q) * 4);
}

float* d_q_accumulator(const Call& c) { return static_cast<float*>(c.workspace); }

float* lse_log2(const Call& c) {
  return reinterpret_cast<float*>(static_cast<char*>(c.workspace) + align256(c.total_q * c.heads * kHeadDimQK * 4));
}

float* delta(const Call& c) { return lse_log2(c) + c.heads * stats_stride(c.total_q); }

Params kernel_params(const Call& c) {
  Params p;
  p.heads = static_cast<int>(c.heads), p.stats_stride = stats_stride(c.total_q);
  p.q = c.q, p.k = c.k, p.v = c.v, p.d_out = c.d_out, p.lse_log2 = lse_log2(c), p.delta = delta(c);
  p.scale = c.scale, p.scale_log2 = c.scale * 1.4426950408889634f, p.causal = c.causal;
  p.d_q_accum = d_q_accumulator(c), p.d_k = c.d_k, p.d_v = c.d_v;
  return p;
}

bool set_sequence(Params& p, const Call& c, int64_t b) {
  p.q_offset = c.cu_q[b], p.k_offset = c.cu_k[b];
  p.n_q = static_cast<int>(c.cu_q[b + 1] - c.cu_q[b]), p.n_k = static_cast<int>(c.cu_k[b + 1] - c.cu_k[b]);
  return p.n_k > 0;
}

void run_preprocess(const Call& c, cudaStream_t stream) {
  if (c.total_q == 0) return;
  MLA_CUDA_CHECK(cudaMemsetAsync(d_q_accumulator(c), 0, static_cast<size_t>(c.total_q * c.heads * kHeadDimQK) * 4, stream));
  const auto blocks = static_cast<unsigned>((c.total_q * c.heads + kRowsPerBlock - 1) / kRowsPerBlock);
  stats_kernel<<<blocks, 32 * kRowsPerBlock, 0, stream>>>(static_cast<const __nv_bfloat16*>(c.out),
                                                          static_cast<const __nv_bfloat16*>(c.d_out), c.lse,
                                                          lse_log2(c), delta(c), c.total_q,
                                                          stats_stride(c.total_q), static_cast<int>(c.heads));
  MLA_CUDA_LAUNCH_CHECK();
}

void run_convert(const Call& c, cudaStream_t stream) {
  const int64_t n = c.total_q * c.heads * kHeadDimQK;
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535));
  convert_kernel<<<blocks, 256, 0, stream>>>(d_q_accumulator(c), static_cast<__nv_bfloat16*>(c.d_q), n, c.scale);
  MLA_CUDA_LAUNCH_CHECK();
}

void run_bf16_192_128(const Call& c, cudaStream_t stream) {
  if (c.total_q == 0 && c.total_k == 0) return;
  run_preprocess(c, stream);
  constexpr size_t bytes = sizeof(SharedMemoryPlan);
  MLA_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  Params p = kernel_params(c);
  for (int64_t b = 0; b < c.batch; ++b) {
    if (!set_sequence(p, c, b)) continue;
    const dim3 grid((p.n_k + kBlockN - 1) / kBlockN, p.heads);  // key blocks that see the most queries first
    backward_kernel<<<grid, kThreads, bytes, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
  }
  run_convert(c, stream);
}

}  // namespace mla::cuda::sm80::backward
