// Small vector kernels of the fast CPU backend, with AVX-512 (and AVX512-BF16) versions chosen at run time
// and plain fallbacks. Each has a scalar twin in tests/test_kernels.cpp's comparisons.
#pragma once

#include <cstdint>
#include <string>

namespace mla::cpu {

// Which variant the dispatcher picked: "avx512-bf16", "avx512" or "scalar". MLA_CPU_ISA=scalar|avx512 in the
// environment forces a lower one (tests use it to cover every variant on one machine).
std::string kernel_isa();

// y = bf16(x), round to nearest even.
void to_bf16(const float* x, uint16_t* y, int64_t n);
void from_bf16(const uint16_t* x, float* y, int64_t n);

// One step of the online softmax over a block of keys for one query row:
//   s[0, n): raw dot products; keys j >= visible are masked out (causal).
//   m, l: running max of the scaled logits and running sum; updated.
// Writes p[j] = exp(scale·s[j] − m_new) (0 for masked keys) to `p_f32` or `p_bf16` (whichever is not null) and
// returns exp(m_old − m_new), the factor the caller applies to its running output.
float online_softmax_step(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* p_f32,
                          uint16_t* p_bf16);

// y[0, n) *= a
void scale_inplace(float* y, int64_t n, float a);

}  // namespace mla::cpu
