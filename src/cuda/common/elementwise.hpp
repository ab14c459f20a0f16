// The layer's small kernels around the GEMMs: input conversion with the non-finite check, RMSNorm, RoPE and
// the paged-cache write, gathers, the output commit. Elements are `dtype` (F32 or BF16) where a pointer is void.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/fp8_row.cuh"
#include "mla/dtype.hpp"

namespace mla::cuda {

// out[i] = dtype(in[i]); *first_bad = min(flat index of a non-finite input) (left alone when all are finite).
void convert_checked(const float* in, void* out, DType dtype, int64_t n, unsigned long long* first_bad,
                     cudaStream_t stream);

// out[r, :d] = dtype(γ ⊙ y / sqrt(mean(y²) + eps)) with y = in[r, :d] + bias (bias may be null).
void rms_norm_rows(const float* in, int64_t ld_in, const float* bias, const float* gamma, float eps, int64_t rows,
                   int64_t d, void* out, DType dtype, cudaStream_t stream);

struct RopeTable {
  const float* inv_freq = nullptr;  // [d_r / 2] ω_i
  float magnitude = 1.f;            // A
};

// Queries: q_f32 [N, H·d_qk] (+ bias [H·d_qk], may be null) → rounded to dtype, rope dims rotated at the
// token's position → q [N, H, d_qk]. When qa is not null, the rotated rope dims also go to
// qa [N, H, row_width] at column d_c (the absorbed query's tail). With q_f32 null, q already holds the
// rounded queries (the GEMM wrote them in dtype; no bias): only the rope dims are rotated, in place.
struct QueryFinish {
  const float* q_f32 = nullptr;
  const float* bias = nullptr;
  const int64_t* positions = nullptr;  // [N], device
  int64_t tokens = 0, heads = 0, d_nope = 0, d_rope = 0;
  void* q = nullptr;
  void* qa = nullptr;
  int64_t row_width = 0, d_c = 0;
  DType dtype = DType::BF16;
  RopeTable rope;
};
void finish_queries(const QueryFinish& p, cudaStream_t stream);

// Latents: kv [N, d_c + d_r] f32 (+ bias, may be null) → [RMSNorm(c)·γ | RoPE(k_pe)] in dtype, written to
// cache row slots[i]. Writes nothing at all when *error_flag != ~0 (a non-finite input was found); a row that comes
// out non-finite is not written and sets the flag to at most kBadLatentRow | i.
struct LatentStore {
  const float* kv = nullptr;           // [N, d_c + d_r] with row stride ld_kv
  int64_t ld_kv = 0;
  const float* bias = nullptr;
  const float* gamma = nullptr;        // [d_c]
  const int64_t* positions = nullptr;  // [N], device
  const int64_t* slots = nullptr;      // [N] cache row index (page · page_size + offset), device
  unsigned long long* error_flag = nullptr;
  int64_t tokens = 0, d_c = 0, d_rope = 0;
  void* cache = nullptr;               // [num_pages · page_size, d_c + d_r] of dtype, or fp8 rows
  DType dtype = DType::BF16;           // F32, BF16, or F8_E4M3 (rows laid out as fp8)
  Fp8Row fp8;                          // F8_E4M3: the row's byte offsets
  float eps = 1e-6f;
  RopeTable rope;
};
void store_latents(const LatentStore& p, cudaStream_t stream);

// dst [L, W] = cache rows 0..L-1 of one sequence (block_table [ceil(L / page_size)], device), in dtype; from an
// fp8 cache (cache_dtype F8_E4M3, rows `fp8`) dequantised into bf16 (dtype must then be BF16).
void gather_rows(const void* cache, const int32_t* block_table, int64_t page_size, int64_t rows, int64_t width,
                 void* dst, DType dtype, cudaStream_t stream, DType cache_dtype = DType::BF16, Fp8Row fp8 = {});

// Splits expanded rows kv [L, H, d_n + d_v] (lat · kv_bᵀ) into k [L, H, d_qk] = [k_nope | shared rope key
// from lat [L, W] column d_c] and v [L, H, d_v].
void split_expanded(const void* kv, const void* lat, int64_t width, int64_t d_c, int64_t rows, int64_t heads,
                    int64_t d_nope, int64_t d_rope, int64_t d_v, void* k, void* v, DType dtype, cudaStream_t stream);

// The layer's error flag: ~0 = no error; else the smallest of the flat index of a non-finite hidden state,
// kBadLatentRow | row of a non-finite cache row, kBadOutputRow | row of a non-finite output row.
constexpr unsigned long long kBadLatentRow = 1ull << 62, kBadOutputRow = 2ull << 62;

// Sets the flag to at most kBadOutputRow | r when row r of y [rows, n] + bias [n] holds a non-finite value.
void check_rows_finite(const float* y, const float* bias, int64_t rows, int64_t n, unsigned long long* error_flag,
                       cudaStream_t stream);

// out [rows, n] = y [rows, n] + bias [n] (bias may be null), only when *error_flag == ~0: the layer's last step,
// so that a rejected batch leaves the caller's output as it was.
void commit_rows(const float* y, const float* bias, const unsigned long long* error_flag, int64_t rows, int64_t n,
                 float* out, cudaStream_t stream);

}  // namespace mla::cuda
