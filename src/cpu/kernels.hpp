// Small vector kernels of the fast CPU backend and the instruction-set dispatcher that every CPU kernel (and the
// GEMM library, src/cpu/gemm.cpp) follows. Each kernel has scalar, AVX2, AVX-512 and, where it matters,
// AVX512-BF16 versions chosen once per process; tests/test_kernels.cpp checks each against a scalar twin.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "mla/cache.hpp"

namespace mla::cpu {

// The variants, lowest first. What bf16 operands cost on each:
//   Avx512Bf16  AVX-512 F/BW/DQ/VL + AVX512-BF16: bf16 GEMMs run natively in oneDNN (VDPBF16PS, AMX).
//   Avx512      AVX-512 F/BW/DQ/VL without BF16: bf16 weights and cache are widened to f32 inside the kernels
//               (bf16 -> f32 is a 16-bit shift) and multiplied by the f32 GEMM; oneDNN is capped at avx512_core.
//   Avx2        AVX2 + FMA: as Avx512 with 8-wide kernels; oneDNN is capped at avx2.
//   Scalar      plain C++ loops; oneDNN is capped at sse41, its lowest.
enum class Isa : uint8_t { Scalar, Avx2, Avx512, Avx512Bf16 };

// The variant in use: the best this CPU supports, or the one MLA_CPU_ISA names (avx512-bf16, avx512, avx2,
// scalar). Asking for a variant the CPU cannot run, or an unknown name, throws mla::InvalidArgument naming the
// variant and what the CPU lacks: there is no silent fallback. Decided at the first call, then fixed.
Isa isa();
std::string_view isa_name(Isa isa);
std::string kernel_isa();  // isa_name(isa())
// Every variant this CPU can run, best first (what MLA_CPU_ISA may name).
std::vector<Isa> supported_isas();
// True when bf16 GEMMs go to the library natively; otherwise bf16 operands are widened to f32 (see Isa).
inline bool native_bf16() { return isa() == Isa::Avx512Bf16; }
// True when the bf16 layer and ops hand bf16 operands to the library: native_bf16(), or MLA_TEST_BF16_OPERANDS=1
// (tests only: oneDNN then emulates bf16, slowly, so that this path is covered on a CPU without AVX512-BF16).
bool bf16_operands();

// y = bf16(x), round to nearest even.
void to_bf16(const float* x, uint16_t* y, int64_t n);
// y = f32(x), exact (a 16-bit shift).
void from_bf16(const uint16_t* x, float* y, int64_t n);
// y = f32(bf16(x)): x rounded to the nearest bf16, kept as f32 (y may be x). The bf16 layer on a CPU without
// a bf16 dot product holds its activations this way, so its GEMMs multiply exactly the values a bf16 GEMM would.
void round_bf16_values(const float* x, float* y, int64_t n);

// One row of an FP8 cache (layout.dtype F8_E4M3, the fp8_ds_mla row of mla/cache.hpp) as its width() values:
// the latent values dequantised to bf16(fp8 · scale), the rope values as stored. As bf16 bits, or as floats;
// bit for bit mla::load_row (NaN lanes: NaN, payload aside).
void fp8_row_to_bf16(const RowLayout& layout, const void* row, uint16_t* y);
void fp8_row_to_float(const RowLayout& layout, const void* row, float* y);

// One step of the online softmax over a block of keys for one query row:
//   s[0, n): raw dot products; keys j >= visible are masked out (causal).
//   m, l: running max of the scaled logits and running sum; updated.
// Writes p[j] = exp(scale·s[j] − m_new) (0 for masked keys) to `p_f32` or `p_bf16` (whichever is not null) and
// returns exp(m_old − m_new), the factor the caller applies to its running output. With `round_p` the f32
// weights are rounded to bf16 values (what p_bf16 would hold; the sum l adds the unrounded weights either way).
float online_softmax_step(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, float* p_f32,
                          uint16_t* p_bf16, bool round_p = false);

// y[0, n) *= a
void scale_inplace(float* y, int64_t n, float a);

// One block of `keys` keys of MQA for up to kMqaLanes query rows that all share each key and value row (the
// absorbed MLA form: a row of the latent cache is the key over d = 576 columns and the value over its first
// dv = 512), with the query rows as vector lanes (mqa.cpp). Per lane r it does what online_softmax_step does for
// row r (raw dot products scaled by `scale`, keys t >= visible[r] masked) followed by acc = alpha·acc + P·V, P
// rounded to bf16 values when round_p. Lanes r >= rows see nothing and keep their state.
inline constexpr int kMqaLanes = 16;
struct MqaBlock {
  const float* qT;         // [d, 16]: element k of query row r at qT[k·16 + r]
  const float* kv;         // [ceil(keys/16), d, 16]: panels of 16 keys from mqa_pack; value t = key t's first dv
  int64_t d, dv, keys;
  int rows;                // real lanes, 1..16
  const int32_t* visible;  // [rows]: lane r sees keys t < visible[r] of this block
  float scale;
  bool round_p;
  float* m;     // [16] running max of the scaled logits, -inf at the start
  float* l;     // [16] running sum
  float* accT;  // [dv, 16] running output (unnormalised), transposed like qT
  float* s;     // [ceil(keys/16)·16, 16] scratch
};
void mqa_block(const MqaBlock& p);
// One panel [d, 16] of mqa_block's kv from n <= 16 rows of d elements (bf16 widened, or f32); rows >= n are zeros.
void mqa_pack(const uint16_t* const* rows, int n, int64_t d, float* panel);
void mqa_pack(const float* const* rows, int n, int64_t d, float* panel);
// The same from n <= 16 fp8_ds_mla rows (layout.dtype F8_E4M3, d = layout.width()): the values of
// fp8_row_to_float, each row dequantised into a per-thread buffer and then packed.
void mqa_pack_fp8(const RowLayout& layout, const void* const* rows, int n, float* panel);

// C[M,N] = A[M,K]·B[N,K]ᵀ + beta·C (nt) or A[M,K]·B[K,N] + beta·C (nn), f32 A, bf16 B, row-major with leading
// dimensions in elements; for a few rows M (decode). Each bf16 weight is widened in registers as it streams in,
// so the bytes read stay bf16. Runs in the calling thread (gemm.cpp splits N over threads); beta == 0 means C
// is not read.
void gemv_nt_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta);
void gemv_nn_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  float* C, int64_t ldc, float beta);

}  // namespace mla::cpu
