// CPU GEMM entry points for the MLA attention code, backed by oneDNN (see
// bench/results/2026-11-28-cpu-gemm-libraries.md for why).
//
// Threading: called from serial code, a GEMM uses all OpenMP threads. Called from inside an
// OpenMP parallel region (e.g. a loop over heads), each call runs single-threaded in the calling
// thread: oneDNN is built on the OpenMP runtime and drops to one thread when omp_in_parallel().
// All functions may be called concurrently from several threads.
//
// Errors from the library are thrown as mla::Error naming the status and the shape.
#pragma once

#include <cstdint>
#include <string>

namespace mla::cpu {

// C[M,N] = A[M,K] · B[N,K]ᵀ + beta·C. Row-major, leading dimensions in elements.
// As in BLAS, beta == 0 means C is not read (NaNs in C do not propagate). K == 0 gives C = beta·C.
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);
// bf16 bits in, fp32 accumulation and output (natively on avx512-bf16, else both operands widened to f32).
void gemm_nt(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);

// C[M,N] = A[M,K] · B[K,N] + beta·C. Row-major, leading dimensions in elements.
void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);
// bf16 bits in, fp32 accumulation and output.
void gemm_nn(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);

// C[M,N] = A[K,M]ᵀ · B[K,N] + beta·C, f32. Row-major, leading dimensions in elements (A stored [K, lda >= M]).
// The weight gradients of training (dW = dYᵀ·X over the tokens) and dK, dV = dSᵀ·Q, Pᵀ·dO of the attention backward.
void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);

// f32 A times bf16 B (activations against bf16 weights or cache), fp32 accumulation: the exact products, whatever
// the values of A. A few rows go to a GEMV that widens B in registers (decode reads the bf16 bytes once), more
// rows widen B to f32 panels once per call for the f32 GEMM. The bf16 layer's path where the CPU has no native
// bf16 dot product (kernels.hpp).
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);
void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta = 0.f);

// The library, the ISA it dispatches up to (capped to match kernels.hpp's variant) and the kernels serving
// these calls, e.g. "oneDNN 2.6.3 up to avx512_core_bf16 (bf16 brg:avx512_core_bf16, f32 brg:avx512_core, ...)".
std::string gemm_library_name();

}  // namespace mla::cpu
