// merge_attention on the GPU (semantics: mla/ops.hpp MergeParams; the CPU loop in src/cpu/ops.cpp is the
// reference). Memory-bound: parts · rows · head_dim_v elements read once, rows · head_dim_v written once, so one
// block per query row, each thread a few columns; every thread recomputes the row's weights from the parts' lse
// (parts is the rank count, a handful of floats from L1) instead of sharing them through shared memory.
#include <cmath>
#include <limits>

#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/types.cuh"

namespace mla::cuda {
namespace {

constexpr int kMergeThreads = 128;

template <class T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(MergeParams p) {
  const int64_t rows = p.batch * p.s_q * p.h_q, row = blockIdx.x;
  // out row = (b, i, h); its lse sits at (b, h, i)
  const int64_t b = row / (p.s_q * p.h_q), i = row / p.h_q % p.s_q, h = row % p.h_q;
  const int64_t lse_at = (b * p.h_q + h) * p.s_q + i;
  const float* gLse = p.lse_parts + lse_at;  // [parts] with stride rows
  float m = -INFINITY;
  bool nan = false;
  for (int64_t k = 0; k < p.parts; ++k) {
    const float l = gLse[k * rows];
    nan |= isnan(l);
    if (isfinite(l)) m = fmaxf(m, l);
  }
  const int dv = static_cast<int>(p.head_dim_v);
  T* gOut = static_cast<T*>(p.out) + row * dv;  // [dv]
  if (nan || m == -INFINITY) {                  // NaN propagates; no part saw a key: out = 0, lse = +inf
    const float fill = nan ? NAN : 0.f;
    for (int j = threadIdx.x; j < dv; j += blockDim.x) gOut[j] = from_f32<T>(fill);
    if (p.lse && threadIdx.x == 0) p.lse[lse_at] = nan ? NAN : INFINITY;
    return;
  }
  float sum = 0.f;
  for (int64_t k = 0; k < p.parts; ++k) {
    const float l = gLse[k * rows];
    if (isfinite(l)) sum += expf(l - m);
  }
  const T* gParts = static_cast<const T*>(p.out_parts) + row * dv;  // [parts, dv] with stride rows · dv
  for (int j = threadIdx.x; j < dv; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < p.parts; ++k) {
      const float l = gLse[k * rows];
      if (isfinite(l)) acc += expf(l - m) * to_f32<T>(gParts[k * rows * dv + j]);  // parts that saw no key: not read
    }
    gOut[j] = from_f32<T>(acc / sum);
  }
  if (p.lse && threadIdx.x == 0) p.lse[lse_at] = m + logf(sum);
}

}  // namespace

void run_merge(const MergeParams& p, cudaStream_t stream) {
  if (p.dtype != DType::BF16 && p.dtype != DType::F32)
    throw InvalidArgument("merge_attention (cuda): dtype " + std::string(dtype_name(p.dtype)) +
                          " is not supported on this backend (BF16 or F32)");
  const int64_t rows = p.batch * p.s_q * p.h_q;
  if (rows > std::numeric_limits<int32_t>::max())
    throw InvalidArgument("merge_attention (cuda): batch · s_q · h_q = " + std::to_string(rows) +
                          " rows is more than one launch takes (2^31 - 1)");
  const dim3 grid(static_cast<unsigned>(rows));
  if (p.dtype == DType::F32)
    merge_kernel<float><<<grid, kMergeThreads, 0, stream>>>(p);
  else
    merge_kernel<bf16><<<grid, kMergeThreads, 0, stream>>>(p);
  MLA_CUDA_LAUNCH_CHECK();
}

}  // namespace mla::cuda
