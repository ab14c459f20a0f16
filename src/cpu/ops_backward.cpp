// The backward of prefill_attention on the CPU (semantics in mla/ops.hpp and docs/ops.md), two ways:
//   prefill_attention_backward_reference: plain loops in double, one (sequence, head, query) at a time: the
//     reference every other path (the fast CPU one, CUDA) is tested against.
//   prefill_attention_backward: FlashAttention-2's backward per (sequence, head) over the OpenMP threads. The
//     task's q, k, v, d_out are widened to f32 once; per query tile of kQueryTile rows the logits over the keys
//     the tile sees are one GEMM, P = exp(scale·s − lse) is recomputed from forward's log-sum-exp, and dQ (written),
//     dK, dV (accumulated over the tiles in f32) are GEMMs. A task owns its head's rows of every output, so no
//     atomics; the scratch is a few [kQueryTile, n_k] buffers per thread, never [n_q, n_k].
// Parameters were validated by src/core/ops.cpp (dtype BF16 or F32).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/ops.hpp"
#include "mla/dtype.hpp"

namespace mla::cpu {
namespace {

constexpr int64_t kQueryTile = 64;

// Element i of a BF16 or F32 array.
double element(const void* x, DType dt, int64_t i) {
  return dt == DType::F32 ? static_cast<const float*>(x)[i] : bf16_to_float(static_cast<const uint16_t*>(x)[i]);
}

void store(float v, DType dt, void* dst, int64_t i) {
  if (dt == DType::F32) static_cast<float*>(dst)[i] = v;
  else static_cast<uint16_t*>(dst)[i] = float_to_bf16(v);
}

// Rows first .. first + n of head h of a [tokens, H, d] tensor, as f32 [n, d].
void load_rows(const void* src, DType dt, int64_t first, int64_t n, int64_t H, int64_t h, int64_t d, float* dst) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < d; ++e) dst[t * d + e] = static_cast<float>(element(src, dt, ((first + t) * H + h) * d + e));
}

void store_rows(const float* x, int64_t first, int64_t n, int64_t H, int64_t h, int64_t d, DType dt, void* dst) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < d; ++e) store(x[t * d + e], dt, dst, ((first + t) * H + h) * d + e);
}

// Keys query i (of n_q, over n_k keys) sees: t < visible (bottom-right causal).
int64_t visible(const PrefillBackwardParams& p, int64_t i, int64_t n_q, int64_t n_k) {
  return p.causal ? std::clamp<int64_t>(n_k - n_q + i + 1, 0, n_k) : n_k;
}

}  // namespace

void prefill_attention_backward_reference(const PrefillBackwardParams& p) {
  const int64_t H = p.num_heads, dqk = p.head_dim_qk, dv = p.head_dim_v;
  const double scale = p.softmax_scale;
  std::vector<double> dq(static_cast<size_t>(dqk)), dk(static_cast<size_t>(p.total_k * H * dqk)),
      dvv(static_cast<size_t>(p.total_k * H * dv)), prob, dp;
  const auto q = [&](int64_t i, int64_t h, int64_t e) { return element(p.q, p.dtype, (i * H + h) * dqk + e); };
  const auto k = [&](int64_t t, int64_t h, int64_t e) { return element(p.k, p.dtype, (t * H + h) * dqk + e); };
  const auto v = [&](int64_t t, int64_t h, int64_t e) { return element(p.v, p.dtype, (t * H + h) * dv + e); };
  const auto d_o = [&](int64_t i, int64_t h, int64_t e) { return element(p.d_out, p.dtype, (i * H + h) * dv + e); };
  const auto o = [&](int64_t i, int64_t h, int64_t e) { return element(p.out, p.dtype, (i * H + h) * dv + e); };
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q0 = p.cu_seqlens_q[b], n_q = p.cu_seqlens_q[b + 1] - q0;
    const int64_t k0 = p.cu_seqlens_k[b], n_k = p.cu_seqlens_k[b + 1] - k0;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < n_q; ++r) {
        const int64_t i = q0 + r, n = visible(p, r, n_q, n_k);
        const double lse = p.lse[h * p.total_q + i];
        std::fill(dq.begin(), dq.end(), 0.0);
        if (n > 0 && std::isfinite(lse)) {  // lse = +inf: the row saw no key
          prob.assign(static_cast<size_t>(n), 0.0);
          dp.assign(static_cast<size_t>(n), 0.0);
          double delta = 0.0;  // D_i = dO_i · O_i
          for (int64_t e = 0; e < dv; ++e) delta += d_o(i, h, e) * o(i, h, e);
          for (int64_t j = 0; j < n; ++j) {
            double s = 0.0, g = 0.0;
            for (int64_t e = 0; e < dqk; ++e) s += q(i, h, e) * k(k0 + j, h, e);
            for (int64_t e = 0; e < dv; ++e) g += d_o(i, h, e) * v(k0 + j, h, e);
            prob[j] = std::exp(scale * s - lse);
            dp[j] = g;
          }
          for (int64_t j = 0; j < n; ++j) {
            const double ds = prob[j] * (dp[j] - delta);  // dL/ds_ij before the scale
            const int64_t t = k0 + j;
            for (int64_t e = 0; e < dqk; ++e) {
              dq[e] += scale * ds * k(t, h, e);
              dk[(t * H + h) * dqk + e] += scale * ds * q(i, h, e);
            }
            for (int64_t e = 0; e < dv; ++e) dvv[(t * H + h) * dv + e] += prob[j] * d_o(i, h, e);
          }
        }
        for (int64_t e = 0; e < dqk; ++e) store(static_cast<float>(dq[e]), p.dtype, p.d_q, (i * H + h) * dqk + e);
      }
  }
  for (int64_t x = 0; x < p.total_k * H * dqk; ++x) store(static_cast<float>(dk[x]), p.dtype, p.d_k, x);
  for (int64_t x = 0; x < p.total_k * H * dv; ++x) store(static_cast<float>(dvv[x]), p.dtype, p.d_v, x);
}

void prefill_attention_backward(const PrefillBackwardParams& p) {
  const int64_t H = p.num_heads, dqk = p.head_dim_qk, dv = p.head_dim_v;
  struct Task {
    int64_t b, h;
  };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.batch; ++b)
    if (p.cu_seqlens_q[b + 1] > p.cu_seqlens_q[b] || p.cu_seqlens_k[b + 1] > p.cu_seqlens_k[b])
      for (int64_t h = 0; h < H; ++h) tasks.push_back({b, h});

#pragma omp parallel
  {
    // Per thread, grown to the task's sequence: Q, dO [n_q, ·]; K, V, dK, dV [n_k, ·]; S, dP [kQueryTile, n_k].
    std::vector<float> Q, dO, K, V, dK, dV, S, dP, dQ(static_cast<size_t>(kQueryTile * dqk)), o(static_cast<size_t>(dv));
    std::vector<float> delta(kQueryTile);
#pragma omp for schedule(dynamic)
    for (size_t task = 0; task < tasks.size(); ++task) {
      const auto [b, h] = tasks[task];
      const int64_t q0 = p.cu_seqlens_q[b], n_q = p.cu_seqlens_q[b + 1] - q0;
      const int64_t k0 = p.cu_seqlens_k[b], n_k = p.cu_seqlens_k[b + 1] - k0;
      const auto size = [](int64_t n, int64_t d) { return static_cast<size_t>(n * d); };
      Q.resize(size(n_q, dqk)), dO.resize(size(n_q, dv)), K.resize(size(n_k, dqk)), V.resize(size(n_k, dv));
      S.resize(size(kQueryTile, n_k)), dP.resize(size(kQueryTile, n_k));
      dK.assign(size(n_k, dqk), 0.f), dV.assign(size(n_k, dv), 0.f);
      load_rows(p.q, p.dtype, q0, n_q, H, h, dqk, Q.data());
      load_rows(p.d_out, p.dtype, q0, n_q, H, h, dv, dO.data());
      load_rows(p.k, p.dtype, k0, n_k, H, h, dqk, K.data());
      load_rows(p.v, p.dtype, k0, n_k, H, h, dv, V.data());
      for (int64_t i0 = 0; i0 < n_q; i0 += kQueryTile) {
        const int64_t qt = std::min(kQueryTile, n_q - i0);
        const int64_t kn = visible(p, i0 + qt - 1, n_q, n_k);  // the tile's last row sees the most keys
        if (kn == 0) {
          std::fill(dQ.begin(), dQ.end(), 0.f);
          store_rows(dQ.data(), q0 + i0, qt, H, h, dqk, p.dtype, p.d_q);
          continue;
        }
        const float* Qt = &Q[i0 * dqk];   // [qt, d_qk]
        const float* dOt = &dO[i0 * dv];  // [qt, d_v]
        gemm_nt(qt, kn, dqk, Qt, dqk, K.data(), dqk, S.data(), kn);  // S [qt, kn] = Q·Kᵀ
        gemm_nt(qt, kn, dv, dOt, dv, V.data(), dv, dP.data(), kn);   // dP [qt, kn] = dO·Vᵀ
        for (int64_t r = 0; r < qt; ++r) {
          const int64_t i = q0 + i0 + r, n = visible(p, i0 + r, n_q, n_k);
          load_rows(p.out, p.dtype, i, 1, H, h, dv, o.data());
          float dot = 0.f;
          for (int64_t e = 0; e < dv; ++e) dot += dOt[r * dv + e] * o[e];
          delta[r] = dot;
          // P = exp(scale·s − lse): 0 past the mask and where lse = +inf (the row saw no key).
          const float lse = p.lse[h * p.total_q + i];
          float* pr = &S[r * kn];
          float* ds = &dP[r * kn];
          for (int64_t j = 0; j < kn; ++j) {
            pr[j] = j < n ? std::exp(p.softmax_scale * pr[j] - lse) : 0.f;
            ds[j] = p.softmax_scale * pr[j] * (ds[j] - delta[r]);  // dS, scale folded in
          }
        }
        // dQ [qt, d_qk] = dS·K (the tile sees all its keys at once: written); dK += dSᵀ·Q, dV += Pᵀ·dO.
        gemm_nn(qt, dqk, kn, dP.data(), kn, K.data(), dqk, dQ.data(), dqk);
        store_rows(dQ.data(), q0 + i0, qt, H, h, dqk, p.dtype, p.d_q);
        gemm_tn(kn, dqk, qt, dP.data(), kn, Qt, dqk, dK.data(), dqk, 1.f);
        gemm_tn(kn, dv, qt, S.data(), kn, dOt, dv, dV.data(), dv, 1.f);
      }
      store_rows(dK.data(), k0, n_k, H, h, dqk, p.dtype, p.d_k);
      store_rows(dV.data(), k0, n_k, H, h, dv, p.dtype, p.d_v);
    }
  }
}

}  // namespace mla::cpu
