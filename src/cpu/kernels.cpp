// The instruction-set dispatcher and the scalar versions of the kernels (the twins the SIMD ones in
// kernels_avx2.cpp and kernels_avx512.cpp are tested against).
#include "cpu/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string_view>

#include "cpu/kernels_x86.hpp"
#include "mla/dtype.hpp"
#include "mla/error.hpp"

namespace mla::cpu {
namespace {

constexpr Isa kAllIsas[] = {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Scalar};

// __builtin_cpu_supports takes only string literals (it also checks that the OS saves the registers).
bool cpu_has(std::string_view f) {
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  return false;
}

std::vector<std::string_view> features(Isa v) {
  switch (v) {
    case Isa::Avx512Bf16: return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512bf16"};
    case Isa::Avx512: return {"avx512f", "avx512bw", "avx512dq", "avx512vl"};
    case Isa::Avx2: return {"avx2", "fma"};
    case Isa::Scalar: return {};
  }
  return {};
}

std::string missing_features(Isa v) {
  std::string out;
  for (std::string_view f : features(v))
    if (!cpu_has(f)) out += (out.empty() ? "" : ", ") + std::string(f);
  return out;
}

std::string supported_list() {
  std::string out;
  for (Isa v : supported_isas()) out += (out.empty() ? "" : ", ") + std::string(isa_name(v));
  return out;
}

Isa detect() {
  const Isa best = supported_isas().front();
  const char* force = std::getenv("MLA_CPU_ISA");
  if (!force || !*force) return best;
  for (Isa v : kAllIsas) {
    if (isa_name(v) != force) continue;
    const std::string missing = missing_features(v);
    if (!missing.empty())
      throw InvalidArgument("MLA_CPU_ISA=" + std::string(force) + ": this CPU cannot run that variant, it lacks " +
                            missing + " (variants it runs: " + supported_list() + ")");
    return v;
  }
  throw InvalidArgument("MLA_CPU_ISA=" + std::string(force) +
                        ": unknown variant (expected avx512-bf16, avx512, avx2 or scalar; this CPU runs " +
                        supported_list() + ")");
}

// ---- scalar ----

void to_bf16_scalar(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

float softmax_scalar(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                     uint16_t* pb, bool round_p) {
  float mx = m;
  for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, scale * s[j]);
  const float alpha = (m == -std::numeric_limits<float>::infinity()) ? 0.f : std::exp(m - mx);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = j < visible ? std::exp(scale * s[j] - mx) : 0.f;
    sum += p;
    if (pf) pf[j] = round_p ? round_bf16(p) : p;
    else pb[j] = float_to_bf16(p);
  }
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

void gemv_nt_scalar(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                    float* C, int64_t ldc, float beta) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += A[m * lda + k] * bf16_to_float(B[n * ldb + k]);
      float& c = C[m * ldc + n];
      c = beta == 0.f ? sum : sum + beta * c;
    }
}

void gemv_nn_scalar(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                    float* C, int64_t ldc, float beta) {
  std::vector<float> acc(static_cast<size_t>(N));
  for (int64_t m = 0; m < M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) acc[n] += A[m * lda + k] * bf16_to_float(B[k * ldb + n]);
    for (int64_t n = 0; n < N; ++n) {
      float& c = C[m * ldc + n];
      c = beta == 0.f ? acc[n] : acc[n] + beta * c;
    }
  }
}

void fp8_scaled_scalar(const uint8_t* x, int64_t n, float scale, uint16_t* yb, float* yf) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t b = float_to_bf16(fp8_e4m3_to_float(x[i]) * scale);
    if (yb)
      yb[i] = b;
    else
      yf[i] = bf16_to_float(b);
  }
}

// fp8_row_to_bf16 / fp8_row_to_float: one group of up to 128 values and one scale at a time.
void fp8_row(const RowLayout& layout, const void* row, uint16_t* yb, float* yf) {
  const auto* in = static_cast<const uint8_t*>(row);
  for (int64_t g = 0; g < layout.groups(); ++g) {
    const int64_t j0 = 128 * g, n = std::min<int64_t>(128, layout.latent - j0);
    float scale;
    std::memcpy(&scale, in + layout.scale_offset() + 4 * g, 4);
    uint16_t* b = yb ? yb + j0 : nullptr;
    float* f = yb ? nullptr : yf + j0;
    switch (isa()) {
      case Isa::Avx512Bf16:
      case Isa::Avx512:
        avx512::fp8_scaled(in + j0, n, scale, b, f);
        break;
      case Isa::Avx2:
        avx2::fp8_scaled(in + j0, n, scale, b, f);
        break;
      case Isa::Scalar:
        fp8_scaled_scalar(in + j0, n, scale, b, f);
        break;
    }
  }
  // The rope values: bf16 at a 4-byte aligned offset of the row.
  const auto* rope = reinterpret_cast<const uint16_t*>(in + layout.rope_offset());
  if (yb)
    std::memcpy(yb + layout.latent, rope, static_cast<size_t>(layout.rope) * 2);
  else
    from_bf16(rope, yf + layout.latent, layout.rope);
}

}  // namespace

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa v : kAllIsas)
    if (missing_features(v).empty()) out.push_back(v);
  return out;
}

Isa isa() {
  static const Isa chosen = detect();  // a throw leaves it unset: every later call throws the same error
  return chosen;
}

std::string_view isa_name(Isa v) {
  switch (v) {
    case Isa::Avx512Bf16: return "avx512-bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Scalar: return "scalar";
  }
  return "?";
}

std::string kernel_isa() { return std::string(isa_name(isa())); }

bool bf16_operands() {
  static const bool forced = [] {
    const char* e = std::getenv("MLA_TEST_BF16_OPERANDS");
    return e && std::string_view(e) == "1";
  }();
  return forced || native_bf16();
}

void to_bf16(const float* x, uint16_t* y, int64_t n) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return avx512::to_bf16(x, y, n);
    case Isa::Avx2: return avx2::to_bf16(x, y, n);
    case Isa::Scalar: return to_bf16_scalar(x, y, n);
  }
}

void from_bf16(const uint16_t* x, float* y, int64_t n) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return avx512::from_bf16(x, y, n);
    case Isa::Avx2: return avx2::from_bf16(x, y, n);
    case Isa::Scalar:
      for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
  }
}

void round_bf16_values(const float* x, float* y, int64_t n) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return avx512::round_bf16_values(x, y, n);
    case Isa::Avx2: return avx2::round_bf16_values(x, y, n);
    case Isa::Scalar:
      for (int64_t i = 0; i < n; ++i) y[i] = round_bf16(x[i]);
  }
}

void fp8_row_to_bf16(const RowLayout& layout, const void* row, uint16_t* y) { fp8_row(layout, row, y, nullptr); }
void fp8_row_to_float(const RowLayout& layout, const void* row, float* y) { fp8_row(layout, row, nullptr, y); }

float online_softmax_step(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                          uint16_t* pb, bool round_p) {
  visible = std::clamp<int64_t>(visible, 0, n);
  if (visible == 0) {  // nothing visible in this block: contributes zeros, state unchanged
    if (pf) std::fill(pf, pf + n, 0.f);
    else std::fill(pb, pb + n, uint16_t{0});
    return 1.f;
  }
  switch (isa()) {
    case Isa::Avx512Bf16: return avx512::softmax_native_cvt(s, n, visible, scale, m, l, pf, pb, round_p);
    case Isa::Avx512: return avx512::softmax(s, n, visible, scale, m, l, pf, pb, round_p);
    case Isa::Avx2: return avx2::softmax(s, n, visible, scale, m, l, pf, pb, round_p);
    case Isa::Scalar: return softmax_scalar(s, n, visible, scale, m, l, pf, pb, round_p);
  }
  return 1.f;
}

void scale_inplace(float* y, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

void gemv_nt_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return avx512::gemv_nt_bf16(M, N, K, A, lda, B, ldb, C, ldc, beta);
    case Isa::Avx2: return avx2::gemv_nt_bf16(M, N, K, A, lda, B, ldb, C, ldc, beta);
    case Isa::Scalar: return gemv_nt_scalar(M, N, K, A, lda, B, ldb, C, ldc, beta);
  }
}

void gemv_nn_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta) {
  switch (isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return avx512::gemv_nn_bf16(M, N, K, A, lda, B, ldb, C, ldc, beta);
    case Isa::Avx2: return avx2::gemv_nn_bf16(M, N, K, A, lda, B, ldb, C, ldc, beta);
    case Isa::Scalar: return gemv_nn_scalar(M, N, K, A, lda, B, ldb, C, ldc, beta);
  }
}

}  // namespace mla::cpu
