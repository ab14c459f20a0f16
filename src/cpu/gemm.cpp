#include "gemm.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "cpu/kernels.hpp"
#include "mla/error.hpp"

namespace mla::cpu {
namespace {

// Below this M, oneDNN's sgemm (a gemv-like path) beats the f32 matmul primitive by 1.3-3x; at
// M >= 12 the sgemm driver falls off a cliff (~40 GFLOP/s at M=16) while matmul keeps rising.
// bf16 has no sgemm equivalent in oneDNN's public API and always goes through matmul.
constexpr int64_t kSgemmMaxM = 8;

// A product of f32 A and bf16 B (the bf16 path without a native bf16 dot product) with at most this many rows goes
// to the widening GEMV of kernels.hpp, which reads the bf16 bytes once; more rows amortise widening B to f32
// once per call (panel by panel) for the library's f32 GEMM, which then runs at its full rate.
constexpr int64_t kGemvMaxM = 16;
// Widened panels of B hold at most this many elements (64 MB of f32), so a huge weight does not need an
// f32 copy of itself; A is re-read once per panel.
constexpr int64_t kPanelElements = int64_t{16} << 20;

// Operand types: f32·f32, bf16·bf16, and f32 A with bf16 B (activations against bf16 weights or cache).
enum class DType : uint8_t { f32, bf16, f32_bf16 };

std::string shape_str(const char* op, DType dt, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                      int64_t ldc) {
  return std::string(op) + (dt == DType::f32 ? " f32" : dt == DType::bf16 ? " bf16" : " f32·bf16") +
         " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
         " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc);
}

[[noreturn]] void fail(const std::string& what, const std::string& shape) {
  throw Error("mla::cpu::gemm: " + what + " (" + shape + ")");
}

// The dispatcher of kernels.hpp decides for oneDNN too: a variant below the CPU's best caps the library's own
// JIT dispatch (before its first primitive), so that a forced variant is honest end to end. A DNNL_MAX_CPU_ISA
// set by the user wins; gemm_library_name() shows the ISA oneDNN ends up with.
void cap_library_isa() {
  static const bool done = [] {
    if (std::getenv("DNNL_MAX_CPU_ISA")) return true;
    dnnl::cpu_isa cap = dnnl::cpu_isa::all;
    switch (isa()) {
      case Isa::Avx512Bf16: return true;
      case Isa::Avx512: cap = dnnl::cpu_isa::avx512_core; break;
      case Isa::Avx2: cap = dnnl::cpu_isa::avx2; break;
      case Isa::Scalar: cap = dnnl::cpu_isa::sse41; break;
    }
    if (dnnl::set_max_cpu_isa(cap) != dnnl::status::success)
      throw Error("mla::cpu::gemm: cannot cap oneDNN's ISA for the " + kernel_isa() +
                  " variant (oneDNN had already dispatched)");
    return true;
  }();
  (void)done;
}

dnnl::engine& engine() {
  cap_library_isa();
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

struct Key {
  DType dt;
  bool trans_a, trans_b;
  int64_t M, N, K, lda, ldb, ldc;
  uint32_t beta_bits;
  int max_threads;  // oneDNN sizes its thread partition at creation time
  bool operator==(const Key&) const = default;
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = static_cast<size_t>(k.dt) * 4 + k.trans_a * 2 + k.trans_b;
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
    if (auto m = find(k)) return m;
    // One creator at a time, outside the map's lock so that hits never wait for a creation. oneDNN 2.6's own
    // primitive cache races when two threads create primitives at once (ThreadSanitizer reports its key compare
    // against another creator's fresh allocation, inside libdnnl); serialising creation also means a shape asked
    // for by several threads at once is built once.
    std::lock_guard create_lock(create_mu_);
    if (auto m = find(k)) return m;
    auto m = create(k);
    std::unique_lock lock(mu_);
    if (map_.size() >= kMaxEntries) map_.clear();
    return map_.try_emplace(k, std::move(m)).first->second;
  }

 private:
  static std::shared_ptr<const Matmul> create(const Key& k) {
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const dt in = k.dt == DType::f32 ? dt::f32 : dt::bf16;
    // A transposed (gemm_tn): A[K,M] row-major is logically [M,K] with strides {1, lda}.
    dnnl::memory::desc a({k.M, k.K}, in, k.trans_a ? dims{1, k.lda} : dims{k.lda, 1});
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

  std::shared_ptr<const Matmul> find(const Key& k) {
    std::shared_lock lock(mu_);
    auto it = map_.find(k);
    return it == map_.end() ? nullptr : it->second;
  }

  static constexpr size_t kMaxEntries = 4096;
  std::mutex create_mu_;
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

void run_matmul(DType dt, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                const void* B, int64_t ldb, float* C, int64_t ldc, float beta) {
  const Key key{dt, trans_a, trans_b, M, N, K, lda, ldb, ldc, std::bit_cast<uint32_t>(beta), omp_get_max_threads()};
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

// The library's f32 GEMM: sgemm for a few rows, the matmul primitive otherwise.
void gemm_f32(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
              const float* B, int64_t ldb, float* C, int64_t ldc, float beta) {
  if (M <= kSgemmMaxM) {
    const dnnl_status_t st =
        dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, 1.f, A, lda, B, ldb, beta, C, ldc);
    if (st != dnnl_success)
      fail(std::string("dnnl_sgemm failed: ") + dnnl_status2str(st), shape_str(op, DType::f32, M, N, K, lda, ldb, ldc));
    return;
  }
  run_matmul(DType::f32, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

// f32 copies of bf16 operands, per calling thread (slot 0: B panels, slot 1: A); each grows to the largest seen.
float* widen_scratch(int slot, int64_t elements) {
  thread_local std::vector<float> buf[2];
  if (buf[slot].size() < static_cast<size_t>(elements)) buf[slot].resize(static_cast<size_t>(elements));
  return buf[slot].data();
}

// dst[r, 0..cols) = f32(src[r, 0..cols)), over the threads unless already inside a parallel region.
void widen_rows(int64_t rows, int64_t cols, const uint16_t* src, int64_t lds, float* dst, int64_t ldd) {
  if (omp_in_parallel() || rows * cols < (int64_t{1} << 16)) {  // no parallel construct at all: see fast.cpp
    for (int64_t r = 0; r < rows; ++r) from_bf16(src + r * lds, dst + r * ldd, cols);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) from_bf16(src + r * lds, dst + r * ldd, cols);
}

// The widening GEMV of kernels.hpp with N split over the threads (unless already inside a parallel region) in
// whole kernel tiles: 4 rows of B (nt) or 64 columns (nn).
void gemv_bf16(bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B,
               int64_t ldb, float* C, int64_t ldc, float beta) {
  const int64_t grain = trans_b ? 4 : 64, units = (N + grain - 1) / grain;
  int64_t threads = omp_in_parallel() || N * K < (int64_t{1} << 15) ? 1 : omp_get_max_threads();
  threads = std::min(threads, units);
  auto run = [&](int64_t n0, int64_t n1) {
    if (n1 <= n0) return;
    if (trans_b) gemv_nt_bf16(M, n1 - n0, K, A, lda, B + n0 * ldb, ldb, C + n0, ldc, beta);
    else gemv_nn_bf16(M, n1 - n0, K, A, lda, B + n0, ldb, C + n0, ldc, beta);
  };
  if (threads <= 1) return run(0, N);
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    run(std::min(N, units * t / T * grain), std::min(N, units * (t + 1) / T * grain));
  }
}

// f32 A times bf16 B without a bf16 dot product: the widening GEMV for a few rows, else B widened panel by panel
// for the f32 GEMM (widening costs N·K against the GEMM's M·N·K).
void gemm_f32_bf16(const char* op, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                   const uint16_t* B, int64_t ldb, float* C, int64_t ldc, float beta) {
  if (M <= kGemvMaxM) return gemv_bf16(trans_b, M, N, K, A, lda, B, ldb, C, ldc, beta);
  const int64_t panel = std::clamp<int64_t>(kPanelElements / K, 1, N);  // columns of C per widened panel
  float* Bf = widen_scratch(0, panel * K);
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t np = std::min(panel, N - n0);
    if (trans_b) widen_rows(np, K, B + n0 * ldb, ldb, Bf, K);
    else widen_rows(K, np, B + n0, ldb, Bf, np);
    gemm_f32(op, false, trans_b, M, np, K, A, lda, Bf, trans_b ? K : np, C + n0, ldc, beta);
  }
}

// trans_a (gemm_tn) is offered for f32 only.
void gemm(const char* op, DType dt, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A,
          int64_t lda, const void* B, int64_t ldb, float* C, int64_t ldc, float beta) {
  if (M < 0 || N < 0 || K < 0) fail("negative dimension", shape_str(op, dt, M, N, K, lda, ldb, ldc));
  if (M == 0 || N == 0) return;
  if (K == 0) return scale_c(M, N, C, ldc, beta);
  cap_library_isa();
  try {
    switch (dt) {
      case DType::f32:
        return gemm_f32(op, trans_a, trans_b, M, N, K, static_cast<const float*>(A), lda, static_cast<const float*>(B),
                        ldb, C, ldc, beta);
      case DType::bf16:
        if (bf16_operands()) return run_matmul(dt, false, trans_b, M, N, K, A, lda, B, ldb, C, ldc, beta);
        {
          float* Af = widen_scratch(1, M * K);
          widen_rows(M, K, static_cast<const uint16_t*>(A), lda, Af, K);
          return gemm_f32_bf16(op, trans_b, M, N, K, Af, K, static_cast<const uint16_t*>(B), ldb, C, ldc, beta);
        }
      case DType::f32_bf16:
        return gemm_f32_bf16(op, trans_b, M, N, K, static_cast<const float*>(A), lda,
                             static_cast<const uint16_t*>(B), ldb, C, ldc, beta);
    }
  } catch (const dnnl::error& e) {
    fail(std::string("oneDNN matmul failed: ") + dnnl_status2str(e.status) + ": " + e.what(),
         shape_str(op, dt, M, N, K, lda, ldb, ldc));
  }
}

}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nt", DType::f32, false, true, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nt(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nt", DType::bf16, false, true, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nn", DType::f32, false, false, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nn", DType::bf16, false, false, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nt", DType::f32_bf16, false, true, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_nn", DType::f32_bf16, false, false, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float beta) {
  gemm("gemm_tn", DType::f32, true, false, M, N, K, A, lda, B, ldb, C, ldc, beta);
}

std::string gemm_library_name() {
  engine();  // applies the ISA cap first
  const dnnl_version_t* v = dnnl_version();
  std::string name =
      "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
  const char* max_isa = "?";
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41: max_isa = "sse41"; break;
    case dnnl::cpu_isa::avx: max_isa = "avx"; break;
    case dnnl::cpu_isa::avx2: max_isa = "avx2"; break;
    case dnnl::cpu_isa::avx2_vnni: max_isa = "avx2_vnni"; break;
    case dnnl::cpu_isa::avx512_core: max_isa = "avx512_core"; break;
    case dnnl::cpu_isa::avx512_core_vnni: max_isa = "avx512_core_vnni"; break;
    case dnnl::cpu_isa::avx512_core_bf16: max_isa = "avx512_core_bf16"; break;
    case dnnl::cpu_isa::avx512_core_amx: max_isa = "avx512_core_amx"; break;
    default: break;
  }
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
  name += std::string(" up to ") + max_isa + " (";
  if (bf16_operands()) name += "bf16 " + impl(dnnl::memory::data_type::bf16) + ", ";
  name += "f32 " + impl(dnnl::memory::data_type::f32) + ", f32 sgemm for M<=" + std::to_string(kSgemmMaxM);
  if (!bf16_operands())
    name += "; bf16 operands widened to f32: in-register GEMV for M<=" + std::to_string(kGemvMaxM) +
            ", else the f32 GEMM";
  return name + ")";
}

}  // namespace mla::cpu
