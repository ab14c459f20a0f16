// Row-major GEMMs through cuBLASLt: bf16 (or f32) operands, fp32 accumulation, f32 or bf16 output.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "cuda/common/device_memory.hpp"
#include "mla/dtype.hpp"

namespace mla::cuda {

// C[m, n] (+)= A[m, k] · op(B), every matrix row-major with the given row strides (elements), `batch` copies
// `stride_*` elements apart (0: shared by every batch entry).
struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;  // [m, k], row stride lda
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;  // b_transposed: [n, k] (a weight stored [out, in]); else [k, n]
  int64_t ldb = 0, stride_b = 0;
  bool b_transposed = true;
  void* c = nullptr;        // [m, n], row stride ldc
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
  float beta = 0.f;
  DType ab_type = DType::BF16;  // BF16 or F32
  DType c_type = DType::F32;    // F32, or BF16 (rounded to nearest even from the fp32 result)
};

class Gemm {
 public:
  Gemm();
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  void run(const GemmArgs& g, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  using Key = std::vector<int64_t>;
  Plan& plan(const GemmArgs& g);

  cublasLtHandle_t handle_ = nullptr;
  DeviceArray workspace_;
  std::mutex mutex_;
  std::map<Key, Plan> plans_;
};

}  // namespace mla::cuda
