// mqa_block and mqa_pack (kernels.hpp): MQA with the query rows as vector lanes, for the f32 operands of the f32
// layer and of the bf16 layer without a native bf16 dot product.
//
// Every query row (a head of a token) shares each key row, so a row of K·qᵀ for 16 heads is one vector: the
// logits are 16-wide FMAs of a broadcast cache element with a column of the transposed queries, the softmax runs
// across lanes, and P·V is 16-wide FMAs of a broadcast cache element with a row of P. No horizontal sums. The
// cache rows come packed in panels of 16 keys ([d, 16] each, widened from bf16 on the way), so that all the
// broadcasts of a tile are constant offsets from one pointer walking one contiguous stream: 16 separate row
// streams cost the kernel a third of its speed in register pressure and missed prefetches. Scalar, AVX2 and
// AVX-512 versions; the scalar ones are the readable twins the tests compare.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// GCC 12 warns about its own AVX-512 reduction intrinsics; the warning is a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#ifndef __clang__  // clang has no -Wmaybe-uninitialized and would warn about the unknown name
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "cpu/kernels.hpp"
#include "mla/dtype.hpp"

#define MLA_AVX2 __attribute__((target("avx2,fma")))
#define MLA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace mla::cpu {
namespace {

constexpr int L = kMqaLanes;  // lanes = query rows = keys per panel
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kLogitsK = 128;  // k per pass of the logits: 8 KB of qT

// Element k of key t in the panel layout.
inline int64_t at(int64_t t, int64_t k, int64_t d) { return ((t / L) * d + k) * L + t % L; }

// ---- scalar: lane by lane, the semantics of online_softmax_step followed by acc = alpha·acc + P·V ----

void mqa_scalar(const MqaBlock& p) {
  for (int r = 0; r < L; ++r) {
    const int64_t vis = r < p.rows ? std::clamp<int64_t>(p.visible[r], 0, p.keys) : 0;
    if (vis == 0) continue;  // nothing visible: state unchanged
    float mx = p.m[r];
    for (int64_t t = 0; t < vis; ++t) {
      float dot = 0.f;
      for (int64_t k = 0; k < p.d; ++k) dot += p.qT[k * L + r] * p.kv[at(t, k, p.d)];
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
      for (int64_t t = 0; t < vis; ++t) o += p.s[t * L + r] * p.kv[at(t, j, p.d)];
      p.accT[j * L + r] = o;
    }
    p.l[r] = p.l[r] * alpha + sum;
    p.m[r] = mx;
  }
}

template <class T>
void pack_scalar(const T* const* rows, int n, int64_t d, float* panel) {
  for (int64_t k = 0; k < d; ++k)
    for (int i = 0; i < L; ++i) {
      float v = 0.f;
      if (i < n) {
        if constexpr (std::is_same_v<T, uint16_t>) v = bf16_to_float(rows[i][k]);
        else v = rows[i][k];
      }
      panel[k * L + i] = v;
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

// s[16 keys of panel pn] (+)= the panel · qT over k in [k0, k1): per k one load of qT[k] and 16 broadcasts from
// one 64-byte line.
MLA_AVX512 inline void logits512(const MqaBlock& p, int64_t pn, int64_t k0, int64_t k1) {
  __m512 acc[L];
  float* s = p.s + pn * L * L;
  for (int i = 0; i < L; ++i) acc[i] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(s + i * L);
  const float* kv = p.kv + (pn * p.d + k0) * L;
  for (int64_t k = k0; k < k1; ++k, kv += L) {
    const __m512 q = _mm512_loadu_ps(p.qT + k * L);
    for (int i = 0; i < L; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(kv[i]), q, acc[i]);
  }
  for (int i = 0; i < L; ++i) _mm512_storeu_ps(s + i * L, acc[i]);
}

// accT[j0, j0 + 16) = alpha · accT + Σ_t kv[t, j] · P[t]: per key 16 broadcasts at a stride of one line.
MLA_AVX512 inline void pv512(const MqaBlock& p, int64_t j0, int64_t panels, __m512 alpha) {
  __m512 acc[L];
  for (int jj = 0; jj < L; ++jj) acc[jj] = _mm512_mul_ps(alpha, _mm512_loadu_ps(p.accT + (j0 + jj) * L));
  for (int64_t pn = 0; pn < panels; ++pn) {
    const float* kv = p.kv + (pn * p.d + j0) * L;
    for (int i = 0; i < L; ++i) {
      const __m512 pt = _mm512_loadu_ps(p.s + (pn * L + i) * L);
      for (int jj = 0; jj < L; ++jj) acc[jj] = _mm512_fmadd_ps(_mm512_set1_ps(kv[jj * L + i]), pt, acc[jj]);
    }
  }
  for (int jj = 0; jj < L; ++jj) _mm512_storeu_ps(p.accT + (j0 + jj) * L, acc[jj]);
}

// The same for one value column (dv % 16 tail).
MLA_AVX512 inline void pv512_one(const MqaBlock& p, int64_t j, int64_t panels, __m512 alpha) {
  __m512 acc = _mm512_mul_ps(alpha, _mm512_loadu_ps(p.accT + j * L));
  for (int64_t t = 0; t < panels * L; ++t)
    acc = _mm512_fmadd_ps(_mm512_set1_ps(p.kv[at(t, j, p.d)]), _mm512_loadu_ps(p.s + t * L), acc);
  _mm512_storeu_ps(p.accT + j * L, acc);
}

MLA_AVX512 void mqa_avx512(const MqaBlock& p) {
  const __mmask16 live = p.rows >= L ? __mmask16(0xffff) : static_cast<__mmask16>((1u << p.rows) - 1);
  // Lanes past `rows` see nothing, and no lane sees the panel padding past `keys`.
  const __m512i vis = _mm512_min_epi32(_mm512_maskz_loadu_epi32(live, p.visible),
                                       _mm512_set1_epi32(static_cast<int>(p.keys)));
  const int64_t panels = (p.keys + L - 1) / L;
  for (int64_t k0 = 0; k0 < p.d; k0 += kLogitsK)  // a slice of qT stays in L1 while every panel passes
    for (int64_t pn = 0; pn < panels; ++pn) logits512(p, pn, k0, std::min(p.d, k0 + kLogitsK));

  const __m512 scale = _mm512_set1_ps(p.scale), m_old = _mm512_loadu_ps(p.m);
  __m512 mx = m_old;
  for (int64_t t = 0; t < p.keys; ++t) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(static_cast<int>(t)));
    mx = _mm512_mask_max_ps(mx, seen, mx, _mm512_mul_ps(scale, _mm512_loadu_ps(p.s + t * L)));
  }
  const __mmask16 fresh = _mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-kInf), _CMP_EQ_OQ);
  const __m512 alpha = _mm512_maskz_mov_ps(static_cast<__mmask16>(~fresh), exp512(_mm512_sub_ps(m_old, mx)));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < panels * L; ++t) {
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
  for (; j + L <= p.dv; j += L) pv512(p, j, panels, alpha);
  for (; j < p.dv; ++j) pv512_one(p, j, panels, alpha);
  _mm512_storeu_ps(p.l, _mm512_fmadd_ps(_mm512_loadu_ps(p.l), alpha, sum));
  _mm512_storeu_ps(p.m, mx);
}

// 16 x 16 floats: rows r[i] in, columns out (r[k] = element k of every row).
MLA_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
      r[i + 2 * j + 1] =
          _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

template <class T>
MLA_AVX512 void pack_avx512(const T* const* rows, int n, int64_t d, float* panel) {
  for (int64_t k0 = 0; k0 < d; k0 += L) {
    const __mmask16 km = d - k0 >= L ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (d - k0)) - 1);
    __m512 r[L];
    for (int i = 0; i < L; ++i) {
      if (i >= n) {
        r[i] = _mm512_setzero_ps();
      } else if constexpr (std::is_same_v<T, uint16_t>) {
        const __m256i h = _mm256_maskz_loadu_epi16(km, rows[i] + k0);
        r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        r[i] = _mm512_maskz_loadu_ps(km, rows[i] + k0);
      }
    }
    transpose16(r);  // the lane order of the shuffles: r[c] holds element k0 + c of the 16 rows
    for (int c = 0; c < L && k0 + c < d; ++c) _mm512_storeu_ps(panel + (k0 + c) * L, r[c]);
  }
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

// Keys i0 .. i0 + 4 of panel pn (4 keys x 2 halves = 8 accumulators of the 16 ymm registers).
MLA_AVX2 inline void logits256(const MqaBlock& p, int64_t pn, int i0) {
  __m256 lo[4], hi[4];
  for (int i = 0; i < 4; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  const float* kv = p.kv + pn * p.d * L + i0;
  for (int64_t k = 0; k < p.d; ++k, kv += L) {
    const __m256 q0 = _mm256_loadu_ps(p.qT + k * L), q1 = _mm256_loadu_ps(p.qT + k * L + 8);
    for (int i = 0; i < 4; ++i) {
      const __m256 v = _mm256_broadcast_ss(kv + i);
      lo[i] = _mm256_fmadd_ps(v, q0, lo[i]);
      hi[i] = _mm256_fmadd_ps(v, q1, hi[i]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(p.s + (pn * L + i0 + i) * L, lo[i]);
    _mm256_storeu_ps(p.s + (pn * L + i0 + i) * L + 8, hi[i]);
  }
}

// kCols value columns from j0 (4, or 1 for the dv % 4 tail).
template <int kCols>
MLA_AVX2 inline void pv256(const MqaBlock& p, int64_t j0, int64_t panels, __m256 a0, __m256 a1) {
  __m256 lo[kCols], hi[kCols];
  for (int jj = 0; jj < kCols; ++jj) {
    lo[jj] = _mm256_mul_ps(a0, _mm256_loadu_ps(p.accT + (j0 + jj) * L));
    hi[jj] = _mm256_mul_ps(a1, _mm256_loadu_ps(p.accT + (j0 + jj) * L + 8));
  }
  for (int64_t pn = 0; pn < panels; ++pn) {
    const float* kv = p.kv + (pn * p.d + j0) * L;
    for (int i = 0; i < L; ++i) {
      const float* st = p.s + (pn * L + i) * L;
      const __m256 p0 = _mm256_loadu_ps(st), p1 = _mm256_loadu_ps(st + 8);
      for (int jj = 0; jj < kCols; ++jj) {
        const __m256 b = _mm256_broadcast_ss(kv + jj * L + i);
        lo[jj] = _mm256_fmadd_ps(b, p0, lo[jj]);
        hi[jj] = _mm256_fmadd_ps(b, p1, hi[jj]);
      }
    }
  }
  for (int jj = 0; jj < kCols; ++jj) {
    _mm256_storeu_ps(p.accT + (j0 + jj) * L, lo[jj]);
    _mm256_storeu_ps(p.accT + (j0 + jj) * L + 8, hi[jj]);
  }
}

MLA_AVX2 void mqa_avx2(const MqaBlock& p) {
  alignas(32) int32_t vis_lanes[L];
  for (int r = 0; r < L; ++r)  // lanes past `rows` see nothing, and no lane sees the panel padding past `keys`
    vis_lanes[r] = r < p.rows ? static_cast<int32_t>(std::min<int64_t>(p.visible[r], p.keys)) : 0;
  const __m256i vis[2] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(vis_lanes)),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(vis_lanes + 8))};
  const int64_t panels = (p.keys + L - 1) / L;
  for (int64_t pn = 0; pn < panels; ++pn)
    for (int i0 = 0; i0 < L; i0 += 4) logits256(p, pn, i0);

  const __m256 scale = _mm256_set1_ps(p.scale);
  __m256 alpha[2], mx[2], sum[2];
  for (int h = 0; h < 2; ++h) {
    const __m256 m_old = _mm256_loadu_ps(p.m + 8 * h);
    mx[h] = m_old;
    for (int64_t t = 0; t < p.keys; ++t) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis[h], _mm256_set1_epi32(static_cast<int>(t))));
      const __m256 x = _mm256_mul_ps(scale, _mm256_loadu_ps(p.s + t * L + 8 * h));
      mx[h] = _mm256_blendv_ps(mx[h], _mm256_max_ps(mx[h], x), seen);
    }
    const __m256 fresh = _mm256_cmp_ps(m_old, _mm256_set1_ps(-kInf), _CMP_EQ_OQ);
    alpha[h] = _mm256_andnot_ps(fresh, exp256(_mm256_sub_ps(m_old, mx[h])));
    sum[h] = _mm256_setzero_ps();
    for (int64_t t = 0; t < panels * L; ++t) {
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
  for (; j + 4 <= p.dv; j += 4) pv256<4>(p, j, panels, alpha[0], alpha[1]);
  for (; j < p.dv; ++j) pv256<1>(p, j, panels, alpha[0], alpha[1]);
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_ps(p.l + 8 * h, _mm256_fmadd_ps(_mm256_loadu_ps(p.l + 8 * h), alpha[h], sum[h]));
    _mm256_storeu_ps(p.m + 8 * h, mx[h]);
  }
}

// 8 x 8 floats, rows in, columns out.
MLA_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

template <class T>
MLA_AVX2 void pack_avx2(const T* const* rows, int n, int64_t d, float* panel) {
  const int64_t d8 = d / 8 * 8;
  for (int half = 0; half < 2; ++half)
    for (int64_t k0 = 0; k0 < d8; k0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int row = 8 * half + i;
        if (row >= n) r[i] = _mm256_setzero_ps();
        else if constexpr (std::is_same_v<T, uint16_t>)
          r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
              _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[row] + k0))), 16));
        else r[i] = _mm256_loadu_ps(rows[row] + k0);
      }
      transpose8(r);
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(panel + (k0 + c) * L + 8 * half, r[c]);
    }
  if (d8 < d) {  // the last d % 8 elements
    const T* tail[L];
    for (int i = 0; i < n; ++i) tail[i] = rows[i] + d8;
    pack_scalar(tail, n, d - d8, panel + d8 * L);
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

void mqa_pack(const uint16_t* const* rows, int n, int64_t d, float* panel) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return pack_avx512(rows, n, d, panel);
    case Isa::Avx2: return pack_avx2(rows, n, d, panel);
    case Isa::Scalar: return pack_scalar(rows, n, d, panel);
  }
}

// Each row dequantised whole (fp8_row_to_float), then packed. Dequantising in registers inside the transpose
// measured slower on the AVX-512 Xeon (3.6 ms against 3.0 ms for 4096 rows of 576): the decode is port-bound,
// and the 36 KB of floats stay in L1/L2 between the two passes.
void mqa_pack_fp8(const RowLayout& layout, const void* const* rows, int n, float* panel) {
  const int64_t d = layout.width();
  thread_local std::vector<float> deq;
  deq.resize(static_cast<size_t>(L * d));
  const float* f[L];
  for (int i = 0; i < n; ++i) {
    fp8_row_to_float(layout, rows[i], &deq[i * d]);
    f[i] = &deq[i * d];
  }
  mqa_pack(f, n, d, panel);
}

void mqa_pack(const float* const* rows, int n, int64_t d, float* panel) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return pack_avx512(rows, n, d, panel);
    case Isa::Avx2: return pack_avx2(rows, n, d, panel);
    case Isa::Scalar: return pack_scalar(rows, n, d, panel);
  }
}

}  // namespace mla::cpu
