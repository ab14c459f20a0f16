// The generic attention backward: prefill_attention_backward on "cuda" for what the sm80 bf16 192/128 kernels do
// not take (F32, any head dims). Plain fp32 dot products, P recomputed from the saved lse, nothing rounded before
// the gradients are written; slow but exact to fp32, like generic_prefill_kernel beside the fast forward.
// Per sequence, two launches on the stream:
//   dq:   one block per (query row, head): D_i = Σ_e d_out·out into the workspace, then over the keys it sees in
//         steps of 128 (one key per thread): dS_ij = P_ij (d_out_i·v_j − D_i); d_q_i = scale·Σ_j dS_ij k_j.
//   dkdv: one block per (key row, head), over the queries that see it: d_v_j = Σ_i P_ij d_out_i,
//         d_k_j = scale·Σ_i dS_ij q_i (reads D from the dq launch).
// Every row is written by one block, so there are no atomics and the result does not depend on scheduling.
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/types.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 128;  // keys (dq) or queries (dkdv) per step

// One sequence: rows [q0, q0 + n_q) and keys [k0, k0 + n_k) of the packed tensors.
struct Sequence {
  int64_t q0, k0;
  int n_q, n_k;
};

template <class T>
struct Rows {
  const PrefillBackwardParams& p;
  __device__ const T* q(int64_t i, int h) const { return static_cast<const T*>(p.q) + (i * p.num_heads + h) * p.head_dim_qk; }
  __device__ const T* k(int64_t t, int h) const { return static_cast<const T*>(p.k) + (t * p.num_heads + h) * p.head_dim_qk; }
  __device__ const T* v(int64_t t, int h) const { return static_cast<const T*>(p.v) + (t * p.num_heads + h) * p.head_dim_v; }
  __device__ const T* d_out(int64_t i, int h) const {
    return static_cast<const T*>(p.d_out) + (i * p.num_heads + h) * p.head_dim_v;
  }
};

template <class T>
__device__ float dot(const float* a, const T* b, int n) {
  float s = 0.f;
  for (int e = 0; e < n; ++e) s += a[e] * to_f32<T>(b[e]);
  return s;
}

// acc[e] += Σ_{j < n} w[j] · row(j)[e] for e < d, the block's threads striding over e.
template <class T, class Row>
__device__ void accumulate_rows(float* acc, int d, const float* w, int n, Row row) {
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    float a = acc[e];
    for (int j = 0; j < n; ++j) a += w[j] * to_f32<T>(row(j)[e]);
    acc[e] = a;
  }
}

template <class T>
__global__ void generic_dq_kernel(PrefillBackwardParams p, Sequence s, float* d_sum) {
  const int i = blockIdx.x, h = blockIdx.y, dqk = static_cast<int>(p.head_dim_qk), dv = static_cast<int>(p.head_dim_v);
  const int64_t row = s.q0 + i;
  const Rows<T> at{p};
  extern __shared__ float smem[];
  float* sq = smem;         // [dqk]
  float* sdo = sq + dqk;    // [dv]
  float* acc = sdo + dv;    // [dqk]
  float* sds = acc + dqk;   // [kThreads]
  __shared__ float scratch[32];
  const T* out = static_cast<const T*>(p.out) + (row * p.num_heads + h) * dv;
  float d_part = 0.f;
  for (int e = threadIdx.x; e < dqk; e += blockDim.x) sq[e] = to_f32<T>(at.q(row, h)[e]), acc[e] = 0.f;
  for (int e = threadIdx.x; e < dv; e += blockDim.x) {
    sdo[e] = to_f32<T>(at.d_out(row, h)[e]);
    d_part += sdo[e] * to_f32<T>(out[e]);
  }
  const float D = block_sum(d_part, scratch);  // synchronises, so sq and sdo are complete
  if (threadIdx.x == 0) d_sum[h * p.total_q + row] = D;
  const float lse = p.lse[h * p.total_q + row];
  const int limit = !isfinite(lse) ? 0 : p.causal ? std::clamp(s.n_k - s.n_q + i + 1, 0, s.n_k) : s.n_k;
  for (int t0 = 0; t0 < limit; t0 += kThreads) {
    const int t = t0 + threadIdx.x, n = min(kThreads, limit - t0);
    float ds = 0.f;
    if (t < limit) {
      const float pr = expf(p.softmax_scale * dot(sq, at.k(s.k0 + t, h), dqk) - lse);
      ds = pr * (dot(sdo, at.v(s.k0 + t, h), dv) - D);
    }
    sds[threadIdx.x] = ds;
    __syncthreads();
    accumulate_rows<T>(acc, dqk, sds, n, [&](int j) { return at.k(s.k0 + t0 + j, h); });
    __syncthreads();
  }
  T* dq = static_cast<T*>(p.d_q) + (row * p.num_heads + h) * dqk;
  for (int e = threadIdx.x; e < dqk; e += blockDim.x) dq[e] = from_f32<T>(p.softmax_scale * acc[e]);
}

template <class T>
__global__ void generic_dkdv_kernel(PrefillBackwardParams p, Sequence s, const float* d_sum) {
  const int t = blockIdx.x, h = blockIdx.y, dqk = static_cast<int>(p.head_dim_qk), dv = static_cast<int>(p.head_dim_v);
  const int64_t key = s.k0 + t;
  const Rows<T> at{p};
  extern __shared__ float smem[];
  float* sk = smem;            // [dqk]
  float* sv = sk + dqk;        // [dv]
  float* acc_k = sv + dv;      // [dqk]
  float* acc_v = acc_k + dqk;  // [dv]
  float* sp = acc_v + dv;      // [kThreads]
  float* sds = sp + kThreads;  // [kThreads]
  for (int e = threadIdx.x; e < dqk; e += blockDim.x) sk[e] = to_f32<T>(at.k(key, h)[e]), acc_k[e] = 0.f;
  for (int e = threadIdx.x; e < dv; e += blockDim.x) sv[e] = to_f32<T>(at.v(key, h)[e]), acc_v[e] = 0.f;
  __syncthreads();
  // Query i sees key t when t <= n_k - n_q + i (causal, bottom-right aligned).
  const int first = p.causal ? std::clamp(t - (s.n_k - s.n_q), 0, s.n_q) : 0;
  for (int i0 = first; i0 < s.n_q; i0 += kThreads) {
    const int i = i0 + threadIdx.x, n = min(kThreads, s.n_q - i0);
    float pr = 0.f, ds = 0.f;
    if (i < s.n_q) {
      const int64_t row = s.q0 + i;
      const float lse = p.lse[h * p.total_q + row];
      if (isfinite(lse)) {
        pr = expf(p.softmax_scale * dot(sk, at.q(row, h), dqk) - lse);
        ds = pr * (dot(sv, at.d_out(row, h), dv) - d_sum[h * p.total_q + row]);
      }
    }
    sp[threadIdx.x] = pr, sds[threadIdx.x] = ds;
    __syncthreads();
    accumulate_rows<T>(acc_v, dv, sp, n, [&](int j) { return at.d_out(s.q0 + i0 + j, h); });
    accumulate_rows<T>(acc_k, dqk, sds, n, [&](int j) { return at.q(s.q0 + i0 + j, h); });
    __syncthreads();
  }
  T* dk = static_cast<T*>(p.d_k) + (key * p.num_heads + h) * dqk;
  T* dvo = static_cast<T*>(p.d_v) + (key * p.num_heads + h) * dv;
  for (int e = threadIdx.x; e < dqk; e += blockDim.x) dk[e] = from_f32<T>(p.softmax_scale * acc_k[e]);
  for (int e = threadIdx.x; e < dv; e += blockDim.x) dvo[e] = from_f32<T>(acc_v[e]);
}

template <class T>
void launch(const PrefillBackwardParams& p, float* d_sum, cudaStream_t stream) {
  const size_t dq_smem = static_cast<size_t>(2 * p.head_dim_qk + p.head_dim_v + kThreads) * sizeof(float);
  const size_t dkdv_smem = static_cast<size_t>(2 * (p.head_dim_qk + p.head_dim_v + kThreads)) * sizeof(float);
  for (int64_t b = 0; b < p.batch; ++b) {
    Sequence s{p.cu_seqlens_q[b], p.cu_seqlens_k[b], 0, 0};
    s.n_q = static_cast<int>(p.cu_seqlens_q[b + 1] - s.q0), s.n_k = static_cast<int>(p.cu_seqlens_k[b + 1] - s.k0);
    const auto heads = static_cast<unsigned>(p.num_heads);
    if (s.n_q > 0) {
      generic_dq_kernel<T><<<dim3(static_cast<unsigned>(s.n_q), heads), kThreads, dq_smem, stream>>>(p, s, d_sum);
      MLA_CUDA_LAUNCH_CHECK();
    }
    if (s.n_k > 0) {  // keys no query sees still get their zero gradients here
      generic_dkdv_kernel<T><<<dim3(static_cast<unsigned>(s.n_k), heads), kThreads, dkdv_smem, stream>>>(p, s, d_sum);
      MLA_CUDA_LAUNCH_CHECK();
    }
  }
}

}  // namespace

void run_generic_prefill_backward(const PrefillBackwardParams& p, cudaStream_t stream) {
  const int64_t floats = 2 * (p.head_dim_qk + p.head_dim_v + kThreads);
  if (floats * 4 > 48 * 1024)
    throw InvalidArgument("prefill_attention_backward (cuda): head_dim_qk " + std::to_string(p.head_dim_qk) +
                          " + head_dim_v " + std::to_string(p.head_dim_v) + " is too large for the generic kernels");
  if (p.num_heads > 65535)
    throw InvalidArgument("prefill_attention_backward (cuda): num_heads must be <= 65535, got " +
                          std::to_string(p.num_heads));
  auto* d_sum = static_cast<float*>(p.workspace);  // [num_heads, total_q]
  if (p.dtype == DType::F32) launch<float>(p, d_sum, stream);
  else launch<bf16>(p, d_sum, stream);
}

}  // namespace mla::cuda
