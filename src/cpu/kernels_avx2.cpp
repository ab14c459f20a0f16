// AVX2 + FMA versions of the kernels in kernels.hpp (8 lanes; tails through a padded copy or scalar code).
// Compiled for baseline x86-64 like the rest: each function carries its own target.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <immintrin.h>

#include "cpu/kernels_x86.hpp"
#include "mla/dtype.hpp"

#define MLA_AVX2 __attribute__((target("avx2,fma")))

namespace mla::cpu::avx2 {
namespace {

// exp(x) for x <= 0, the same approximation as the AVX-512 exp512 (2^k built in the exponent bits, k >= -126).
MLA_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));  // also maps NaN to -87.3 (the caller masks such lanes)
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Each lane rounded to the nearest bf16 (ties to even, subnormals exact, NaN quieted), low 16 bits zero.
MLA_AVX2 inline __m256i round_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i q = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  return _mm256_and_si256(q, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
}

// The 8 bf16 of round_bf16_bits as 16-bit values in the low 128 bits.
MLA_AVX2 inline __m128i cvt_bf16(__m256 v) {
  const __m256i h = _mm256_srli_epi32(round_bf16_bits(v), 16);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08));
}

MLA_AVX2 inline __m256 load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

MLA_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// C[i, j] for kM rows of A and kN rows of B over all of K (the K % 8 tail in scalar code).
template <int kM, int kN>
MLA_AVX2 void nt_tile(int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                      float beta) {
  __m256 acc[kM][kN];
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < kN; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 b[kN];
    for (int j = 0; j < kN; ++j) b[j] = load_bf16(B + j * ldb + k);
    for (int i = 0; i < kM; ++i) {
      const __m256 a = _mm256_loadu_ps(A + i * lda + k);
      for (int j = 0; j < kN; ++j) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < kN; ++j) {
      float sum = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) sum += A[i * lda + t] * bf16_to_float(B[j * ldb + t]);
      float& c = C[i * ldc + j];
      c = beta == 0.f ? sum : sum + beta * c;
    }
}

template <int kN>
MLA_AVX2 void nt_rows(int64_t M, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                      int64_t ldc, float beta) {
  for (int64_t m = 0; m < M; m += 2) {
    if (M - m >= 2) nt_tile<2, kN>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, beta);
    else nt_tile<1, kN>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, beta);
  }
}

// C[i, 0 .. 8·kV) for kM rows of A (all columns real).
template <int kM, int kV>
MLA_AVX2 void nn_tile(int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                      float beta) {
  __m256 acc[kM][kV];
  for (int i = 0; i < kM; ++i)
    for (int v = 0; v < kV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[kV];
    for (int v = 0; v < kV; ++v) b[v] = load_bf16(B + k * ldb + 8 * v);
    for (int i = 0; i < kM; ++i) {
      const __m256 a = _mm256_set1_ps(A[i * lda + k]);
      for (int v = 0; v < kV; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kM; ++i)
    for (int v = 0; v < kV; ++v) {
      float* c = C + i * ldc + 8 * v;
      __m256 r = acc[i][v];
      if (beta != 0.f) r = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(c), r);
      _mm256_storeu_ps(c, r);
    }
}

template <int kV>
MLA_AVX2 void nn_cols(int64_t M, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                      int64_t ldc, float beta) {
  for (int64_t m = 0; m < M; m += 2) {
    if (M - m >= 2) nn_tile<2, kV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, beta);
    else nn_tile<1, kV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, beta);
  }
}

// 8 fp8 e4m3 codes decoded to f32 as fp8_e4m3_to_float (see kernels_avx512.cpp, load_fp8).
MLA_AVX2 inline __m256 load_fp8(const uint8_t* x) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
  const __m256i a = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(a, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(1.0f / 512.0f));
  __m256 f = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), a)));
  f = _mm256_or_ps(f, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24)));
  return _mm256_blendv_ps(f, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                          _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_set1_epi32(0x7f))));
}

}  // namespace

MLA_AVX2 void to_bf16(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), cvt_bf16(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

MLA_AVX2 void from_bf16(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load_bf16(x + i));
  for (; i < n; ++i) y[i] = bf16_to_float(x[i]);
}

MLA_AVX2 void round_bf16_values(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_castsi256_ps(round_bf16_bits(_mm256_loadu_ps(x + i))));
  for (; i < n; ++i) y[i] = round_bf16(x[i]);
}

MLA_AVX2 void fp8_scaled(const uint8_t* x, int64_t n, float scale, uint16_t* yb, float* yf) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 8) {
    uint8_t tail[8] = {};
    const uint8_t* src = x + i;
    if (n - i < 8) src = static_cast<const uint8_t*>(std::memcpy(tail, x + i, static_cast<size_t>(n - i)));
    const __m256i r = round_bf16_bits(_mm256_mul_ps(load_fp8(src), s));
    if (n - i >= 8) {
      if (yb) {
        const __m256i h = _mm256_srli_epi32(r, 16);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(yb + i),
                         _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08)));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yf + i), r);
      }
    } else {
      alignas(32) uint32_t bits[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(bits), r);
      for (int64_t j = 0; j < n - i; ++j) {
        if (yb)
          yb[i + j] = static_cast<uint16_t>(bits[j] >> 16);
        else
          std::memcpy(yf + i + j, &bits[j], 4);
      }
    }
  }
}

MLA_AVX2 float softmax(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                       uint16_t* pb, bool round_p) {
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= visible; j += 8) vmax = _mm256_max_ps(vmax, _mm256_mul_ps(vscale, _mm256_loadu_ps(s + j)));
  float mx = m;
  for (; j < visible; ++j) mx = std::max(mx, scale * s[j]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float v : lanes) mx = std::max(mx, v);
  const float alpha = (m == -std::numeric_limits<float>::infinity()) ? 0.f : std::exp(m - mx);

  const __m256 vm = _mm256_set1_ps(mx);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 vsum = _mm256_setzero_ps();
  alignas(32) float pad[8];
  alignas(16) uint16_t padb[8];
  for (j = 0; j < n; j += 8) {
    const int64_t left = std::min<int64_t>(8, n - j);
    __m256 x;
    if (left == 8) {
      x = _mm256_loadu_ps(s + j);
    } else {  // the tail through a zero-padded copy (the padding lanes are masked below)
      std::fill(pad, pad + 8, 0.f);
      std::copy_n(s + j, left, pad);
      x = _mm256_load_ps(pad);
    }
    const int vis = static_cast<int>(std::clamp<int64_t>(visible - j, 0, 8));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(vis), lane));
    const __m256 p = _mm256_and_ps(keep, exp256(_mm256_fmsub_ps(vscale, x, vm)));
    vsum = _mm256_add_ps(vsum, p);
    if (pf) {
      const __m256 out = round_p ? _mm256_castsi256_ps(round_bf16_bits(p)) : p;
      if (left == 8) {
        _mm256_storeu_ps(pf + j, out);
      } else {
        _mm256_store_ps(pad, out);
        std::copy_n(pad, left, pf + j);
      }
    } else if (left == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pb + j), cvt_bf16(p));
    } else {
      _mm_store_si128(reinterpret_cast<__m128i*>(padb), cvt_bf16(p));
      std::copy_n(padb, left, pb + j);
    }
  }
  l = l * alpha + hsum(vsum);
  m = mx;
  return alpha;
}

MLA_AVX2 void gemv_nt_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B,
                           int64_t ldb, float* C, int64_t ldc, float beta) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) nt_rows<4>(M, K, A, lda, B + n * ldb, ldb, C + n, ldc, beta);
  for (; n < N; ++n) nt_rows<1>(M, K, A, lda, B + n * ldb, ldb, C + n, ldc, beta);
}

MLA_AVX2 void gemv_nn_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B,
                           int64_t ldb, float* C, int64_t ldc, float beta) {
  int64_t n = 0;
  for (; n + 32 <= N; n += 32) nn_cols<4>(M, K, A, lda, B + n, ldb, C + n, ldc, beta);
  for (; n + 8 <= N; n += 8) nn_cols<1>(M, K, A, lda, B + n, ldb, C + n, ldc, beta);
  for (; n < N; ++n)  // the last N % 8 columns
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += A[m * lda + k] * bf16_to_float(B[k * ldb + n]);
      float& c = C[m * ldc + n];
      c = beta == 0.f ? sum : sum + beta * c;
    }
}

}  // namespace mla::cpu::avx2
