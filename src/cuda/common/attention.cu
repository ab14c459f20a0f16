#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/fp8_row.cuh"
#include "cuda/common/types.cuh"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/prefill/config.h"
#include "cuda/sm90/launch.hpp"

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
      float dot = 0.f;
      for (int j = 0; j < dqk; ++j) dot += sq[j] * keys.key(row, j);
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
      for (int i = 0; i < n; ++i) a += sp[i] * keys.value(srow[i], j);
      acc[j] = a;
    }
    m = m_new;
    __syncthreads();
  }
  for (int j = threadIdx.x; j < dv; j += blockDim.x) out[j] = from_f32<T>(l > 0.f ? acc[j] / l : 0.f);
  if (lse && threadIdx.x == 0) *lse = l > 0.f ? m + logf(l) : INFINITY;
}

// Keys give row(t), the key's element j and the value's element j as floats.
template <class T>
struct PagedKeys {
  const T* kv;
  const int32_t* table;
  int page_size, dqk;
  __device__ int64_t row(int t) const { return int64_t{table[t / page_size]} * page_size + t % page_size; }
  __device__ float key(int64_t r, int j) const { return to_f32<T>(kv[r * dqk + j]); }
  __device__ float value(int64_t r, int j) const { return key(r, j); }  // value = the row's first dv columns
};

// The same over fp8 rows: bf16(fp8 · scale) for the latent columns, the bf16 rope columns as stored.
struct Fp8PagedKeys {
  const uint8_t* kv;
  const int32_t* table;
  int page_size;
  Fp8Row f;
  __device__ int64_t row(int t) const { return int64_t{table[t / page_size]} * page_size + t % page_size; }
  __device__ float key(int64_t r, int j) const {
    const uint8_t* at = kv + r * f.bytes;
    if (j >= f.latent) return __bfloat162float(reinterpret_cast<const bf16*>(at + f.rope_offset)[j - f.latent]);
    const float scale = reinterpret_cast<const float*>(at + f.scale_offset)[j / 128];
    return round_to<bf16>(fp8_dequantize_f32(at[j], scale));
  }
  __device__ float value(int64_t r, int j) const { return key(r, j); }
};

template <class T>
__global__ void generic_decode_kernel(DecodeParams p, Fp8Row fp8) {
  const int r = blockIdx.x, b = blockIdx.y;  // r = i · h_q + h
  const int i = r / p.h_q, h = r % p.h_q;
  const int seqlen = p.cache_seqlens[b];
  const int limit = max(0, p.causal ? seqlen - static_cast<int>(p.s_q - 1 - i) : seqlen);
  const int64_t row = static_cast<int64_t>(b) * p.s_q * p.h_q + r;
  const int32_t* table = p.block_table + b * p.max_pages;
  const int page_size = static_cast<int>(p.page_size);
  if (p.fp8_kv_cache) {
    const Fp8PagedKeys keys{static_cast<const uint8_t*>(p.kv_cache), table, page_size, fp8};
    attend_row<T>(static_cast<const T*>(p.q) + row * p.head_dim, static_cast<int>(p.head_dim),
                  static_cast<int>(p.head_dim_v), limit, keys, p.softmax_scale,
                  static_cast<T*>(p.out) + row * p.head_dim_v,
                  p.lse ? p.lse + (int64_t{b} * p.h_q + h) * p.s_q + i : nullptr);
    return;
  }
  PagedKeys<T> keys{static_cast<const T*>(p.kv_cache), table, page_size, static_cast<int>(p.head_dim)};
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
  __device__ float key(int64_t r, int j) const { return to_f32<T>(k[(r * heads + h) * dqk + j]); }
  __device__ float value(int64_t r, int j) const { return to_f32<T>(v[(r * heads + h) * dv + j]); }
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
  validate_shape(p);
  if (p.batch > 0 && (!p.q || !p.kv_cache || !p.block_table || !p.cache_seqlens || !p.out))
    throw InvalidArgument("decode_attention (cuda): q, kv_cache, block_table, cache_seqlens and out must not be null");
}

void validate_shape(const DecodeParams& p) {
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
  if (p.cu_seqlens_on_device) return;  // read by the kernel only (PrefillParams)
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t nq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b], nk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    if (nq < 0 || nk < 0) bad("cu_seqlens must not decrease (sequence " + std::to_string(b) + ")");
    if (p.cu_seqlens_q[b + 1] > p.total_q || p.cu_seqlens_k[b + 1] > p.total_k)
      bad("cu_seqlens of sequence " + std::to_string(b) + " run past total_q / total_k");
  }
  if (p.total_q > 0 && (!p.q || !p.out)) bad("q and out must not be null");
  if (p.total_k > 0 && (!p.k || !p.v)) bad("k and v must not be null");
}

// Workspace of the split kernel: schedule [batch], work list [max_work], partial O [max_work, rows, 512] and
// LSE [max_work, rows], each section 256-byte aligned.
struct DecodeWorkspace {
  int64_t schedule = 0, work = 0, o_partial = 0, lse_partial = 0, bytes = 0;
  DecodeWorkspace(int64_t batch, int64_t rows, int64_t max_work) {
    auto take = [&](int64_t n) {
      const int64_t at = bytes;
      bytes += (n + 255) / 256 * 256;
      return at;
    };
    schedule = take(batch * static_cast<int64_t>(sizeof(sm80::decode::SequenceSchedule)));
    work = take(max_work * 4);
    o_partial = take(max_work * rows * sm80::decode::kHeadDimV * 4);
    lse_partial = take(max_work * rows * 4);
  }
};

DecodePlan plan_decode(const DecodeParams& p, int num_sms) {
  DecodePlan plan;
  if (!fast_decode(p)) {
    plan.kernel = "generic";
    return plan;
  }
  // The sm90 kernel reads 64-key tiles through a tensor map in boxes of min(page size, 64) rows.
  const bool sm90_capable = sm90::usable() && p.page_size >= 16;
  const int64_t rows = p.s_q * p.h_q;
  const bool fp8_rows16 = sm80::decode::uses_fp8_rows16(p.fp8_kv_cache, static_cast<int>(rows));
  const int64_t bm = fp8_rows16 ? 16 : sm80::decode::block_rows(static_cast<int>(rows), sm90_capable, p.batch);
  const bool use_sm90 = sm90_capable && bm == 64;
  plan.kernel = fp8_rows16 ? "sm80-fp8-576-rows16"
                           : std::string(use_sm90 ? "sm90" : "sm80") + (p.fp8_kv_cache ? "-fp8-576" : "-bf16-576");
  plan.max_work = static_cast<int>(p.batch + num_sms);
  if (plan.max_work * ((rows + bm - 1) / bm) > std::numeric_limits<int32_t>::max() ||
      p.batch * rows > std::numeric_limits<int32_t>::max())  // grid sizes of the split and combine kernels
    throw InvalidArgument("decode_attention (cuda): batch · s_q · h_q too large for one launch");
  plan.workspace_bytes = DecodeWorkspace(p.batch, p.s_q * p.h_q, plan.max_work).bytes;
  return plan;
}

void run_decode(const DecodeParams& p, const DecodePlan& plan, DeviceArray& workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  workspace.reserve(plan.workspace_bytes);
  run_decode(p, plan, plan.workspace_bytes > 0 ? workspace.get<char>() : nullptr, stream);
}

void run_decode(const DecodeParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream,
                DecodeStage stage) {
  if (p.batch == 0) return;
  if (plan.kernel == "generic") {
    if (stage == DecodeStage::kSplit) return;
    const size_t smem = generic_smem(p.head_dim, p.head_dim_v);
    if (smem > 48 * 1024) throw InvalidArgument("decode_attention (cuda): head dims too large for the generic kernel");
    const dim3 grid(static_cast<unsigned>(p.s_q * p.h_q), static_cast<unsigned>(p.batch));
    const Fp8Row fp8 = Fp8Row::of(kv_cache_row(p));
    if (p.dtype == DType::F32) generic_decode_kernel<float><<<grid, kGenericThreads, smem, stream>>>(p, fp8);
    else generic_decode_kernel<bf16><<<grid, kGenericThreads, smem, stream>>>(p, fp8);
    MLA_CUDA_LAUNCH_CHECK();
    return;
  }
  sm80::decode::Params k;
  k.batch = static_cast<int>(p.batch), k.s_q = static_cast<int>(p.s_q), k.h_q = static_cast<int>(p.h_q);
  k.rows = static_cast<int>(p.s_q * p.h_q);
  k.page_size_log2 = std::countr_zero(static_cast<uint64_t>(p.page_size));
  k.max_pages = static_cast<int>(p.max_pages);
  k.num_pages = p.num_pages;
  k.q = p.q, k.kv = p.kv_cache, k.fp8 = p.fp8_kv_cache, k.block_table = p.block_table, k.seqlens = p.cache_seqlens;
  k.scale_log2 = p.softmax_scale * kLog2e;
  k.causal = p.causal;
  k.out = p.out, k.lse = p.lse;
  const DecodeWorkspace ws(p.batch, k.rows, plan.max_work);
  char* base = static_cast<char*>(workspace);
  k.schedule = reinterpret_cast<const sm80::decode::SequenceSchedule*>(base + ws.schedule);
  k.work = reinterpret_cast<const int32_t*>(base + ws.work);
  k.max_work = plan.max_work;
  k.o_partial = reinterpret_cast<float*>(base + ws.o_partial);
  k.lse_partial = reinterpret_cast<float*>(base + ws.lse_partial);
  int device = 0, sms = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  sm80::decode::run_bf16_576(k, sms, stream, stage != DecodeStage::kAttend, stage != DecodeStage::kSplit);
}

std::string prefill_kernel_name(const PrefillParams& p) {
  if (!fast_prefill(p)) return "generic";
  return sm90::usable() ? "sm90-bf16-192-128" : "sm80-bf16-192-128";
}

bool prefill_is_fast(const PrefillParams& p) { return fast_prefill(p); }

namespace {

// The fast kernels' parameters for the whole call (dense or strided K/V); the sequence fields are set per launch.
sm80::prefill::Params fast_params(const PrefillParams& p, const PrefillLayout* layout) {
  sm80::prefill::Params k;
  k.heads = static_cast<int>(p.num_heads), k.total_q = p.total_q, k.total_k = p.total_k;
  k.q = p.q, k.out = p.out, k.lse = p.lse;
  if (layout) {
    k.k = layout->k, k.k_row = layout->k_row, k.k_head = layout->k_head;
    k.k_tail = layout->k_tail, k.k_tail_row = layout->k_tail_row, k.k_tail_head = layout->k_tail_head;
    k.k_split = layout->k_split;
    k.v = layout->v, k.v_row = layout->v_row, k.v_head = layout->v_head;
  } else {  // dense [total_k, H, 192] and [total_k, H, 128]
    constexpr int dqk = sm80::prefill::kHeadDimQK, dv = sm80::prefill::kHeadDimV;
    k.k = k.k_tail = p.k, k.k_row = k.k_tail_row = k.heads * int64_t{dqk}, k.k_head = k.k_tail_head = dqk;
    k.k_split = dqk;
    k.v = p.v, k.v_row = k.heads * int64_t{dv}, k.v_head = dv;
  }
  k.scale_log2 = p.softmax_scale * kLog2e;
  k.causal = p.causal;
  return k;
}

}  // namespace

std::vector<int32_t> cu_seqlens_to_host(const int32_t* cu_q, const int32_t* cu_k, int64_t batch, cudaStream_t stream) {
  std::vector<int32_t> cu(static_cast<size_t>(2 * (batch + 1)));
  const size_t bytes = static_cast<size_t>(batch + 1) * sizeof(int32_t);
  MLA_CUDA_CHECK(cudaMemcpyAsync(cu.data(), cu_q, bytes, cudaMemcpyDeviceToHost, stream));
  MLA_CUDA_CHECK(cudaMemcpyAsync(cu.data() + batch + 1, cu_k, bytes, cudaMemcpyDeviceToHost, stream));
  MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
  return cu;
}

void run_prefill(const PrefillParams& p, cudaStream_t stream, const PrefillLayout* layout) {
  const bool fast = fast_prefill(p);
  if (layout && (!fast || layout->k_split != sm80::prefill::kStridedSplit))
    throw InvalidArgument("prefill_attention (cuda): a strided K/V layout needs the fast kernels and k_split 128");
  if (p.cu_seqlens_on_device) {
    if (fast && sm90::usable()) {  // the whole batch in one launch; nothing read on the host
      sm80::prefill::Params k = fast_params(p, layout);
      k.cu_q = p.cu_seqlens_q, k.cu_k = p.cu_seqlens_k, k.batch = static_cast<int>(p.batch);
      sm90::prefill::run_bf16_192_128(k, stream);
      return;
    }
    // The other kernels launch per sequence from host lengths: copy them (one synchronising copy), check them.
    const std::vector<int32_t> cu = cu_seqlens_to_host(p.cu_seqlens_q, p.cu_seqlens_k, p.batch, stream);
    PrefillParams host = p;
    host.cu_seqlens_on_device = false;
    host.cu_seqlens_q = cu.data(), host.cu_seqlens_k = cu.data() + p.batch + 1;
    mla::prefill_attention("cuda", host, stream);  // the host checks, then this function again
    return;
  }
  const size_t smem = generic_smem(p.head_dim_qk, p.head_dim_v);
  if (!fast && smem > 48 * 1024) throw InvalidArgument("prefill_attention (cuda): head dims too large for the generic kernel");
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    const int n_q = static_cast<int>(p.cu_seqlens_q[b + 1] - q0), n_k = static_cast<int>(p.cu_seqlens_k[b + 1] - k0);
    if (n_q == 0) continue;
    if (fast) {
      sm80::prefill::Params k = fast_params(p, layout);
      k.n_q = n_q, k.n_k = n_k, k.q_offset = q0, k.k_offset = k0;
      if (sm90::usable()) sm90::prefill::run_bf16_192_128(k, stream);
      else sm80::prefill::run_bf16_192_128(k, stream);
      continue;
    }
    const dim3 grid(static_cast<unsigned>(n_q), static_cast<unsigned>(p.num_heads));
    if (p.dtype == DType::F32) generic_prefill_kernel<float><<<grid, kGenericThreads, smem, stream>>>(p, q0, k0, n_q, n_k);
    else generic_prefill_kernel<bf16><<<grid, kGenericThreads, smem, stream>>>(p, q0, k0, n_q, n_k);
    MLA_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace mla::cuda
