#include "cuda/common/gemm.hpp"

#include <bit>
#include <string>

namespace mla::cuda {
namespace {

constexpr int64_t kWorkspaceBytes = 32 << 20;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: throw InvalidArgument("cuda gemm: unsupported element type " + std::string(dtype_name(t)));
  }
}

// Largest power of two (<= 256) dividing the address: cuBLASLt assumes 256-byte alignment unless told.
uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  return v == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(256, v & (~v + 1)));
}

cublasLtMatrixLayout_t layout(cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  cublasLtMatrixLayout_t l;
  MLA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, t, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  if (batch > 1) {
    const auto count = static_cast<int32_t>(batch);
    MLA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    MLA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                      sizeof(stride)));
  }
  return l;
}

}  // namespace

Gemm::Gemm() : workspace_(kWorkspaceBytes) { MLA_CUBLAS_CHECK(cublasLtCreate(&handle_)); }

Gemm::~Gemm() {
  for (auto& [k, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  if (handle_) cublasLtDestroy(handle_);
}

// Row-major C[m,n] = A[m,k]·op(B) is column-major Cᵀ[n,m] = op(B)ᵀ[n,k]·Aᵀ[k,m]: cuBLASLt's first operand is
// our B, its second our A (no transpose: a row-major [m,k] buffer is a column-major [k,m] one).
Gemm::Plan& Gemm::plan(const GemmArgs& g) {
  const Key key{g.m, g.n, g.k, g.lda, g.stride_a, g.ldb, g.stride_b, g.b_transposed, g.ldc, g.stride_c, g.batch,
                g.beta != 0.f, static_cast<int64_t>(g.ab_type), static_cast<int64_t>(g.c_type), alignment(g.a),
                alignment(g.b), alignment(g.c)};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;

  Plan p;
  const cudaDataType_t ab = cuda_type(g.ab_type), ct = cuda_type(g.c_type);
  MLA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = g.b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  MLA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MLA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  // Stored shapes before the operation, column-major.
  p.a = g.b_transposed ? layout(ab, g.k, g.n, g.ldb, g.batch, g.stride_b) : layout(ab, g.n, g.k, g.ldb, g.batch, g.stride_b);
  p.b = layout(ab, g.k, g.m, g.lda, g.batch, g.stride_a);
  p.c = layout(ct, g.n, g.m, g.ldc, g.batch, g.stride_c);

  cublasLtMatmulPreference_t pref;
  MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t al_a = alignment(g.b), al_b = alignment(g.a), al_c = alignment(g.c);
  MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    throw Error("cuda gemm: cuBLASLt has no algorithm for m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) +
                " k=" + std::to_string(g.k) + " batch=" + std::to_string(g.batch) + " (" +
                cublasLtGetStatusString(st) + ")");
  p.algo = result.algo;
  return plans_.emplace(key, p).first->second;
}

void Gemm::run(const GemmArgs& g, cudaStream_t stream) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  std::lock_guard lock(mutex_);
  if (g.k == 0) throw InvalidArgument("cuda gemm: k must be positive");
  Plan& p = plan(g);
  const float alpha = 1.f, beta = g.beta;
  MLA_CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, g.b, p.a, g.a, p.b, &beta, g.c, p.c, g.c, p.c, &p.algo,
                                  workspace_.get(), kWorkspaceBytes, stream));
}

}  // namespace mla::cuda
