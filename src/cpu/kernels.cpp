#include "cpu/kernels.hpp"

// GCC 12 warns about its own AVX-512 reduction intrinsics (_mm512_reduce_*); the warning is a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "mla/dtype.hpp"

namespace mla::cpu {
namespace {

enum class Isa { Scalar, Avx512, Avx512Bf16 };

Isa detect() {
  Isa best = Isa::Scalar;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = Isa::Avx512;
  if (best == Isa::Avx512 && __builtin_cpu_supports("avx512bf16")) best = Isa::Avx512Bf16;
  if (const char* force = std::getenv("MLA_CPU_ISA")) {
    if (std::strcmp(force, "scalar") == 0) best = Isa::Scalar;
    else if (std::strcmp(force, "avx512") == 0 && best != Isa::Scalar) best = Isa::Avx512;
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

// ---- scalar ----

void to_bf16_scalar(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

float softmax_scalar(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                     uint16_t* pb) {
  float mx = m;
  for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, scale * s[j]);
  const float alpha = (m == -std::numeric_limits<float>::infinity()) ? 0.f : std::exp(m - mx);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = j < visible ? std::exp(scale * s[j] - mx) : 0.f;
    sum += p;
    if (pf) pf[j] = p;
    else pb[j] = float_to_bf16(p);
  }
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

// ---- AVX-512 ----

// exp(x) for x <= 0 to ~2 ulp: 2^k · P(r), r = x − k·ln2 in [−ln2/2, ln2/2] (Cody–Waite split, degree-6 poly).
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  x = _mm512_max_ps(x, lo);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
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

// Round to nearest even with integer arithmetic, exact for subnormals (the native vcvtneps2bf16 flushes them
// to zero); NaN lanes become quiet NaNs with their sign, as float_to_bf16 does.
__attribute__((target("avx512f,avx512bw"))) inline __m256i cvt_bf16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// Softmax weights lie in [1e-38, 1] (exp512 clamps its argument), never subnormal, so the native instruction
// rounds them exactly like cvt_bf16_avx512.
__attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl"))) inline __m256i cvt_bf16_native(__m512 v) {
  return (__m256i)_mm512_cvtneps_pbh(v);
}

__attribute__((target("avx512f,avx512bw"))) void to_bf16_avx512(const float* x, uint16_t* y,
                                                                                    int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    const __m256i b = cvt_bf16_avx512(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), b);
  }
  to_bf16_scalar(x + i, y + i, n - i);
}

template <bool kNative>
__attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl"))) float softmax_avx512(
    const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf, uint16_t* pb) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= visible; j += 16) vmax = _mm512_max_ps(vmax, _mm512_mul_ps(vscale, _mm512_loadu_ps(s + j)));
  if (j < visible) {
    const __mmask16 k = static_cast<__mmask16>((1u << (visible - j)) - 1);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_mul_ps(vscale, _mm512_maskz_loadu_ps(k, s + j)));
  }
  const float mx = std::max(m, _mm512_reduce_max_ps(vmax));
  const float alpha = (m == -std::numeric_limits<float>::infinity()) ? 0.f : std::exp(m - mx);
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    const int64_t left = std::min<int64_t>(16, n - j);
    const int64_t vis = std::clamp<int64_t>(visible - j, 0, 16);
    const __mmask16 kall = static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 kvis = static_cast<__mmask16>((1u << vis) - 1);
    __m512 p = exp512(_mm512_fmsub_ps(vscale, _mm512_maskz_loadu_ps(kall, s + j), vm));
    p = _mm512_maskz_mov_ps(kvis, p);
    vsum = _mm512_add_ps(vsum, p);
    if (pf) {
      _mm512_mask_storeu_ps(pf + j, kall, p);
    } else {
      __m256i b;
      if constexpr (kNative) b = cvt_bf16_native(p);
      else b = cvt_bf16_avx512(p);
      _mm256_mask_storeu_epi16(pb + j, kall, b);
    }
  }
  l = l * alpha + _mm512_reduce_add_ps(vsum);
  m = mx;
  return alpha;
}

}  // namespace

std::string kernel_isa() {
  switch (isa()) {
    case Isa::Avx512Bf16: return "avx512-bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Scalar: return "scalar";
  }
  return "?";
}

void to_bf16(const float* x, uint16_t* y, int64_t n) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return to_bf16_avx512(x, y, n);
    case Isa::Scalar: return to_bf16_scalar(x, y, n);
  }
}

void from_bf16(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
}

float online_softmax_step(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                          uint16_t* pb) {
  visible = std::clamp<int64_t>(visible, 0, n);
  if (visible == 0) {  // nothing visible in this block: contributes zeros, state unchanged
    if (pf) std::fill(pf, pf + n, 0.f);
    else std::fill(pb, pb + n, uint16_t{0});
    return 1.f;
  }
  switch (isa()) {
    case Isa::Avx512Bf16: return softmax_avx512<true>(s, n, visible, scale, m, l, pf, pb);
    case Isa::Avx512: return softmax_avx512<false>(s, n, visible, scale, m, l, pf, pb);
    case Isa::Scalar: return softmax_scalar(s, n, visible, scale, m, l, pf, pb);
  }
  return 1.f;
}

void scale_inplace(float* y, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

}  // namespace mla::cpu
