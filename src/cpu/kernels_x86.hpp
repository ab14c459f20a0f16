// The SIMD versions of the kernels in kernels.hpp, one namespace per instruction set (kernels_avx2.cpp,
// kernels_avx512.cpp). Only kernels.cpp calls them, after the dispatcher has checked the CPU; arguments are
// those of the public functions.
#pragma once

#include <cstdint>

namespace mla::cpu {

namespace avx2 {
void to_bf16(const float* x, uint16_t* y, int64_t n);
void from_bf16(const uint16_t* x, float* y, int64_t n);
void round_bf16_values(const float* x, float* y, int64_t n);
// n fp8 e4m3 values times `scale`, rounded to bf16: as bf16 bits into yb, or (yb null) as floats into yf.
void fp8_scaled(const uint8_t* x, int64_t n, float scale, uint16_t* yb, float* yf);
float softmax(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf, uint16_t* pb,
              bool round_p);
void gemv_nt_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta);
void gemv_nn_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta);
}  // namespace avx2

namespace avx512 {
void to_bf16(const float* x, uint16_t* y, int64_t n);
void from_bf16(const uint16_t* x, float* y, int64_t n);
void round_bf16_values(const float* x, float* y, int64_t n);
// n fp8 e4m3 values times `scale`, rounded to bf16: as bf16 bits into yb, or (yb null) as floats into yf.
void fp8_scaled(const uint8_t* x, int64_t n, float scale, uint16_t* yb, float* yf);
float softmax(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf, uint16_t* pb,
              bool round_p);
// The same, rounding bf16 p with VCVTNEPS2BF16 (AVX512-BF16 CPUs only).
float softmax_native_cvt(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* pf,
                         uint16_t* pb, bool round_p);
void gemv_nt_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta);
void gemv_nn_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta);
}  // namespace avx512

}  // namespace mla::cpu
