#include "cuda/common/check.hpp"
#include "cuda/common/elementwise.hpp"
#include "cuda/common/types.cuh"

namespace mla::cuda {
namespace {

template <class T>
__global__ void convert_checked_kernel(const float* __restrict__ in, T* __restrict__ out, int64_t n,
                                       unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float v = in[i];
    if (!isfinite(v)) atomicMin(first_bad, static_cast<unsigned long long>(i));
    out[i] = from_f32<T>(v);
  }
}

template <class T>
__global__ void rms_norm_kernel(const float* __restrict__ in, int64_t ld_in, const float* __restrict__ bias,
                                const float* __restrict__ gamma, float eps, int64_t d, T* __restrict__ out) {
  __shared__ float scratch[32];
  const float* x = in + blockIdx.x * ld_in;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = x[j] + (bias ? bias[j] : 0.f);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = x[j] + (bias ? bias[j] : 0.f);
    out[blockIdx.x * d + j] = from_f32<T>(gamma[j] * (v * inv));
  }
}

// Element j of an adjacent-pair rotation of x (pair j/2 turns by fp32(p)·ω). Accurate cosf/sinf: no intrinsics.
__device__ __forceinline__ float rope_element(float a, float b, int64_t j, int64_t position, const RopeTable& rope) {
  const float angle = static_cast<float>(position) * rope.inv_freq[j / 2];
  const float c = cosf(angle) * rope.magnitude, s = sinf(angle) * rope.magnitude;
  return (j % 2 == 0) ? a * c - b * s : a * s + b * c;
}

template <class T>
__global__ void finish_queries_kernel(QueryFinish p) {
  const int64_t n = blockIdx.x, dqk = p.d_nope + p.d_rope, width = p.heads * dqk;
  const float* src = p.q_f32 + n * width;
  T* q = static_cast<T*>(p.q) + n * width;
  const int64_t position = p.positions[n];
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    const int64_t h = e / dqk, j = e % dqk;
    auto value = [&](int64_t idx) { return round_to<T>(src[idx] + (p.bias ? p.bias[idx] : 0.f)); };
    if (j < p.d_nope) {
      q[e] = from_f32<T>(value(e));
    } else {
      const int64_t r = j - p.d_nope, pair = e - (r % 2);
      const T y = from_f32<T>(rope_element(value(pair), value(pair + 1), r, position, p.rope));
      q[e] = y;
      if (p.qa) static_cast<T*>(p.qa)[(n * p.heads + h) * p.row_width + p.d_c + r] = y;
    }
  }
}

// The same when the GEMM already wrote q rounded to T: only the rope dims change, one thread per pair (in place).
// The rotation angles depend on the position and the pair alone, so each block computes the token's cos/sin
// table once (accurate cosf/sinf, as rope_element) and rotates its share of every head's pairs with it:
// per-pair trigonometry and 64-bit index division made this one block per token take 14 us at decode.
constexpr int kRopeThreads = 256, kRopePairsPerBlock = 4 * kRopeThreads;
template <class T>
__global__ void __launch_bounds__(kRopeThreads) rope_queries_kernel(QueryFinish p) {
  extern __shared__ float table[];  // [half] cos · magnitude, then [half] sin · magnitude
  const int64_t n = blockIdx.x;
  const int dqk = static_cast<int>(p.d_nope + p.d_rope), half = static_cast<int>(p.d_rope / 2);
  const float position = static_cast<float>(p.positions[n]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = position * p.rope.inv_freq[i];
    table[i] = cosf(angle) * p.rope.magnitude;
    table[half + i] = sinf(angle) * p.rope.magnitude;
  }
  __syncthreads();
  T* q = static_cast<T*>(p.q) + n * p.heads * dqk;
  const int pairs = static_cast<int>(p.heads) * half, first = blockIdx.y * kRopePairsPerBlock;
  for (int e = first + threadIdx.x; e < min(pairs, first + kRopePairsPerBlock); e += blockDim.x) {
    const int h = e / half, i = e % half;
    T* x = q + h * dqk + p.d_nope + 2 * i;
    const float a = to_f32<T>(x[0]), b = to_f32<T>(x[1]), c = table[i], sn = table[half + i];
    const T y0 = from_f32<T>(a * c - b * sn), y1 = from_f32<T>(a * sn + b * c);
    x[0] = y0, x[1] = y1;
    if (p.qa) {
      T* tail = static_cast<T*>(p.qa) + (n * p.heads + h) * p.row_width + p.d_c + 2 * i;
      tail[0] = y0, tail[1] = y1;
    }
  }
}

// Token blockIdx.x's projected latent row (+ bias) and its RMSNorm statistics, shared by both cache writers.
struct LatentRowNorm {
  const float* kv;
  const float* bias;
  float ss, inv;  // sum of squares of the d_c latent values, 1 / sqrt(mean + eps)
  __device__ float value(int64_t j) const { return kv[j] + (bias ? bias[j] : 0.f); }
};
__device__ __forceinline__ LatentRowNorm latent_row_norm(const LatentStore& p, float* scratch) {
  LatentRowNorm r{p.kv + int64_t{blockIdx.x} * p.ld_kv, p.bias, 0.f, 0.f};
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < p.d_c; j += blockDim.x) ss += r.value(j) * r.value(j);
  r.ss = block_sum(ss, scratch);
  r.inv = 1.0f / sqrtf(r.ss / static_cast<float>(p.d_c) + p.eps);
  return r;
}

template <class T>
__global__ void store_latents_kernel(LatentStore p) {
  __shared__ float scratch[32];
  if (*p.error_flag != ~0ull) return;  // a non-finite input: the cache must stay as it was
  const int64_t n = blockIdx.x, W = p.d_c + p.d_rope;
  const LatentRowNorm norm = latent_row_norm(p, scratch);
  auto value = [&](int64_t j) { return norm.value(j); };
  const float ss = norm.ss, inv = norm.inv;
  const int64_t position = p.positions[n];
  auto element = [&](int64_t j) {
    if (j < p.d_c) return p.gamma[j] * (value(j) * inv);
    const int64_t r = j - p.d_c, pair = j - (r % 2);
    return rope_element(value(pair), value(pair + 1), r, position, p.rope);
  };
  // Finite hidden states can still overflow the projections: such a row is refused, not stored (checked as
  // stored, after rounding to T; the norm's sum of squares too, since an infinite one turns every value into 0).
  bool bad = !isfinite(ss);
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) bad |= !isfinite(to_f32<T>(from_f32<T>(element(j))));
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) atomicMin(p.error_flag, kBadLatentRow | static_cast<unsigned long long>(n));
    return;
  }
  T* row = static_cast<T*>(p.cache) + p.slots[n] * W;
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) row[j] = from_f32<T>(element(j));
}

// The fp8 twin of store_latents_kernel: the same row values, quantised per 128-group (fp8_row.cuh). Refused as
// the bf16 path refuses: any non-finite latent value or bf16 rope value flags the row and nothing is written.
__global__ void store_latents_fp8_kernel(LatentStore p) {
  __shared__ float scratch[32];
  if (*p.error_flag != ~0ull) return;
  const int64_t n = blockIdx.x;
  const LatentRowNorm norm = latent_row_norm(p, scratch);
  auto value = [&](int64_t j) { return norm.value(j); };
  const float ss = norm.ss, inv = norm.inv;
  const int64_t position = p.positions[n];
  auto latent = [&](int64_t j) { return p.gamma[j] * (value(j) * inv); };
  auto rope = [&](int64_t r) {
    const int64_t pair = p.d_c + r - (r % 2);
    return rope_element(value(pair), value(pair + 1), r, position, p.rope);
  };
  bool bad = !isfinite(ss);
  for (int64_t j = threadIdx.x; j < p.d_c; j += blockDim.x) bad |= !isfinite(latent(j));
  for (int64_t r = threadIdx.x; r < p.d_rope; r += blockDim.x) bad |= !isfinite(round_to<bf16>(rope(r)));
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) atomicMin(p.error_flag, kBadLatentRow | static_cast<unsigned long long>(n));
    return;
  }
  auto* row = static_cast<uint8_t*>(p.cache) + p.slots[n] * p.fp8.bytes;
  for (int g = 0; g * 128 < p.fp8.latent; ++g) {
    const int j0 = 128 * g, j1 = min(p.fp8.latent, j0 + 128);
    float amax = 0.f;
    for (int j = j0 + static_cast<int>(threadIdx.x); j < j1; j += blockDim.x) amax = fmaxf(amax, fabsf(latent(j)));
    amax = fmaxf(0.f, block_max(amax, scratch));
    const float scale = __fdiv_rn(amax, 448.0f);
    for (int j = j0 + static_cast<int>(threadIdx.x); j < j1; j += blockDim.x)
      row[j] = scale != 0.f ? fp8_quantize(latent(j), scale) : 0;
    if (threadIdx.x == 0) *reinterpret_cast<float*>(row + p.fp8.scale_offset + 4 * g) = scale;
  }
  auto* rope_out = reinterpret_cast<bf16*>(row + p.fp8.rope_offset);
  for (int r = threadIdx.x; r < p.fp8.rope; r += blockDim.x) rope_out[r] = __float2bfloat16_rn(rope(r));
  // Padding: after the latent values, and after the rope values.
  for (int j = p.fp8.latent + static_cast<int>(threadIdx.x); j < p.fp8.scale_offset; j += blockDim.x) row[j] = 0;
  for (int j = p.fp8.rope_offset + 2 * p.fp8.rope + static_cast<int>(threadIdx.x); j < p.fp8.bytes; j += blockDim.x)
    row[j] = 0;
}

// Rows of an fp8 cache, dequantised into bf16 [rows, latent + rope].
__global__ void gather_fp8_rows_kernel(const uint8_t* __restrict__ cache, const int32_t* __restrict__ block_table,
                                       int64_t page_size, Fp8Row f, bf16* __restrict__ dst) {
  const int64_t t = blockIdx.x;
  const int64_t slot = int64_t{block_table[t / page_size]} * page_size + t % page_size;
  const uint8_t* row = cache + slot * f.bytes;
  const auto* scales = reinterpret_cast<const float*>(row + f.scale_offset);
  const auto* rope = reinterpret_cast<const bf16*>(row + f.rope_offset);
  bf16* out = dst + t * (f.latent + f.rope);
  for (int j = threadIdx.x; j < f.latent; j += blockDim.x)
    out[j] = __float2bfloat16_rn(fp8_dequantize_f32(row[j], scales[j / 128]));
  for (int r = threadIdx.x; r < f.rope; r += blockDim.x) out[f.latent + r] = rope[r];
}

template <class T>
__global__ void gather_rows_kernel(const T* __restrict__ cache, const int32_t* __restrict__ block_table,
                                   int64_t page_size, int64_t width, T* __restrict__ dst) {
  const int64_t t = blockIdx.x;
  const int64_t slot = int64_t{block_table[t / page_size]} * page_size + t % page_size;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) dst[t * width + j] = cache[slot * width + j];
}

template <class T>
__global__ void split_expanded_kernel(const T* __restrict__ kv, const T* __restrict__ lat, int64_t width, int64_t d_c,
                                      int64_t heads, int64_t d_nope, int64_t d_rope, int64_t d_v, T* __restrict__ k,
                                      T* __restrict__ v) {
  const int64_t t = blockIdx.x, dqk = d_nope + d_rope, dkv = d_nope + d_v;
  for (int64_t e = threadIdx.x; e < heads * dqk; e += blockDim.x) {
    const int64_t h = e / dqk, j = e % dqk;
    k[t * heads * dqk + e] = j < d_nope ? kv[(t * heads + h) * dkv + j] : lat[t * width + d_c + (j - d_nope)];
  }
  for (int64_t e = threadIdx.x; e < heads * d_v; e += blockDim.x) {
    const int64_t h = e / d_v, j = e % d_v;
    v[t * heads * d_v + e] = kv[(t * heads + h) * dkv + d_nope + j];
  }
}

// Columns across blockIdx.x, rows across blockIdx.y (strided past 65535): no 64-bit division per element, and a
// decode step's single row still spreads over n / 256 blocks.
__global__ void commit_rows_kernel(const float* __restrict__ y, const float* __restrict__ bias,
                                   const unsigned long long* __restrict__ error_flag, int64_t rows, int64_t n,
                                   float* __restrict__ out) {
  if (*error_flag != ~0ull) return;  // a non-finite input: the caller's output must stay as it was
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= n) return;
  const float b = bias ? bias[j] : 0.f;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) out[r * n + j] = bias ? y[r * n + j] + b : y[r * n + j];
}

__global__ void check_rows_finite_kernel(const float* __restrict__ y, const float* __restrict__ bias, int64_t rows,
                                         int64_t n, unsigned long long* __restrict__ error_flag) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= n) return;
  const float b = bias ? bias[j] : 0.f;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
    if (!isfinite(y[r * n + j] + b)) atomicMin(error_flag, kBadOutputRow | static_cast<unsigned long long>(r));
}

unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65536));
}

}  // namespace

#define MLA_DISPATCH_TYPE(dtype, T, ...)                    \
  do {                                                      \
    if ((dtype) == DType::F32) {                            \
      using T = float;                                      \
      __VA_ARGS__;                                          \
    } else if ((dtype) == DType::BF16) {                    \
      using T = bf16;                                       \
      __VA_ARGS__;                                          \
    } else {                                                \
      throw InvalidArgument("cuda: element type must be F32 or BF16"); \
    }                                                       \
  } while (0)

void convert_checked(const float* in, void* out, DType dtype, int64_t n, unsigned long long* first_bad,
                     cudaStream_t stream) {
  if (n == 0) return;
  MLA_DISPATCH_TYPE(dtype, T, convert_checked_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(in, static_cast<T*>(out), n, first_bad));
  MLA_CUDA_LAUNCH_CHECK();
}

void rms_norm_rows(const float* in, int64_t ld_in, const float* bias, const float* gamma, float eps, int64_t rows,
                   int64_t d, void* out, DType dtype, cudaStream_t stream) {
  if (rows == 0) return;
  MLA_DISPATCH_TYPE(dtype, T, rms_norm_kernel<T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(in, ld_in, bias, gamma, eps, d, static_cast<T*>(out)));
  MLA_CUDA_LAUNCH_CHECK();
}

void finish_queries(const QueryFinish& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  if (!p.q_f32) {
    if (p.bias || p.d_rope % 2) throw InvalidArgument("finish_queries (cuda): in place needs no bias and an even d_rope");
    const int64_t pairs = p.heads * (p.d_rope / 2);
    const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>((pairs + kRopePairsPerBlock - 1) / kRopePairsPerBlock));
    const size_t table = static_cast<size_t>(p.d_rope) * sizeof(float);
    if (grid.y > 65535 || table > 48 * 1024) throw InvalidArgument("finish_queries (cuda): too many heads or rope dims");
    MLA_DISPATCH_TYPE(p.dtype, T, rope_queries_kernel<T><<<grid, kRopeThreads, table, stream>>>(p));
  } else {
    MLA_DISPATCH_TYPE(p.dtype, T, finish_queries_kernel<T><<<static_cast<unsigned>(p.tokens), 256, 0, stream>>>(p));
  }
  MLA_CUDA_LAUNCH_CHECK();
}

void store_latents(const LatentStore& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  if (p.dtype == DType::F8_E4M3) {
    store_latents_fp8_kernel<<<static_cast<unsigned>(p.tokens), 256, 0, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
    return;
  }
  MLA_DISPATCH_TYPE(p.dtype, T, store_latents_kernel<T><<<static_cast<unsigned>(p.tokens), 256, 0, stream>>>(p));
  MLA_CUDA_LAUNCH_CHECK();
}

void gather_rows(const void* cache, const int32_t* block_table, int64_t page_size, int64_t rows, int64_t width,
                 void* dst, DType dtype, cudaStream_t stream, DType cache_dtype, Fp8Row fp8) {
  if (rows == 0) return;
  if (cache_dtype == DType::F8_E4M3) {
    if (dtype != DType::BF16 || fp8.latent + fp8.rope != width)
      throw InvalidArgument("cuda: an fp8 cache is read into bf16 rows of its own width");
    gather_fp8_rows_kernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(
        static_cast<const uint8_t*>(cache), block_table, page_size, fp8, static_cast<bf16*>(dst));
    MLA_CUDA_LAUNCH_CHECK();
    return;
  }
  MLA_DISPATCH_TYPE(dtype, T, gather_rows_kernel<T><<<static_cast<unsigned>(rows), 128, 0, stream>>>(static_cast<const T*>(cache), block_table, page_size, width, static_cast<T*>(dst)));
  MLA_CUDA_LAUNCH_CHECK();
}

void split_expanded(const void* kv, const void* lat, int64_t width, int64_t d_c, int64_t rows, int64_t heads,
                    int64_t d_nope, int64_t d_rope, int64_t d_v, void* k, void* v, DType dtype, cudaStream_t stream) {
  if (rows == 0) return;
  MLA_DISPATCH_TYPE(dtype, T, split_expanded_kernel<T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(static_cast<const T*>(kv), static_cast<const T*>(lat), width, d_c, heads, d_nope, d_rope, d_v, static_cast<T*>(k), static_cast<T*>(v)));
  MLA_CUDA_LAUNCH_CHECK();
}

void check_rows_finite(const float* y, const float* bias, int64_t rows, int64_t n, unsigned long long* error_flag,
                       cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  const dim3 grid(static_cast<unsigned>((n + 255) / 256), static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  check_rows_finite_kernel<<<grid, 256, 0, stream>>>(y, bias, rows, n, error_flag);
  MLA_CUDA_LAUNCH_CHECK();
}

void commit_rows(const float* y, const float* bias, const unsigned long long* error_flag, int64_t rows, int64_t n,
                 float* out, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  const dim3 grid(static_cast<unsigned>((n + 255) / 256), static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  commit_rows_kernel<<<grid, 256, 0, stream>>>(y, bias, error_flag, rows, n, out);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda
