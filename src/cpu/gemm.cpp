#include "gemm.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>

#include <bit>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "mla/error.hpp"

namespace mla::cpu {
namespace {

// Below this M, oneDNN's sgemm (a gemv-like path) beats the f32 matmul primitive by 1.3-3x; at
// M >= 12 the sgemm driver falls off a cliff (~40 GFLOP/s at M=16) while matmul keeps rising.
// bf16 has no sgemm equivalent in oneDNN's public API and always goes through matmul.
constexpr int64_t kSgemmMaxM = 8;

enum class DType : uint8_t { f32, bf16 };

std::string shape_str(const char* op, DType dt, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                      int64_t ldc) {
  return std::string(op) + (dt == DType::f32 ? " f32" : " bf16") + " M=" + std::to_string(M) +
         " N=" + std::to_string(N) + " K=" + std::to_string(K) + " lda=" + std::to_string(lda) +
         " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc);
}

[[noreturn]] void fail(const std::string& what, const std::string& shape) {
  throw Error("mla::cpu::gemm: " + what + " (" + shape + ")");
}

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

struct Key {
  DType dt;
  bool trans_b;
  int64_t M, N, K, lda, ldb, ldc;
  uint32_t beta_bits;
  int max_threads;  // oneDNN sizes its thread partition at creation time
  bool operator==(const Key&) const = default;
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = static_cast<size_t>(k.dt) * 2 + k.trans_b;
    for (int64_t v : {k.M, k.N, k.K, k.lda, k.ldb, k.ldc, int64_t(k.beta_bits), int64_t(k.max_threads)})
      h = (h ^ static_cast<size_t>(v)) * 0x9e3779b97f4a7c15ull;
    return h;
  }
};

struct Matmul {
  dnnl::matmul prim;
  dnnl::memory::desc a, b, c, scratch;
};

// Building a matmul primitive costs ~0.3 ms (and ~10-40 us even on a hit in oneDNN's own
// primitive cache, which still re-creates the primitive descriptor), far more than a small GEMM,
// so primitives are kept per shape. The layer's shapes follow the request (tokens per call, the last key
// block's length, the last query tile), so a long-running server would otherwise collect them without
// bound: past kMaxEntries the map is emptied and refilled by the shapes in use (callers holding a
// shared_ptr keep theirs alive).
class MatmulCache {
 public:
  std::shared_ptr<const Matmul> get(const Key& k) {
    {
      std::shared_lock lock(mu_);
      if (auto it = map_.find(k); it != map_.end()) return it->second;
    }
    auto m = create(k);  // outside the lock: creation is slow and oneDNN is thread-safe here
    std::unique_lock lock(mu_);
    if (map_.size() >= kMaxEntries) map_.clear();
    return map_.try_emplace(k, std::move(m)).first->second;
  }

 private:
  static std::shared_ptr<const Matmul> create(const Key& k) {
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const dt in = k.dt == DType::f32 ? dt::f32 : dt::bf16;
    dnnl::memory::desc a({k.M, k.K}, in, dims{k.lda, 1});
    // Weights are logically [K,N]; B[N,K] row-major is the same matrix with strides {1, ldb}.
    dnnl::memory::desc b({k.K, k.N}, in, k.trans_b ? dims{1, k.ldb} : dims{k.ldb, 1});
    dnnl::memory::desc c({k.M, k.N}, dt::f32, dims{k.ldc, 1});
    dnnl::primitive_attr attr;
    // User scratchpad: the library-managed one is shared between primitives unless oneDNN is
    // built with DNNL_ENABLE_CONCURRENT_EXEC, which would make concurrent calls unsafe.
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const float beta = std::bit_cast<float>(k.beta_bits);
    if (beta != 0.f) {
      dnnl::post_ops po;
      po.append_sum(beta);  // dst = beta·dst + A·B
      attr.set_post_ops(po);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, engine());
    return std::make_shared<const Matmul>(
        Matmul{dnnl::matmul(pd), pd.src_desc(), pd.weights_desc(), pd.dst_desc(), pd.scratchpad_desc()});
  }

  static constexpr size_t kMaxEntries = 4096;
  std::shared_mutex mu_;
  std::unordered_map<Key, std::shared_ptr<const Matmul>, KeyHash> map_;
};

MatmulCache& cache() {
  static MatmulCache c;
  return c;
}

void* thread_scratchpad(size_t bytes) {
  constexpr size_t kAlign = 64;
  thread_local std::vector<std::byte> buf;
  if (buf.size() < bytes + kAlign) buf.resize(bytes + kAlign);
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<void*>((p + kAlign - 1) & ~(kAlign - 1));
}

void run_matmul(DType dt, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
                int64_t ldb, float* C, int64_t ldc, float beta) {
  const Key key{dt, trans_b, M, N, K, lda, ldb, ldc, std::bit_cast<uint32_t>(beta), omp_get_max_threads()};
  auto mm = cache().get(key);
  auto& eng = engine();
  thread_local dnnl::stream strm(engine());
  dnnl::memory a(mm->a, eng, const_cast<void*>(A));
  dnnl::memory b(mm->b, eng, const_cast<void*>(B));
  dnnl::memory c(mm->c, eng, C);
  dnnl::memory s(mm->scratch, eng, thread_scratchpad(mm->scratch.get_size()));
  mm->prim.execute(strm, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}, {DNNL_ARG_SCRATCHPAD, s}});
  strm.wait();
}

void scale_c(int64_t M, int64_t N, float* C, int64_t ldc, float beta) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = C + m * ldc;
    if (beta == 0.f)
      std::memset(row, 0, sizeof(float) * N);
    else
      for (int64_t n = 0; n < N; ++n) row[n] *= beta;
  }
}

void gemm(const char* op, DType dt, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
          const void* B, int64_t ldb, float* C, int64_t ldc, float beta) {
  if (M < 0 || N < 0 || K < 0) fail("negative dimension", shape_str(op, dt, M, N, K, lda, ldb, ldc));
  if (M == 0 || N == 0) return;
  if (K == 0) return scale_c(M, N, C, ldc, beta);
  try {
    if (dt == DType::f32 && M <= kSgemmMaxM) {
      const dnnl_status_t st = dnnl_sgemm('N', trans_b ? 'T' : 'N', M, N, K, 1.f, static_cast<const float*>(A), lda,
                                          static_cast<const float*>(B), ldb, beta, C, ldc);
      if (st != dnnl_success)
        fail(std::string("dnnl_sgemm failed: ") + dnnl_status2str(st), shape_str(op, dt, M, N, K, lda, ldb, ldc));
      return;
    }
    run_matmul(dt, trans_b, M, N, K, A, lda, B, ldb, C, ldc, beta);
  } catch (const dnnl::error& e) {
    fail(std::string("oneDNN matmul failed: ") + dnnl_status2str(e.status) + ": " + e.what(),
         shape_str(op, dt, M, N, K, lda, ldb, ldc));
  }
}

}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nt", DType::f32, true, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nt(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nt", DType::bf16, true, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nn", DType::f32, false, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nn", DType::bf16, false, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

std::string gemm_library_name() {
  const dnnl_version_t* v = dnnl_version();
  std::string name =
      "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
  // Report the kernels the matmul primitive actually dispatches to on this CPU.
  auto impl = [](dnnl::memory::data_type in) -> std::string {
    using dims = dnnl::memory::dims;
    dnnl::memory::desc a({64, 64}, in, dims{64, 1}), b({64, 64}, in, dims{1, 64}),
        c({64, 64}, dnnl::memory::data_type::f32, dims{64, 1});
    try {
      return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), engine()).impl_info_str();
    } catch (const dnnl::error&) {
      return "unavailable";
    }
  };
  return name + " (bf16 " + impl(dnnl::memory::data_type::bf16) + ", f32 " + impl(dnnl::memory::data_type::f32) +
         ", f32 sgemm for M<=" + std::to_string(kSgemmMaxM) + ")";
}

}  // namespace mla::cpu
