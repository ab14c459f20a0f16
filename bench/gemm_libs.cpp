// Compare CPU GEMM libraries (oneDNN vs OpenBLAS) for the shapes the MLA library needs.
//
// Build (from the repository root):
//   g++ -std=c++20 -O2 -march=native -fopenmp bench/gemm_libs.cpp -o /tmp/gemm_libs \
//       -I/usr/include/x86_64-linux-gnu -ldnnl -lopenblas -ldl
// Run:
//   OMP_NUM_THREADS=2 /tmp/gemm_libs
//
// All GEMMs are C[M,N] = A[M,K] · B[N,K]ᵀ, row-major, 2 threads. bf16 means bf16 inputs with
// fp32 accumulation and fp32 output. Each figure is the median over repeated runs after warm-up.

#include <cblas.h>
#include <dlfcn.h>
#include <omp.h>

#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

extern "C" char* openblas_get_corename(void);
extern "C" char* openblas_get_config(void);

namespace {

constexpr int kThreads = 2;

uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even; inputs here are finite
    return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median seconds per call: warm up, then repeat until ~0.4 s or 200 calls (at least 7).
double median_time(const std::function<void()>& fn) {
    for (int i = 0; i < 3; ++i) fn();
    std::vector<double> t;
    double start = now_s();
    while (t.size() < 7 || (now_s() - start < 0.4 && t.size() < 200)) {
        double t0 = now_s();
        fn();
        t.push_back(now_s() - t0);
    }
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    return t[t.size() / 2];
}

struct Shape {
    int64_t M, N, K;
};

struct Problem {
    Shape s;
    std::vector<float> A, B, C;
    std::vector<uint16_t> Ah, Bh;
    explicit Problem(Shape sh) : s(sh), A(sh.M * sh.K), B(sh.N * sh.K), C(sh.M * sh.N) {
        std::mt19937 rng(42);
        std::uniform_real_distribution<float> d(-1.f, 1.f);
        for (auto& x : A) x = d(rng);
        for (auto& x : B) x = d(rng);
        Ah.resize(A.size());
        Bh.resize(B.size());
        for (size_t i = 0; i < A.size(); ++i) Ah[i] = to_bf16(A[i]);
        for (size_t i = 0; i < B.size(); ++i) Bh[i] = to_bf16(B[i]);
    }
};

// ---- oneDNN ----
dnnl::engine& eng() {
    static dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
}

void onednn_f32(const Problem& p, float* C) {
    auto st = dnnl_sgemm('N', 'T', p.s.M, p.s.N, p.s.K, 1.f, p.A.data(), p.s.K, p.B.data(), p.s.K,
                         0.f, C, p.s.N);
    if (st != dnnl_success) std::abort();
}

// Matmul primitive: src [M,K] row-major, weights logically [K,N] with strides {1,K} (= B[N,K]
// row-major), f32 dst.
dnnl::matmul::primitive_desc make_pd(Shape s, dnnl::memory::data_type in) {
    using dt = dnnl::memory::data_type;
    dnnl::memory::desc a({s.M, s.K}, in, dnnl::memory::dims{s.K, 1});
    dnnl::memory::desc b({s.K, s.N}, in, dnnl::memory::dims{1, s.K});
    dnnl::memory::desc c({s.M, s.N}, dt::f32, dnnl::memory::dims{s.N, 1});
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), eng());
}

struct DnnlMatmul {
    dnnl::matmul prim;
    dnnl::memory a, b, c;
    dnnl::stream strm{eng()};
    std::string impl;
    DnnlMatmul(const Problem& p, float* C, bool bf16) {
        auto pd = make_pd(p.s, bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32);
        impl = pd.impl_info_str();
        prim = dnnl::matmul(pd);
        void* pa = bf16 ? (void*)p.Ah.data() : (void*)p.A.data();
        void* pb = bf16 ? (void*)p.Bh.data() : (void*)p.B.data();
        a = dnnl::memory(pd.src_desc(), eng(), pa);
        b = dnnl::memory(pd.weights_desc(), eng(), pb);
        c = dnnl::memory(pd.dst_desc(), eng(), C);
    }
    void run() {
        prim.execute(strm, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
        strm.wait();
    }
};

// ---- OpenBLAS ----
void blas_f32(const Problem& p, float* C) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.s.M, p.s.N, p.s.K, 1.f, p.A.data(),
                p.s.K, p.B.data(), p.s.K, 0.f, C, p.s.N);
}

// cblas.h declares cblas_sbgemm but Debian's 0.3.21 is built without BUILD_BFLOAT16, so the
// symbol is absent; look it up at run time so this program builds against either.
using sbgemm_fn = decltype(&cblas_sbgemm);
sbgemm_fn find_sbgemm() {
    static sbgemm_fn f = reinterpret_cast<sbgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sbgemm"));
    return f;
}

void blas_bf16(const Problem& p, float* C) {
    find_sbgemm()(CblasRowMajor, CblasNoTrans, CblasTrans, p.s.M, p.s.N, p.s.K, 1.f, p.Ah.data(),
                 p.s.K, p.Bh.data(), p.s.K, 0.f, C, p.s.N);
}

// Fallback when sbgemm is missing: widen bf16 to f32 (cost included) and call sgemm.
void blas_bf16_via_f32(const Problem& p, float* C, std::vector<float>& a, std::vector<float>& b) {
    a.resize(p.Ah.size());
    b.resize(p.Bh.size());
    for (size_t i = 0; i < a.size(); ++i) a[i] = from_bf16(p.Ah[i]);
    for (size_t i = 0; i < b.size(); ++i) b[i] = from_bf16(p.Bh[i]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.s.M, p.s.N, p.s.K, 1.f, a.data(), p.s.K,
                b.data(), p.s.K, 0.f, C, p.s.N);
}

// ---- correctness ----
double max_rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        num = std::max(num, std::abs(got[i] - ref[i]));
        den = std::max(den, std::abs(ref[i]));
    }
    return num / den;
}

void check_correctness() {
    Shape s{7, 33, 65};
    Problem p(s);
    std::vector<double> ref32(s.M * s.N), ref16(s.M * s.N);
    for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < s.N; ++n) {
            double a = 0, b = 0;
            for (int64_t k = 0; k < s.K; ++k) {
                a += double(p.A[m * s.K + k]) * p.B[n * s.K + k];
                b += double(from_bf16(p.Ah[m * s.K + k])) * from_bf16(p.Bh[n * s.K + k]);
            }
            ref32[m * s.N + n] = a;
            ref16[m * s.N + n] = b;
        }
    std::vector<float> C(s.M * s.N);
    onednn_f32(p, C.data());
    std::printf("correctness %ldx%ldx%ld (max |err| / max |ref|):\n", s.M, s.N, s.K);
    std::printf("  oneDNN   f32  %.2e\n", max_rel_err(C, ref32));
    std::fill(C.begin(), C.end(), 0.f);
    blas_f32(p, C.data());
    std::printf("  OpenBLAS f32  %.2e\n", max_rel_err(C, ref32));
    std::fill(C.begin(), C.end(), 0.f);
    DnnlMatmul(p, C.data(), false).run();
    std::printf("  oneDNN f32 matmul %.2e\n", max_rel_err(C, ref32));
    std::fill(C.begin(), C.end(), 0.f);
    DnnlMatmul(p, C.data(), true).run();
    std::printf("  oneDNN   bf16 %.2e\n", max_rel_err(C, ref16));
    if (find_sbgemm()) {
        std::fill(C.begin(), C.end(), 0.f);
        blas_bf16(p, C.data());
        std::printf("  OpenBLAS bf16 %.2e\n", max_rel_err(C, ref16));
    } else {
        std::printf("  OpenBLAS bf16 n/a (cblas_sbgemm not exported by this build)\n");
    }
    std::vector<float> a, b;
    std::fill(C.begin(), C.end(), 0.f);
    blas_bf16_via_f32(p, C.data(), a, b);
    std::printf("  OpenBLAS bf16 via f32 %.2e\n", max_rel_err(C, ref16));
}

}  // namespace

int main() {
    omp_set_num_threads(kThreads);
    openblas_set_num_threads(kThreads);
    std::printf("OpenBLAS core: %s | config: %s\n", openblas_get_corename(), openblas_get_config());
    const dnnl_version_t* v = dnnl_version();
    std::printf("oneDNN %d.%d.%d (%s), omp max threads %d\n", v->major, v->minor, v->patch, v->hash,
                omp_get_max_threads());
    check_correctness();

    std::vector<Shape> shapes;
    for (int64_t M : {1, 16, 1024})
        for (auto [N, K] : {std::pair<int64_t, int64_t>{3072, 2048}, {576, 2048}, {2048, 2048}, {4096, 512}})
            shapes.push_back({M, N, K});
    shapes.push_back({2048, 2048, 2048});

    std::vector<Problem> probs;
    for (auto s : shapes) probs.emplace_back(s);

    // One library at a time so that idle-spinning threads of the other runtime don't compete.
    std::vector<double> t_df(shapes.size()), t_db(shapes.size()), t_bf(shapes.size()), t_bb(shapes.size(), NAN),
        t_bc(shapes.size());
    std::vector<double> create_cold(shapes.size()), create_hit(shapes.size());
    std::vector<std::string> impl(shapes.size()), impl_f32(shapes.size());
    std::vector<double> t_dm(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
        auto& p = probs[i];
        t_df[i] = median_time([&] { onednn_f32(p, p.C.data()); });
        double t0 = now_s();
        DnnlMatmul mm(p, p.C.data(), true);
        create_cold[i] = now_s() - t0;
        t0 = now_s();
        { DnnlMatmul again(p, p.C.data(), true); }  // identical descriptor: oneDNN primitive cache hit
        create_hit[i] = now_s() - t0;
        impl[i] = mm.impl;
        t_db[i] = median_time([&] { mm.run(); });
        DnnlMatmul mf(p, p.C.data(), false);
        impl_f32[i] = mf.impl;
        t_dm[i] = median_time([&] { mf.run(); });
    }
    for (size_t i = 0; i < shapes.size(); ++i) {
        auto& p = probs[i];
        t_bf[i] = median_time([&] { blas_f32(p, p.C.data()); });
        if (find_sbgemm()) t_bb[i] = median_time([&] { blas_bf16(p, p.C.data()); });
        std::vector<float> a, b;
        t_bc[i] = median_time([&] { blas_bf16_via_f32(p, p.C.data(), a, b); });
    }

    std::printf("\n| M | N | K | oneDNN sgemm f32 | oneDNN matmul f32 | OpenBLAS f32 | oneDNN bf16 | OpenBLAS sbgemm | OpenBLAS bf16→f32+sgemm | "
                "oneDNN bf16 create cold / cache hit (us) | oneDNN matmul impl f32 / bf16 |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for (size_t i = 0; i < shapes.size(); ++i) {
        auto s = shapes[i];
        double gf = 2.0 * s.M * s.N * s.K * 1e-9;
        std::printf("| %ld | %ld | %ld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f / %.1f | %s / %s |\n",
                    s.M, s.N, s.K, gf / t_df[i], gf / t_dm[i], gf / t_bf[i], gf / t_db[i], gf / t_bb[i], gf / t_bc[i], create_cold[i] * 1e6,
                    create_hit[i] * 1e6, impl_f32[i].c_str(), impl[i].c_str());
    }

    // Where oneDNN's sgemm (gemv path) stops beating the f32 matmul primitive.
    std::printf("\nsmall-M crossover, N=K=2048, f32 GFLOP/s:\n| M | oneDNN sgemm | oneDNN matmul |\n|---:|---:|---:|\n");
    for (int64_t M : {1, 2, 3, 4, 6, 8, 12}) {
        Problem p({M, 2048, 2048});
        double gf = 2.0 * M * 2048 * 2048 * 1e-9;
        double ts = median_time([&] { onednn_f32(p, p.C.data()); });
        DnnlMatmul mf(p, p.C.data(), false);
        double tm = median_time([&] { mf.run(); });
        std::printf("| %ld | %.1f | %.1f |\n", M, gf / ts, gf / tm);
    }
    return 0;
}
