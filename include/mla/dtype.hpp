// Element types and the bf16/f16/fp8 conversions used by the loaders and the CPU backend.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace mla {

enum class DType { F32, F64, BF16, F16, F8_E4M3, I64, I32 };

// Bytes per element.
constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::F8_E4M3: return 1;
  }
  return 0;
}

// Names as safetensors writes them ("F32", "BF16", "F8_E4M3", ...).
std::string_view dtype_name(DType t);
// Throws mla::Error naming `context` for an unknown name.
DType dtype_from_name(std::string_view name, std::string_view context);

// Round-to-nearest-even float -> bf16 bits; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

// The value a float takes after a round trip through bf16.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

float f16_to_float(uint16_t h);
// OCP FP8 E4M3 (the "fn" variant: no infinities, 0x7f/0xff are NaN, max 448).
float fp8_e4m3_to_float(uint8_t v);
// float -> FP8 E4M3 bits, round to nearest even, saturating: |x| beyond 448 (infinities too) gives ±448, NaN
// gives NaN. The rounding of PTX's cvt.rn.satfinite.e4m3x2.f32, bit for bit (tests/test_cuda.cpp checks it).
uint8_t float_to_fp8_e4m3(float x);

}  // namespace mla
