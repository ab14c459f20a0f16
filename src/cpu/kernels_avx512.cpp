// AVX-512 (F/BW/DQ/VL) versions of the kernels in kernels.hpp; VCVTNEPS2BF16 only where the caller says the CPU
// has AVX512-BF16. Compiled for baseline x86-64 like the rest: each function carries its own target.
#include <algorithm>
#include <cmath>
#include <limits>

// GCC 12 warns about its own AVX-512 reduction intrinsics (_mm512_reduce_*); the warning is a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#ifndef __clang__  // clang has no -Wmaybe-uninitialized and would warn about the unknown name
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "cpu/kernels_x86.hpp"

#define MLA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace mla::cpu::avx512 {
namespace {

// exp(x) for x <= 0 to ~2 ulp: 2^k · P(r), r = x − k·ln2 in [−ln2/2, ln2/2] (Cody–Waite split, degree-6 poly).
MLA_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 k =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

// The bf16 nearest to each lane, as the upper 16 bits of a 32-bit lane (low bits zero): round to nearest even
// with integer arithmetic, exact for subnormals (the native vcvtneps2bf16 flushes them to zero); NaN lanes
// become quiet NaNs with their sign, as float_to_bf16 does.
MLA_AVX512 inline __m512i round_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i q = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_and_si512(q, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

MLA_AVX512 inline __m256i cvt_bf16(__m512 v) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_bits(v), 16));
}

// Softmax weights lie in [1e-38, 1] (exp512 clamps its argument), never subnormal, so the native instruction
// rounds them exactly like cvt_bf16.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline __m256i cvt_bf16_native(__m512 v) {
  return (__m256i)_mm512_cvtneps_pbh(v);
}

// 16 bf16 (fewer under `k`) widened to f32: the bits shifted into the upper half of each lane.
MLA_AVX512 inline __m512 load_bf16(const uint16_t* p, __mmask16 k = 0xffff) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

MLA_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 (or, masked, fewer) elements of K for kM rows of A and kN rows of B.
template <int kM, int kN>
MLA_AVX512 inline void nt_step(__m512 (&acc)[kM][kN], const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                               int64_t k, __mmask16 km) {
  __m512 b[kN];
  for (int j = 0; j < kN; ++j) b[j] = load_bf16(B + j * ldb + k, km);
  for (int i = 0; i < kM; ++i) {
    const __m512 a = _mm512_maskz_loadu_ps(km, A + i * lda + k);
    for (int j = 0; j < kN; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
  }
}

// C[m0 + i, n0 + j] for kM rows of A and kN rows of B, over all of K.
template <int kM, int kN>
MLA_AVX512 void nt_tile(int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                        int64_t ldc, float beta) {
  __m512 acc[kM][kN];
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < kN; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) nt_step<kM, kN>(acc, A, lda, B, ldb, k, 0xffff);
  if (k < K) nt_step<kM, kN>(acc, A, lda, B, ldb, k, tail_mask(K - k));
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < kN; ++j) {
      const float sum = _mm512_reduce_add_ps(acc[i][j]);
      float& c = C[i * ldc + j];
      c = beta == 0.f ? sum : sum + beta * c;
    }
}

template <int kN>
MLA_AVX512 void nt_rows(int64_t M, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                        int64_t ldc, float beta) {
  if constexpr (kN == 8) {  // M <= 2 only (registers)
    if (M == 1) nt_tile<1, 8>(K, A, lda, B, ldb, C, ldc, beta);
    else nt_tile<2, 8>(K, A, lda, B, ldb, C, ldc, beta);
    return;
  }
  for (int64_t m = 0; m < M; m += 4) {  // the kN rows of B stay in L1 while every group of 4 rows of A passes
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: nt_tile<1, kN>(K, a, lda, B, ldb, c, ldc, beta); break;
      case 2: nt_tile<2, kN>(K, a, lda, B, ldb, c, ldc, beta); break;
      case 3: nt_tile<3, kN>(K, a, lda, B, ldb, c, ldc, beta); break;
      default: nt_tile<4, kN>(K, a, lda, B, ldb, c, ldc, beta); break;
    }
  }
}

// C[m0 + i, n0 .. n0 + 16·kV) for kM rows of A; `cols` (<= 16·kV) of them are real.
template <int kM, int kV>
MLA_AVX512 void nn_tile(int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                        int64_t ldc, float beta, int64_t cols) {
  __mmask16 km[kV];
  for (int v = 0; v < kV; ++v) km[v] = tail_mask(std::max<int64_t>(0, cols - 16 * v));
  __m512 acc[kM][kV];
  for (int i = 0; i < kM; ++i)
    for (int v = 0; v < kV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[kV];
    for (int v = 0; v < kV; ++v) b[v] = load_bf16(B + k * ldb + 16 * v, km[v]);
    for (int i = 0; i < kM; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      for (int v = 0; v < kV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kM; ++i)
    for (int v = 0; v < kV; ++v) {
      float* c = C + i * ldc + 16 * v;
      __m512 r = acc[i][v];
      if (beta != 0.f) r = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(km[v], c), r);
      _mm512_mask_storeu_ps(c, km[v], r);
    }
}

// n fp8 e4m3 codes (fewer than 16 under k) decoded to f32 exactly as fp8_e4m3_to_float: normal codes by moving
// exponent and mantissa into place (re-biased from 7 to 127), subnormal ones as mantissa · 2^-9 (no denormal f32
// ever enters an instruction, so DAZ cannot change the result), S.1111.111 as the quiet NaN.
MLA_AVX512 inline __m512 load_fp8(const uint8_t* x, __mmask16 k) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, x));
  const __m512i a = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  const __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(a, 20), _mm512_set1_epi32(120 << 23)));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(1.0f / 512.0f));
  __m512 f = _mm512_mask_mov_ps(normal, _mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(8)), sub);
  f = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(f), _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24)));
  return _mm512_mask_mov_ps(f, _mm512_cmpeq_epi32_mask(a, _mm512_set1_epi32(0x7f)),
                            _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
}

}  // namespace

MLA_AVX512 void to_bf16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm256_mask_storeu_epi16(y + i, k, cvt_bf16(_mm512_maskz_loadu_ps(k, x + i)));
  }
}

MLA_AVX512 void from_bf16(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, k, load_bf16(x + i, k));
  }
}

MLA_AVX512 void round_bf16_values(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, k, _mm512_castsi512_ps(round_bf16_bits(_mm512_maskz_loadu_ps(k, x + i))));
  }
}

// Dequantisation by two 16-entry tables. An e4m3 code is ±I · 2^E with I its 4-bit integer significand (m, or
// 8 + m for a normal exponent e) and E = max(e, 1) − 10. While every product stays a normal f32 (a positive
// scale in [2^-116, 2^118]: |I · scale| and |q · scale| then lie in [2^-125, 2^127]), scaling by 2^E commutes
// with both roundings, so bf16(f32(q · scale)) = ±bf16(f32(I · scale)) · 2^E: one table of the 16 values
// bf16(I · scale) per group, one of ±2^E indexed by sign and exponent, one exact product, nothing left to round.
// Other scales (0, subnormal, huge, negative, infinite, NaN) take the direct route. Bit for bit load_row.
MLA_AVX512 void fp8_scaled(const uint8_t* x, int64_t n, float scale, uint16_t* yb, float* yf) {
  const __m512 s = _mm512_set1_ps(scale);
  if (!(scale >= 0x1p-116f && scale <= 0x1p118f)) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = tail_mask(n - i);
      const __m512i r = round_bf16_bits(_mm512_mul_ps(load_fp8(x + i, k), s));
      if (yb)
        _mm256_mask_storeu_epi16(yb + i, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
      else
        _mm512_mask_storeu_ps(yf + i, k, _mm512_castsi512_ps(r));
    }
    return;
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 table = _mm512_castsi512_ps(round_bf16_bits(_mm512_mul_ps(_mm512_cvtepi32_ps(lane), s)));
  // 2^(max(e, 1) − 10) for e = 0..15, then the same negated (index bit 4: the sign).
  const __m512 pow_pos = _mm512_scalef_ps(
      _mm512_set1_ps(1.0f),
      _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_max_epi32(lane, _mm512_set1_epi32(1)), _mm512_set1_epi32(10))));
  const __m512 pow_neg = _mm512_sub_ps(_mm512_setzero_ps(), pow_pos);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, x + i));
    const __m512i m = _mm512_and_si512(b, _mm512_set1_epi32(7));
    const __m512i sig =
        _mm512_mask_or_epi32(m, _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x78)), m, _mm512_set1_epi32(8));
    const __m512i se = _mm512_and_si512(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(0x1f));
    __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(sig, table), _mm512_permutex2var_ps(pow_pos, se, pow_neg));
    const __mmask16 nan =
        _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)), _mm512_set1_epi32(0x7f));
    v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    if (yb)
      _mm256_mask_storeu_epi16(yb + i, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
    else
      _mm512_mask_storeu_ps(yf + i, k, v);
  }
}

#define MLA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// One body for both softmax entries. It carries the BF16 target so that the native conversion can be inlined;
// the compiler emits no BF16 instruction unless kNativeCvt asks for VCVTNEPS2BF16.
template <bool kNativeCvt>
MLA_AVX512_BF16 inline float softmax_body(const float* s, int64_t n, int64_t visible, float scale, float& m,
                                          float& l, float* pf, uint16_t* pb, bool round_p) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < visible; j += 16) {
    const __mmask16 k = tail_mask(visible - j);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_mul_ps(vscale, _mm512_maskz_loadu_ps(k, s + j)));
  }
  const float mx = std::max(m, _mm512_reduce_max_ps(vmax));
  const float alpha = (m == -std::numeric_limits<float>::infinity()) ? 0.f : std::exp(m - mx);
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 kall = tail_mask(n - j);
    const __mmask16 kvis = tail_mask(std::max<int64_t>(0, visible - j));
    __m512 p = exp512(_mm512_fmsub_ps(vscale, _mm512_maskz_loadu_ps(kall, s + j), vm));
    p = _mm512_maskz_mov_ps(kvis, p);
    vsum = _mm512_add_ps(vsum, p);
    if (pf) {
      if (round_p) p = _mm512_castsi512_ps(round_bf16_bits(p));
      _mm512_mask_storeu_ps(pf + j, kall, p);
    } else {
      __m256i b;
      if constexpr (kNativeCvt) b = cvt_bf16_native(p);
      else b = cvt_bf16(p);
      _mm256_mask_storeu_epi16(pb + j, kall, b);
    }
  }
  l = l * alpha + _mm512_reduce_add_ps(vsum);
  m = mx;
  return alpha;
}

MLA_AVX512_BF16 float softmax_native_cvt(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l,
                                         float* pf, uint16_t* pb, bool round_p) {
  return softmax_body<true>(s, n, visible, scale, m, l, pf, pb, round_p);
}

MLA_AVX512_BF16 float softmax(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                              uint16_t* pb, bool round_p) {
  return softmax_body<false>(s, n, visible, scale, m, l, pf, pb, round_p);
}

MLA_AVX512 void gemv_nt_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, float* C, int64_t ldc, float beta) {
  int64_t n = 0;
  if (M <= 2)  // eight rows of B in flight: a stream per row keeps the memory busier than four (decode)
    for (; n + 8 <= N; n += 8) nt_rows<8>(M, K, A, lda, B + n * ldb, ldb, C + n, ldc, beta);
  for (; n + 4 <= N; n += 4) nt_rows<4>(M, K, A, lda, B + n * ldb, ldb, C + n, ldc, beta);
  for (; n < N; ++n) nt_rows<1>(M, K, A, lda, B + n * ldb, ldb, C + n, ldc, beta);
}

MLA_AVX512 void gemv_nn_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, float* C, int64_t ldc, float beta) {
  if (M == 1) {  // 256 columns at a time: each row of B is read in long runs (decode)
    for (int64_t n = 0; n < N; n += 256)
      nn_tile<1, 16>(K, A, lda, B + n, ldb, C + n, ldc, beta, std::min<int64_t>(256, N - n));
    return;
  }
  for (int64_t n = 0; n < N; n += 64) {
    const int64_t cols = std::min<int64_t>(64, N - n);
    for (int64_t m = 0; m < M; m += 4) {  // the 64 columns of B stay in L1/L2 for every group of 4 rows of A
      const float* a = A + m * lda;
      float* c = C + m * ldc + n;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: nn_tile<1, 4>(K, a, lda, B + n, ldb, c, ldc, beta, cols); break;
        case 2: nn_tile<2, 4>(K, a, lda, B + n, ldb, c, ldc, beta, cols); break;
        case 3: nn_tile<3, 4>(K, a, lda, B + n, ldb, c, ldc, beta, cols); break;
        default: nn_tile<4, 4>(K, a, lda, B + n, ldb, c, ldc, beta, cols); break;
      }
    }
  }
}

}  // namespace mla::cpu::avx512
