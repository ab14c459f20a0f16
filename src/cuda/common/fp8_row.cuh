// Device side of the fp8_ds_mla cache row (mla/cache.hpp, RowLayout): the same bytes as mla::store_row from the
// same floats, the same values as mla::load_row. Quantisation is an IEEE division (never --use_fast_math) and
// cvt.rn.satfinite (round to nearest even, saturating at ±448), which float_to_fp8_e4m3 reproduces bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "mla/cache.hpp"

namespace mla::cuda {

// Byte offsets of one fp8 row, as kernel arguments.
struct Fp8Row {
  int latent = 0, rope = 0, scale_offset = 0, rope_offset = 0, bytes = 0;
  static Fp8Row of(const RowLayout& l) {
    return {static_cast<int>(l.latent), static_cast<int>(l.rope), static_cast<int>(l.scale_offset()),
            static_cast<int>(l.rope_offset()), static_cast<int>(l.bytes())};
  }
};

#ifdef __CUDACC__
// One latent value of a group with scale `scale` (> 0) as e4m3 bits.
__device__ __forceinline__ uint8_t fp8_quantize(float x, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
}

// The dequantised value as a float: fp8 → half is exact, half → float exact, the product rounded once in fp32.
__device__ __forceinline__ float fp8_dequantize_f32(uint8_t v, float scale) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3))) * scale;
}

// Two adjacent values as the bf16 pair the kernels multiply: bf16(fp8 · scale), each rounded to nearest even.
__device__ __forceinline__ __nv_bfloat162 fp8x2_dequantize(uint16_t v2, float scale) {
  const __half2 h(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v2), __NV_E4M3));
  const float2 f = __half22float2(h);
  return __floats2bfloat162_rn(f.x * scale, f.y * scale);
}
#endif

}  // namespace mla::cuda
