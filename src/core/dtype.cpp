#include "mla/dtype.hpp"

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <string>

#include "mla/error.hpp"

namespace mla {

namespace {

constexpr std::array<DType, 7> kAllDTypes = {DType::F32, DType::F64,     DType::BF16, DType::F16,
                                             DType::F8_E4M3, DType::I64, DType::I32};

constexpr float fp8_e4m3_decode(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v >> 7) << 31;
  const uint32_t exp = (v >> 3) & 0xfu;
  const uint32_t mant = v & 0x7u;
  // The "fn" variant spends only S.1111.111 on NaN and has no infinities, which buys the range up to 448.
  if (exp == 0xfu && mant == 0x7u) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) {
    // Subnormal: mant/8 * 2^(1-7). The product is exact in f32, so building it by arithmetic is safe.
    const float magnitude = static_cast<float>(mant) * (1.0f / 512.0f);
    return sign ? -magnitude : magnitude;
  }
  // Re-bias the exponent from 7 to 127 and widen the mantissa from 3 to 23 bits.
  return std::bit_cast<float>(sign | ((exp + 120u) << 23) | (mant << 20));
}

constexpr std::array<float, 256> make_fp8_table() {
  std::array<float, 256> table{};
  for (int i = 0; i < 256; ++i) table[i] = fp8_e4m3_decode(static_cast<uint8_t>(i));
  return table;
}

// Built at compile time: decoding fp8 weights is a hot loop when loading a checkpoint.
constexpr std::array<float, 256> kFp8Table = make_fp8_table();

}  // namespace

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
  }
  return "?";
}

DType dtype_from_name(std::string_view name, std::string_view context) {
  for (DType t : kAllDTypes) {
    if (dtype_name(t) == name) return t;
  }
  throw Error(std::string(context) + ": unsupported dtype '" + std::string(name) +
              "' (supported: F64, F32, F16, BF16, F8_E4M3, I64, I32)");
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Subnormal (or zero): mant * 2^-24, exact in f32.
    const float magnitude = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  // Inf and NaN keep their payload; everything else re-biases the exponent from 15 to 127.
  if (exp == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

float fp8_e4m3_to_float(uint8_t v) { return kFp8Table[v]; }

uint8_t float_to_fp8_e4m3(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const auto sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7f;  // NaN
  const float m = std::bit_cast<float>(a);
  if (m < 0x1p-6f) {
    // Subnormal range: multiples of 2^-9, found by an exact scaling and a round-half-even to integer (8 is the
    // smallest normal, 0x08, which the encoding below would also give).
    return sign | static_cast<uint8_t>(std::nearbyint(m * 512.0f));
  }
  // Keep 3 of the 23 mantissa bits, rounding half to even; a carry moves into the exponent on its own.
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t exp = (r >> 23) - 120u;  // re-biased from 127 to 7: >= 1 here
  if (exp > 15u || (exp == 15u && ((r >> 20) & 7u) == 7u)) return sign | 0x7e;  // past 448: saturate
  return sign | static_cast<uint8_t>((exp << 3) | ((r >> 20) & 7u));
}

}  // namespace mla
