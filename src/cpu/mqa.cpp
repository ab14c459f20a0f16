// mqa_block (kernels.hpp): one key block of MQA with the query rows as vector lanes, for the f32 operands of the
// f32 layer and of the bf16 layer without a native bf16 dot product (cache rows widened as they are gathered).
// Every query row (a head of a token) shares each key row, so a row of K·qᵀ for 16 heads is one vector: the
// logits are 16-wide FMAs of a broadcast cache element with a column of the transposed queries, the softmax runs
// across lanes, and P·V is 16-wide FMAs of a broadcast cache element with a row of P. No horizontal sums and no
// transposes inside the loops; both products run at the FMA rate (the library's GEMM reaches ~70% of it at
// M = 16). Scalar, AVX2 and AVX-512 versions below; the scalar one is the readable twin the tests compare.
#include <algorithm>
#include <cmath>
#include <limits>

// GCC 12 warns about its own AVX-512 reduction intrinsics; the warning is a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/kernels.hpp"
#include "mla/dtype.hpp"

#define MLA_AVX2 __attribute__((target("avx2,fma")))
#define MLA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace mla::cpu {
namespace {

constexpr int L = kMqaLanes;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- scalar: lane by lane, the semantics of online_softmax_step followed by acc = alpha·acc + P·V ----

void mqa_scalar(const MqaBlock& p) {
  for (int r = 0; r < L; ++r) {
    const int64_t vis = r < p.rows ? std::clamp<int64_t>(p.visible[r], 0, p.keys) : 0;
    if (vis == 0) continue;  // nothing visible: state unchanged
    float mx = p.m[r];
    for (int64_t t = 0; t < vis; ++t) {
      float dot = 0.f;
      for (int64_t k = 0; k < p.d; ++k) dot += p.qT[k * L + r] * p.kv[t * p.ld + k];
      p.s[t * L + r] = dot;
      mx = std::max(mx, p.scale * dot);
    }
    const float alpha = p.m[r] == -kInf ? 0.f : std::exp(p.m[r] - mx);
    float sum = 0.f;
    for (int64_t t = 0; t < vis; ++t) {
      const float e = std::exp(p.scale * p.s[t * L + r] - mx);
      sum += e;
      p.s[t * L + r] = p.round_p ? round_bf16(e) : e;
    }
    for (int64_t j = 0; j < p.dv; ++j) {
      float o = alpha * p.accT[j * L + r];
      for (int64_t t = 0; t < vis; ++t) o += p.s[t * L + r] * p.kv[t * p.ld + j];
      p.accT[j * L + r] = o;
    }
    p.l[r] = p.l[r] * alpha + sum;
    p.m[r] = mx;
  }
}

// ---- AVX-512: one zmm = the 16 lanes ----

MLA_AVX512 inline __m512 exp512(__m512 x) {  // as in kernels_avx512.cpp: x <= 0, ~2 ulp
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 k =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.9875691500e-4f);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.3981999507e-3f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(8.3334519073e-3f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(4.1665795894e-2f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.6666665459e-1f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(5.0000001201e-1f));
  e = _mm512_fmadd_ps(e, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(e, k);
}

// s[t0 + i] = Σ_k kv[t0 + i, k] · qT[k] for kKeys keys: kKeys independent accumulators hide the FMA latency.
template <int kKeys>
MLA_AVX512 inline void logits512(const MqaBlock& p, int64_t t0) {
  __m512 acc[kKeys];
  for (int i = 0; i < kKeys; ++i) acc[i] = _mm512_setzero_ps();
  const float* row = p.kv + t0 * p.ld;
  for (int64_t k = 0; k < p.d; ++k) {
    const __m512 q = _mm512_loadu_ps(p.qT + k * L);
    for (int i = 0; i < kKeys; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(row[i * p.ld + k]), q, acc[i]);
  }
  for (int i = 0; i < kKeys; ++i) _mm512_storeu_ps(p.s + (t0 + i) * L, acc[i]);
}

// accT[j0 + jj] = alpha · accT[j0 + jj] + Σ_t kv[t, j0 + jj] · P[t] for kCols value columns.
template <int kCols>
MLA_AVX512 inline void pv512(const MqaBlock& p, int64_t j0, __m512 alpha) {
  __m512 acc[kCols];
  for (int jj = 0; jj < kCols; ++jj) acc[jj] = _mm512_mul_ps(alpha, _mm512_loadu_ps(p.accT + (j0 + jj) * L));
  for (int64_t t = 0; t < p.keys; ++t) {
    const __m512 pt = _mm512_loadu_ps(p.s + t * L);
    const float* v = p.kv + t * p.ld + j0;
    _mm_prefetch(reinterpret_cast<const char*>(v + 8 * p.ld), _MM_HINT_T0);  // stride ld: missed by the hardware
    for (int jj = 0; jj < kCols; ++jj) acc[jj] = _mm512_fmadd_ps(_mm512_set1_ps(v[jj]), pt, acc[jj]);
  }
  for (int jj = 0; jj < kCols; ++jj) _mm512_storeu_ps(p.accT + (j0 + jj) * L, acc[jj]);
}

MLA_AVX512 void mqa_avx512(const MqaBlock& p) {
  const __mmask16 live = p.rows >= L ? __mmask16(0xffff) : static_cast<__mmask16>((1u << p.rows) - 1);
  const __m512i vis = _mm512_maskz_loadu_epi32(live, p.visible);  // lanes past `rows` see nothing
  int64_t t = 0;
  for (; t + 16 <= p.keys; t += 16) logits512<16>(p, t);
  for (; t + 8 <= p.keys; t += 8) logits512<8>(p, t);
  for (; t < p.keys; ++t) logits512<1>(p, t);

  const __m512 scale = _mm512_set1_ps(p.scale), m_old = _mm512_loadu_ps(p.m);
  __m512 mx = m_old;
  for (t = 0; t < p.keys; ++t) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(static_cast<int>(t)));
    mx = _mm512_mask_max_ps(mx, seen, mx, _mm512_mul_ps(scale, _mm512_loadu_ps(p.s + t * L)));
  }
  const __mmask16 fresh = _mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-kInf), _CMP_EQ_OQ);
  const __m512 alpha = _mm512_maskz_mov_ps(static_cast<__mmask16>(~fresh), exp512(_mm512_sub_ps(m_old, mx)));
  __m512 sum = _mm512_setzero_ps();
  for (t = 0; t < p.keys; ++t) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(static_cast<int>(t)));
    __m512 e = _mm512_maskz_mov_ps(seen, exp512(_mm512_fmsub_ps(scale, _mm512_loadu_ps(p.s + t * L), mx)));
    sum = _mm512_add_ps(sum, e);
    if (p.round_p) {  // to the nearest bf16, ties to even (e is finite, never NaN)
      const __m512i u = _mm512_castps_si512(e);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      e = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                               _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
    _mm512_storeu_ps(p.s + t * L, e);
  }
  // Lanes that saw nothing keep their state: alpha = 1 (m unchanged; alpha = 0 only when m was -inf, and then
  // acc and l are 0 anyway).
  int64_t j = 0;
  for (; j + 16 <= p.dv; j += 16) pv512<16>(p, j, alpha);
  for (; j < p.dv; ++j) pv512<1>(p, j, alpha);
  _mm512_storeu_ps(p.l, _mm512_fmadd_ps(_mm512_loadu_ps(p.l), alpha, sum));
  _mm512_storeu_ps(p.m, mx);
}

// ---- AVX2: the 16 lanes as two ymm halves ----

MLA_AVX2 inline __m256 exp256(__m256 x) {  // as in kernels_avx2.cpp
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 e = _mm256_set1_ps(1.9875691500e-4f);
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.3981999507e-3f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(8.3334519073e-3f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(4.1665795894e-2f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.6666665459e-1f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(5.0000001201e-1f));
  e = _mm256_fmadd_ps(e, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i b = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(b));
}

template <int kKeys>
MLA_AVX2 inline void logits256(const MqaBlock& p, int64_t t0) {
  __m256 lo[kKeys], hi[kKeys];
  for (int i = 0; i < kKeys; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  const float* row = p.kv + t0 * p.ld;
  for (int64_t k = 0; k < p.d; ++k) {
    const __m256 q0 = _mm256_loadu_ps(p.qT + k * L), q1 = _mm256_loadu_ps(p.qT + k * L + 8);
    for (int i = 0; i < kKeys; ++i) {
      const __m256 v = _mm256_broadcast_ss(row + i * p.ld + k);
      lo[i] = _mm256_fmadd_ps(v, q0, lo[i]);
      hi[i] = _mm256_fmadd_ps(v, q1, hi[i]);
    }
  }
  for (int i = 0; i < kKeys; ++i) {
    _mm256_storeu_ps(p.s + (t0 + i) * L, lo[i]);
    _mm256_storeu_ps(p.s + (t0 + i) * L + 8, hi[i]);
  }
}

template <int kCols>
MLA_AVX2 inline void pv256(const MqaBlock& p, int64_t j0, __m256 a0, __m256 a1) {
  __m256 lo[kCols], hi[kCols];
  for (int jj = 0; jj < kCols; ++jj) {
    lo[jj] = _mm256_mul_ps(a0, _mm256_loadu_ps(p.accT + (j0 + jj) * L));
    hi[jj] = _mm256_mul_ps(a1, _mm256_loadu_ps(p.accT + (j0 + jj) * L + 8));
  }
  for (int64_t t = 0; t < p.keys; ++t) {
    const __m256 p0 = _mm256_loadu_ps(p.s + t * L), p1 = _mm256_loadu_ps(p.s + t * L + 8);
    const float* v = p.kv + t * p.ld + j0;
    for (int jj = 0; jj < kCols; ++jj) {
      const __m256 b = _mm256_broadcast_ss(v + jj);
      lo[jj] = _mm256_fmadd_ps(b, p0, lo[jj]);
      hi[jj] = _mm256_fmadd_ps(b, p1, hi[jj]);
    }
  }
  for (int jj = 0; jj < kCols; ++jj) {
    _mm256_storeu_ps(p.accT + (j0 + jj) * L, lo[jj]);
    _mm256_storeu_ps(p.accT + (j0 + jj) * L + 8, hi[jj]);
  }
}

MLA_AVX2 void mqa_avx2(const MqaBlock& p) {
  alignas(32) int32_t vis_lanes[L];
  for (int r = 0; r < L; ++r) vis_lanes[r] = r < p.rows ? p.visible[r] : 0;
  const __m256i vis[2] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(vis_lanes)),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(vis_lanes + 8))};
  int64_t t = 0;
  for (; t + 4 <= p.keys; t += 4) logits256<4>(p, t);
  for (; t < p.keys; ++t) logits256<1>(p, t);

  const __m256 scale = _mm256_set1_ps(p.scale);
  __m256 alpha[2], mx[2], sum[2];
  for (int h = 0; h < 2; ++h) {
    const __m256 m_old = _mm256_loadu_ps(p.m + 8 * h);
    mx[h] = m_old;
    for (t = 0; t < p.keys; ++t) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis[h], _mm256_set1_epi32(static_cast<int>(t))));
      const __m256 x = _mm256_mul_ps(scale, _mm256_loadu_ps(p.s + t * L + 8 * h));
      mx[h] = _mm256_blendv_ps(mx[h], _mm256_max_ps(mx[h], x), seen);
    }
    const __m256 fresh = _mm256_cmp_ps(m_old, _mm256_set1_ps(-kInf), _CMP_EQ_OQ);
    alpha[h] = _mm256_andnot_ps(fresh, exp256(_mm256_sub_ps(m_old, mx[h])));
    sum[h] = _mm256_setzero_ps();
    for (t = 0; t < p.keys; ++t) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis[h], _mm256_set1_epi32(static_cast<int>(t))));
      float* st = p.s + t * L + 8 * h;
      __m256 e = _mm256_and_ps(seen, exp256(_mm256_fmsub_ps(scale, _mm256_loadu_ps(st), mx[h])));
      sum[h] = _mm256_add_ps(sum[h], e);
      if (p.round_p) {
        const __m256i u = _mm256_castps_si256(e);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        e = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                                 _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
      }
      _mm256_storeu_ps(st, e);
    }
  }
  int64_t j = 0;
  for (; j + 4 <= p.dv; j += 4) pv256<4>(p, j, alpha[0], alpha[1]);
  for (; j < p.dv; ++j) pv256<1>(p, j, alpha[0], alpha[1]);
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_ps(p.l + 8 * h, _mm256_fmadd_ps(_mm256_loadu_ps(p.l + 8 * h), alpha[h], sum[h]));
    _mm256_storeu_ps(p.m + 8 * h, mx[h]);
  }
}

}  // namespace

void mqa_block(const MqaBlock& p) {
  if (p.keys <= 0) return;
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return mqa_avx512(p);
    case Isa::Avx2: return mqa_avx2(p);
    case Isa::Scalar: return mqa_scalar(p);
  }
}

}  // namespace mla::cpu
