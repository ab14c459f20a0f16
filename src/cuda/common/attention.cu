#include <algorithm>
#include <bit>
#include <cmath>
#include <string>

#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/types.cuh"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/prefill/config.h"

namespace mla::cuda {
namespace {

constexpr int kGenericThreads = 128;  // keys per step of the generic kernels
constexpr float kLog2e = 1.4426950408889634f;

// The generic kernel: one block per query row (one head), plain fp32 dot products, online softmax over steps
// of 128 keys with P rounded to the element type before P·V. Any head dims, any element type; slow but exact
// to the CPU backends' rounding points.
template <class T, class Keys>
__device__ void attend_row(const T* __restrict__ q, int dqk, int dv, int limit, const Keys& keys, float scale,
                           T* __restrict__ out, float* lse) {
  extern __shared__ float smem[];
  float* sq = smem;                    // [dqk]
  float* acc = sq + dqk;               // [dv]
  float* sp = acc + dv;                // [128] probabilities
  int64_t* srow = reinterpret_cast<int64_t*>(sp + kGenericThreads);  // [128] key row ids
  __shared__ float scratch[32];
  for (int j = threadIdx.x; j < dqk; j += blockDim.x) sq[j] = to_f32<T>(q[j]);
  for (int j = threadIdx.x; j < dv; j += blockDim.x) acc[j] = 0.f;
  __syncthreads();
  float m = -INFINITY, l = 0.f;
  for (int k0 = 0; k0 < limit; k0 += kGenericThreads) {
    const int t = k0 + threadIdx.x, n = min(kGenericThreads, limit - k0);
    float s = -INFINITY;
    if (t < limit) {
      const int64_t row = keys.row(t);
      srow[threadIdx.x] = row;
      const T* k = keys.key(row);
      float dot = 0.f;
      for (int j = 0; j < dqk; ++j) dot += sq[j] * to_f32<T>(k[j]);
      s = scale * dot;
    }
    const float m_new = fmaxf(m, block_max(s, scratch));
    const float alpha = m == -INFINITY ? 0.f : expf(m - m_new);
    const float pv = t < limit ? expf(s - m_new) : 0.f;
    l = l * alpha + block_sum(pv, scratch);
    sp[threadIdx.x] = round_to<T>(pv);
    __syncthreads();
    for (int j = threadIdx.x; j < dv; j += blockDim.x) {
      float a = acc[j] * alpha;
      for (int i = 0; i < n; ++i) a += sp[i] * to_f32<T>(keys.value(srow[i])[j]);
      acc[j] = a;
    }
    m = m_new;
    __syncthreads();
  }
  for (int j = threadIdx.x; j < dv; j += blockDim.x) out[j] = from_f32<T>(l > 0.f ? acc[j] / l : 0.f);
  if (lse && threadIdx.x == 0) *lse = l > 0.f ? m + logf(l) : INFINITY;
}

template <class T>
struct PagedKeys {
  const T* kv;
  const int32_t* table;
  int page_size, dqk;
  __device__ int64_t row(int t) const { return int64_t{table[t / page_size]} * page_size + t % page_size; }
  __device__ const T* key(int64_t r) const { return kv + r * dqk; }
  __device__ const T* value(int64_t r) const { return kv + r * dqk; }  // value = the row's first dv columns
};

template <class T>
__global__ void generic_decode_kernel(DecodeParams p) {
  const int r = blockIdx.x, b = blockIdx.y;  // r = i · h_q + h
  const int i = r / p.h_q, h = r % p.h_q;
  const int seqlen = p.cache_seqlens[b];
  const int limit = max(0, p.causal ? seqlen - static_cast<int>(p.s_q - 1 - i) : seqlen);
  const int64_t row = static_cast<int64_t>(b) * p.s_q * p.h_q + r;
  PagedKeys<T> keys{static_cast<const T*>(p.kv_cache), p.block_table + b * p.max_pages, static_cast<int>(p.page_size),
                    static_cast<int>(p.head_dim)};
  attend_row<T>(static_cast<const T*>(p.q) + row * p.head_dim, static_cast<int>(p.head_dim),
                static_cast<int>(p.head_dim_v), limit, keys, p.softmax_scale,
                static_cast<T*>(p.out) + row * p.head_dim_v, p.lse ? p.lse + (int64_t{b} * p.h_q + h) * p.s_q + i : nullptr);
}

template <class T>
struct DenseKeys {
  const T* k;
  const T* v;
  int64_t k_offset;
  int heads, h, dqk, dv;
  __device__ int64_t row(int t) const { return k_offset + t; }
  __device__ const T* key(int64_t r) const { return k + (r * heads + h) * dqk; }
  __device__ const T* value(int64_t r) const { return v + (r * heads + h) * dv; }
};

template <class T>
__global__ void generic_prefill_kernel(PrefillParams p, int64_t q_offset, int64_t k_offset, int n_q, int n_k) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int limit = p.causal ? std::clamp(n_k - n_q + i + 1, 0, n_k) : n_k;
  const int heads = static_cast<int>(p.num_heads), dqk = static_cast<int>(p.head_dim_qk), dv = static_cast<int>(p.head_dim_v);
  DenseKeys<T> keys{static_cast<const T*>(p.k), static_cast<const T*>(p.v), k_offset, heads, h, dqk, dv};
  const int64_t qrow = (q_offset + i) * heads + h;
  attend_row<T>(static_cast<const T*>(p.q) + qrow * dqk, dqk, dv, limit, keys, p.softmax_scale,
                static_cast<T*>(p.out) + qrow * dv, p.lse ? p.lse + h * p.total_q + q_offset + i : nullptr);
}

size_t generic_smem(int64_t dqk, int64_t dv) {
  return static_cast<size_t>(dqk + dv + kGenericThreads) * sizeof(float) + kGenericThreads * sizeof(int64_t);
}

// Merges split partials by log-sum-exp: one block per (batch, row).
template <class T>
__global__ void combine_kernel(const float* __restrict__ o_partial, const float* __restrict__ lse_partial, int splits,
                               int batch, int s_q, int h_q, int dv, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ float weights[];  // [splits]
  __shared__ float scratch[32];
  const int rows = s_q * h_q;
  const int64_t row = blockIdx.x;  // b · rows + r
  const int64_t stride = int64_t{batch} * rows;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, lse_partial[s * stride + row]);
  mx = block_max(mx, scratch);
  float sum = 0.f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float w = mx == -INFINITY ? 0.f : expf(lse_partial[s * stride + row] - mx);
    weights[s] = w;
    sum += w;
  }
  sum = block_sum(sum, scratch);  // also orders the weights' stores before the loads below
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int j = threadIdx.x; j < dv; j += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < splits; ++s)
      if (weights[s] > 0.f) a += weights[s] * o_partial[(s * stride + row) * dv + j];
    out[row * dv + j] = from_f32<T>(a * inv);
  }
  if (lse && threadIdx.x == 0) {
    const int b = static_cast<int>(row / rows), r = static_cast<int>(row % rows);
    lse[(int64_t{b} * h_q + r % h_q) * s_q + r / h_q] = sum > 0.f ? mx + logf(sum) : INFINITY;
  }
}

bool fast_decode(const DecodeParams& p) {
  return p.dtype == DType::BF16 && p.head_dim == sm80::decode::kHeadDim && p.head_dim_v == sm80::decode::kHeadDimV;
}
bool fast_prefill(const PrefillParams& p) {
  return p.dtype == DType::BF16 && p.head_dim_qk == sm80::prefill::kHeadDimQK && p.head_dim_v == sm80::prefill::kHeadDimV;
}

void check_dtype(DType t, const char* op) {
  if (t != DType::BF16 && t != DType::F32)
    throw InvalidArgument(std::string(op) + " (cuda): dtype " + std::string(dtype_name(t)) +
                          " is not supported on this backend (BF16 or F32)");
}

}  // namespace

void validate(const DecodeParams& p) {
  auto bad = [](const std::string& what) { throw InvalidArgument("decode_attention (cuda): " + what); };
  check_dtype(p.dtype, "decode_attention");
  if (p.batch < 0) bad("batch must not be negative, got " + std::to_string(p.batch));
  if (p.s_q < 1) bad("s_q must be >= 1, got " + std::to_string(p.s_q));
  if (p.h_q < 1) bad("h_q must be >= 1, got " + std::to_string(p.h_q));
  if (p.head_dim < 1 || p.head_dim_v < 1 || p.head_dim_v > p.head_dim)
    bad("need 1 <= head_dim_v <= head_dim, got head_dim " + std::to_string(p.head_dim) + ", head_dim_v " +
        std::to_string(p.head_dim_v));
  if (p.page_size < 1 || !std::has_single_bit(static_cast<uint64_t>(p.page_size)))
    bad("page_size must be a power of two, got " + std::to_string(p.page_size));
  if (p.max_pages < 0 || p.num_pages < 0) bad("max_pages and num_pages must not be negative");
  if (p.s_q * p.h_q > (int64_t{1} << 30) || p.max_pages * p.page_size > (int64_t{1} << 30))
    bad("s_q·h_q and max_pages·page_size must stay below 2^30");
  if (p.batch > 0 && (!p.q || !p.kv_cache || !p.block_table || !p.cache_seqlens || !p.out))
    bad("q, kv_cache, block_table, cache_seqlens and out must not be null");
  if (p.batch > 65535) bad("batch must be <= 65535, got " + std::to_string(p.batch));
  if (p.s_q * p.h_q > 65535 * 64) bad("s_q·h_q too large");
}

void validate(const PrefillParams& p) {
  auto bad = [](const std::string& what) { throw InvalidArgument("prefill_attention (cuda): " + what); };
  check_dtype(p.dtype, "prefill_attention");
  if (p.batch < 0 || p.num_heads < 1) bad("need batch >= 0 and num_heads >= 1");
  if (p.head_dim_qk < 1 || p.head_dim_v < 1) bad("head dims must be positive");
  if (p.batch > 0 && (!p.cu_seqlens_q || !p.cu_seqlens_k)) bad("cu_seqlens_q and cu_seqlens_k must not be null");
  if (p.num_heads > 65535) bad("num_heads must be <= 65535");
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t nq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b], nk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    if (nq < 0 || nk < 0) bad("cu_seqlens must not decrease (sequence " + std::to_string(b) + ")");
    if (p.cu_seqlens_q[b + 1] > p.total_q || p.cu_seqlens_k[b + 1] > p.total_k)
      bad("cu_seqlens of sequence " + std::to_string(b) + " run past total_q / total_k");
  }
  if (p.total_q > 0 && (!p.q || !p.out)) bad("q and out must not be null");
  if (p.total_k > 0 && (!p.k || !p.v)) bad("k and v must not be null");
}

DecodePlan plan_decode(const DecodeParams& p, int num_sms) {
  DecodePlan plan;
  if (!fast_decode(p)) {
    plan.kernel = "generic";
    return plan;
  }
  plan.kernel = "sm80-bf16-576";
  using namespace sm80::decode;
  const int64_t m_blocks = (p.s_q * p.h_q + kBlockM - 1) / kBlockM;
  const int64_t base = p.batch * m_blocks;                     // blocks without splitting
  const int64_t tiles = std::max<int64_t>(1, (p.max_pages * p.page_size + kBlockN - 1) / kBlockN);
  // Minimise (waves of blocks) × (tiles per block + one tile's worth of fixed cost per block).
  int best = 1;
  double best_cost = 1e300;
  for (int s = 1; s <= std::min<int64_t>(tiles, 128); ++s) {
    const double waves = std::ceil(static_cast<double>(base * s) / num_sms);
    const double cost = waves * (std::ceil(static_cast<double>(tiles) / s) + 1.0) + (s > 1 ? 0.5 : 0.0);
    if (cost < best_cost - 1e-9) best_cost = cost, best = s;
  }
  plan.splits = best;
  plan.keys_per_split = static_cast<int>((tiles + best - 1) / best * kBlockN);
  if (best > 1)
    plan.workspace_bytes = static_cast<int64_t>(best) * p.batch * p.s_q * p.h_q * (kHeadDimV + 1) * 4;
  return plan;
}

void run_decode(const DecodeParams& p, const DecodePlan& plan, DeviceArray& workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  if (plan.kernel == "generic") {
    const size_t smem = generic_smem(p.head_dim, p.head_dim_v);
    if (smem > 48 * 1024) throw InvalidArgument("decode_attention (cuda): head dims too large for the generic kernel");
    const dim3 grid(static_cast<unsigned>(p.s_q * p.h_q), static_cast<unsigned>(p.batch));
    if (p.dtype == DType::F32) generic_decode_kernel<float><<<grid, kGenericThreads, smem, stream>>>(p);
    else generic_decode_kernel<bf16><<<grid, kGenericThreads, smem, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
    return;
  }
  sm80::decode::Params k;
  k.batch = static_cast<int>(p.batch), k.s_q = static_cast<int>(p.s_q), k.h_q = static_cast<int>(p.h_q);
  k.rows = static_cast<int>(p.s_q * p.h_q);
  k.page_size_log2 = std::countr_zero(static_cast<uint64_t>(p.page_size));
  k.max_pages = static_cast<int>(p.max_pages);
  k.q = p.q, k.kv = p.kv_cache, k.block_table = p.block_table, k.seqlens = p.cache_seqlens;
  k.scale_log2 = p.softmax_scale * kLog2e;
  k.causal = p.causal;
  k.splits = plan.splits, k.keys_per_split = plan.keys_per_split;
  k.out = p.out, k.lse = p.lse;
  if (plan.splits > 1) {
    workspace.reserve(plan.workspace_bytes);
    k.o_partial = workspace.get<float>();
    k.lse_partial = k.o_partial + int64_t{plan.splits} * k.batch * k.rows * sm80::decode::kHeadDimV;
  }
  sm80::decode::run_bf16_576(k, stream);
  if (plan.splits > 1) {
    const size_t smem = static_cast<size_t>(plan.splits) * sizeof(float);
    combine_kernel<bf16><<<static_cast<unsigned>(p.batch * k.rows), 128, smem, stream>>>(
        k.o_partial, k.lse_partial, plan.splits, k.batch, k.s_q, k.h_q, sm80::decode::kHeadDimV,
        static_cast<bf16*>(p.out), p.lse);
    MLA_CUDA_LAUNCH_CHECK();
  }
}

std::string prefill_kernel_name(const PrefillParams& p) { return fast_prefill(p) ? "sm80-bf16-192-128" : "generic"; }

void run_prefill(const PrefillParams& p, cudaStream_t stream) {
  const bool fast = fast_prefill(p);
  const size_t smem = generic_smem(p.head_dim_qk, p.head_dim_v);
  if (!fast && smem > 48 * 1024) throw InvalidArgument("prefill_attention (cuda): head dims too large for the generic kernel");
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    const int n_q = static_cast<int>(p.cu_seqlens_q[b + 1] - q0), n_k = static_cast<int>(p.cu_seqlens_k[b + 1] - k0);
    if (n_q == 0) continue;
    if (fast) {
      sm80::prefill::Params k;
      k.heads = static_cast<int>(p.num_heads), k.n_q = n_q, k.n_k = n_k;
      k.q_offset = q0, k.k_offset = k0, k.total_q = p.total_q;
      k.q = p.q, k.k = p.k, k.v = p.v, k.out = p.out, k.lse = p.lse;
      k.scale_log2 = p.softmax_scale * kLog2e;
      k.causal = p.causal;
      sm80::prefill::run_bf16_192_128(k, stream);
      continue;
    }
    const dim3 grid(static_cast<unsigned>(n_q), static_cast<unsigned>(p.num_heads));
    if (p.dtype == DType::F32) generic_prefill_kernel<float><<<grid, kGenericThreads, smem, stream>>>(p, q0, k0, n_q, n_k);
    else generic_prefill_kernel<bf16><<<grid, kGenericThreads, smem, stream>>>(p, q0, k0, n_q, n_k);
    MLA_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace mla::cuda
