#include "cpu/gemm.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

namespace {

using mla::cpu::gemm_nn;
using mla::cpu::gemm_nt;

uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even; test data is finite
    return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct Case {
    int64_t M, N, K, lda, ldb, ldc;  // ldb is for B as stored: [N,K] for nt, [K,N] for nn
    float beta;
};

// Holds A, B and C for one case with random contents, padding included, so that ld > K
// checks that padding is neither read into the result nor written.
struct Data {
    std::vector<float> A, B, C;
    std::vector<uint16_t> Ah, Bh;
    Data(const Case& c, bool trans_b, uint32_t seed) {
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> d(-1.f, 1.f);
        A.resize(c.M * c.lda);
        B.resize((trans_b ? c.N : c.K) * c.ldb);
        C.resize(c.M * c.ldc);
        for (auto& x : A) x = d(rng);
        for (auto& x : B) x = d(rng);
        for (auto& x : C) x = d(rng);
        for (float x : A) Ah.push_back(to_bf16(x));
        for (float x : B) Bh.push_back(to_bf16(x));
    }
};

// Checks C against a double-precision loop over the given inputs. The tolerance is relative to
// Σ|a·b| + |beta·c|, the scale that bounds fp32 accumulation-order error; comparing to |C| alone
// would be meaningless where the sum cancels.
template <typename GetA, typename GetB>
void expect_matches(const Case& c, bool trans_b, GetA a, GetB b, const std::vector<float>& C0,
                    const std::vector<float>& C, double rtol) {
    for (int64_t m = 0; m < c.M; ++m)
        for (int64_t n = 0; n < c.ldc; ++n) {
            const float got = C[m * c.ldc + n];
            const float old = C0[m * c.ldc + n];
            if (n >= c.N) {
                ASSERT_EQ(got, old) << "padding written at m=" << m << " n=" << n;
                continue;
            }
            double sum = 0, mag = 0;
            for (int64_t k = 0; k < c.K; ++k) {
                const double p = double(a(m * c.lda + k)) * b(trans_b ? n * c.ldb + k : k * c.ldb + n);
                sum += p;
                mag += std::abs(p);
            }
            if (c.beta != 0.f) {
                sum += double(c.beta) * old;
                mag += std::abs(double(c.beta) * old);
            }
            ASSERT_NEAR(got, sum, rtol * mag + 1e-30)
                << "m=" << m << " n=" << n << " M=" << c.M << " N=" << c.N << " K=" << c.K;
        }
}

void check_f32(const Case& c, bool trans_b, uint32_t seed) {
    Data d(c, trans_b, seed);
    const auto C0 = d.C;
    (trans_b ? static_cast<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                    int64_t, float*, int64_t, float)>(gemm_nt)
             : static_cast<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                    int64_t, float*, int64_t, float)>(gemm_nn))(
        c.M, c.N, c.K, d.A.data(), c.lda, d.B.data(), c.ldb, d.C.data(), c.ldc, c.beta);
    expect_matches(c, trans_b, [&](int64_t i) { return d.A[i]; }, [&](int64_t i) { return d.B[i]; },
                   C0, d.C, 1e-5);
}

void check_bf16(const Case& c, bool trans_b, uint32_t seed) {
    Data d(c, trans_b, seed);
    const auto C0 = d.C;
    (trans_b ? static_cast<void (*)(int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                                    const uint16_t*, int64_t, float*, int64_t, float)>(gemm_nt)
             : static_cast<void (*)(int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                                    const uint16_t*, int64_t, float*, int64_t, float)>(gemm_nn))(
        c.M, c.N, c.K, d.Ah.data(), c.lda, d.Bh.data(), c.ldb, d.C.data(), c.ldc, c.beta);
    // bf16·bf16 products are exact in fp32, so only the accumulation order differs.
    expect_matches(c, trans_b, [&](int64_t i) { return from_bf16(d.Ah[i]); },
                   [&](int64_t i) { return from_bf16(d.Bh[i]); }, C0, d.C, 1e-5);
}

// f32 A against bf16 B: the exact products of the f32 values and the bf16 weights, fp32 accumulation.
void check_f32_bf16(const Case& c, bool trans_b, uint32_t seed) {
    Data d(c, trans_b, seed);
    const auto C0 = d.C;
    (trans_b ? static_cast<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t,
                                    float*, int64_t, float)>(gemm_nt)
             : static_cast<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t,
                                    float*, int64_t, float)>(gemm_nn))(
        c.M, c.N, c.K, d.A.data(), c.lda, d.Bh.data(), c.ldb, d.C.data(), c.ldc, c.beta);
    expect_matches(c, trans_b, [&](int64_t i) { return d.A[i]; }, [&](int64_t i) { return from_bf16(d.Bh[i]); },
                   C0, d.C, 1e-5);
}

// Shapes cover the sgemm path (f32, M <= 8) and the matmul path, odd sizes, padded leading
// dimensions and beta in {0, 1, 0.5}. ldb is filled in per layout.
std::vector<Case> cases(bool trans_b) {
    struct S {
        int64_t M, N, K, pad;
        float beta;
    };
    const S shapes[] = {
        {1, 17, 1013, 0, 0.f},  {1, 576, 2048, 0, 0.f}, {1, 1013, 17, 3, 1.f},   {3, 64, 128, 5, 0.5f},
        {8, 1013, 33, 0, 1.f},  {9, 17, 1013, 7, 0.f},  {16, 576, 512, 0, 0.f},  {17, 17, 17, 1, 1.f},
        {64, 1013, 64, 16, 0.f}, {130, 96, 1013, 0, 1.f}, {257, 300, 129, 9, 0.5f},
    };
    std::vector<Case> out;
    for (const S& s : shapes) {
        Case c{s.M, s.N, s.K, s.K + s.pad, 0, s.N + s.pad, s.beta};
        c.ldb = (trans_b ? s.K : s.N) + s.pad;
        out.push_back(c);
    }
    return out;
}

TEST(Gemm, NtF32) {
    uint32_t seed = 1;
    for (const Case& c : cases(true)) check_f32(c, true, seed++);
}

TEST(Gemm, NnF32) {
    uint32_t seed = 100;
    for (const Case& c : cases(false)) check_f32(c, false, seed++);
}

// gemm_tn: A stored [K, lda >= M] (transposed), B [K, ldb >= N]; the same shapes, beta and padding as above, each
// element against a double loop with the tolerance of expect_matches.
TEST(Gemm, TnF32) {
    uint32_t seed = 150;
    for (const Case& c0 : cases(false)) {
        Case c = c0;
        c.lda = c.M + (c0.lda - c0.K);  // the same padding, now past M
        std::mt19937 rng(seed++);
        std::uniform_real_distribution<float> d(-1.f, 1.f);
        std::vector<float> A(c.K * c.lda), B(c.K * c.ldb), C(c.M * c.ldc);
        for (auto* v : {&A, &B, &C})
            for (auto& x : *v) x = d(rng);
        const auto C0 = C;
        mla::cpu::gemm_tn(c.M, c.N, c.K, A.data(), c.lda, B.data(), c.ldb, C.data(), c.ldc, c.beta);
        for (int64_t m = 0; m < c.M; ++m)
            for (int64_t n = 0; n < c.ldc; ++n) {
                const float got = C[m * c.ldc + n], old = C0[m * c.ldc + n];
                if (n >= c.N) {
                    ASSERT_EQ(got, old) << "padding written at m=" << m << " n=" << n;
                    continue;
                }
                double sum = 0, mag = 0;
                for (int64_t k = 0; k < c.K; ++k) {
                    const double p = double(A[k * c.lda + m]) * B[k * c.ldb + n];
                    sum += p, mag += std::abs(p);
                }
                if (c.beta != 0.f) sum += double(c.beta) * old, mag += std::abs(double(c.beta) * old);
                ASSERT_NEAR(got, sum, 1e-5 * mag + 1e-30) << "m=" << m << " n=" << n << " M=" << c.M << " N=" << c.N
                                                          << " K=" << c.K;
            }
    }
}

TEST(Gemm, NtBf16) {
    uint32_t seed = 200;
    for (const Case& c : cases(true)) check_bf16(c, true, seed++);
}

TEST(Gemm, NnBf16) {
    uint32_t seed = 300;
    for (const Case& c : cases(false)) check_bf16(c, false, seed++);
}

// Covers the widening GEMV (M <= 16) and the widened-panel path (more rows).
TEST(Gemm, NtF32TimesBf16) {
    uint32_t seed = 400;
    for (const Case& c : cases(true)) check_f32_bf16(c, true, seed++);
}

TEST(Gemm, NnF32TimesBf16) {
    uint32_t seed = 500;
    for (const Case& c : cases(false)) check_f32_bf16(c, false, seed++);
}

// B larger than one widened panel (16 Mi elements): the panels must tile N exactly, in both layouts. Checked row
// by row against the GEMV path (M = 1, itself checked against double loops above), with Σ|a·b| from |A|·|B|.
TEST(Gemm, F32TimesBf16OverSeveralPanels) {
    for (bool trans_b : {true, false}) {
        const Case c{17, 4099, 4097, 4097, trans_b ? 4097 : 4099, 4099, trans_b ? 0.5f : 0.f};
        Data d(c, trans_b, 600);
        const auto C0 = d.C;
        auto run = trans_b ? static_cast<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*,
                                                  int64_t, float*, int64_t, float)>(gemm_nt)
                           : static_cast<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*,
                                                  int64_t, float*, int64_t, float)>(gemm_nn);
        run(c.M, c.N, c.K, d.A.data(), c.lda, d.Bh.data(), c.ldb, d.C.data(), c.ldc, c.beta);
        std::vector<float> absA(d.A.size()), mag(c.N), ref(c.N);
        std::vector<uint16_t> absB(d.Bh.size());
        for (size_t i = 0; i < absA.size(); ++i) absA[i] = std::abs(d.A[i]);
        for (size_t i = 0; i < absB.size(); ++i) absB[i] = d.Bh[i] & 0x7fffu;
        for (int64_t m = 0; m < c.M; ++m) {
            run(1, c.N, c.K, &d.A[m * c.lda], c.lda, d.Bh.data(), c.ldb, ref.data(), c.N, 0.f);
            run(1, c.N, c.K, &absA[m * c.lda], c.lda, absB.data(), c.ldb, mag.data(), c.N, 0.f);
            for (int64_t n = 0; n < c.N; ++n) {
                const double old = C0[m * c.ldc + n];
                ASSERT_NEAR(d.C[m * c.ldc + n], ref[n] + c.beta * old, 2e-5 * (mag[n] + std::abs(c.beta * old)))
                    << "trans_b=" << trans_b << " m=" << m << " n=" << n;
            }
        }
    }
}

TEST(Gemm, RepeatedShapeReusesCachedPrimitive) {
    // Second call of the same shape hits the primitive cache; different data must still be used.
    for (uint32_t seed : {7u, 8u}) check_bf16({33, 65, 129, 129, 129, 65, 0.f}, true, seed);
}

TEST(Gemm, EmptyDimensions) {
    std::vector<float> A(4 * 4, 1.f), B(4 * 4, 1.f), C(4 * 4, 2.f);
    gemm_nt(0, 4, 4, A.data(), 4, B.data(), 4, C.data(), 4);
    gemm_nt(4, 0, 4, A.data(), 4, B.data(), 4, C.data(), 4);
    for (float x : C) EXPECT_EQ(x, 2.f);
    gemm_nt(4, 4, 0, A.data(), 4, B.data(), 4, C.data(), 4, 0.5f);  // K=0: C = beta·C
    for (float x : C) EXPECT_EQ(x, 1.f);
    std::vector<uint16_t> Ah(16, to_bf16(1.f)), Bh(16, to_bf16(1.f));
    C.assign(16, NAN);
    gemm_nn(4, 4, 0, Ah.data(), 4, Bh.data(), 4, C.data(), 4);  // beta=0 must not read C
    for (float x : C) EXPECT_EQ(x, 0.f);
}

TEST(Gemm, BetaZeroIgnoresNanInC) {
    std::vector<float> A(8 * 16, 1.f), B(16 * 32, 1.f), C(8 * 32, NAN), C2(64 * 32, NAN),
        A2(64 * 16, 1.f);
    gemm_nn(8, 32, 16, A.data(), 16, B.data(), 32, C.data(), 32);  // sgemm path
    for (float x : C) EXPECT_EQ(x, 16.f);
    gemm_nn(64, 32, 16, A2.data(), 16, B.data(), 32, C2.data(), 32);  // matmul path
    for (float x : C2) EXPECT_EQ(x, 16.f);
}

TEST(Gemm, LibraryErrorThrowsWithShape) {
    std::vector<float> A(64), B(64), C(64);
    try {
        gemm_nt(1, 4, 8, A.data(), 8, B.data(), 2 /* ldb < K */, C.data(), 4);
        FAIL() << "expected std::runtime_error";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("K=8"), std::string::npos) << e.what();
    }
    EXPECT_THROW(gemm_nt(-1, 4, 8, A.data(), 8, B.data(), 8, C.data(), 4), std::runtime_error);
}

TEST(Gemm, LibraryName) {
    const std::string name = mla::cpu::gemm_library_name();
    std::printf("gemm_library_name(): %s\n", name.c_str());
    EXPECT_NE(name.find("oneDNN"), std::string::npos);
}

#ifdef __linux__
size_t os_thread_count() {
    size_t n = 0;
    for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
    return n;
}
#endif

// The attention code calls GEMMs from inside `omp parallel for` over heads. Each call must be
// correct and run in its calling thread only (no nested thread teams).
TEST(Gemm, InsideOmpParallelRegion) {
    constexpr int kProblems = 8;
    std::vector<Case> cs;
    for (int i = 0; i < kProblems; ++i) {
        const int64_t M = i % 2 ? 1 : 96 + i, N = 200 + 17 * i, K = 256 + 3 * i;
        cs.push_back({M, N, K, K, K, N, i % 3 == 0 ? 1.f : 0.f});
    }
    std::vector<Data> f32, bf16, mixed;
    for (int i = 0; i < kProblems; ++i) {
        f32.emplace_back(cs[i], true, 500 + i);
        bf16.emplace_back(cs[i], true, 600 + i);
        mixed.emplace_back(cs[i], true, 700 + i);
    }
    const auto f32_c0 = f32, bf16_c0 = bf16, mixed_c0 = mixed;

    // Allow nesting, so that a GEMM opening its own parallel region would add OS threads (nested
    // teams exist only while they run, hence the sampler; a nested busy region is seen by it).
    const int old_levels = omp_get_max_active_levels();
    omp_set_max_active_levels(4);
    gemm_nt(64, 64, 64, f32[0].A.data(), 64, f32[0].B.data(), 64, std::vector<float>(64 * 64).data(), 64);
#ifdef __linux__
    const size_t threads_before = os_thread_count();
    std::atomic<bool> stop{false};
    std::atomic<size_t> max_seen{0};
    std::thread sampler([&] {
        while (!stop) {
            max_seen = std::max(max_seen.load(), os_thread_count() - 1);  // minus the sampler
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    });
#endif
    for (int rep = 0; rep < 20; ++rep) {
        for (int i = 0; i < kProblems; ++i) {
            f32[i].C = f32_c0[i].C;
            bf16[i].C = bf16_c0[i].C;
            mixed[i].C = mixed_c0[i].C;
        }
#pragma omp parallel for schedule(dynamic, 1)
        for (int i = 0; i < kProblems; ++i) {
            const Case& c = cs[i];
            gemm_nt(c.M, c.N, c.K, f32[i].A.data(), c.lda, f32[i].B.data(), c.ldb, f32[i].C.data(), c.ldc, c.beta);
            gemm_nt(c.M, c.N, c.K, bf16[i].Ah.data(), c.lda, bf16[i].Bh.data(), c.ldb, bf16[i].C.data(),
                    c.ldc, c.beta);
            gemm_nt(c.M, c.N, c.K, mixed[i].A.data(), c.lda, mixed[i].Bh.data(), c.ldb, mixed[i].C.data(),
                    c.ldc, c.beta);
        }
    }
#ifdef __linux__
    stop = true;
    sampler.join();
    EXPECT_EQ(max_seen.load(), threads_before) << "a GEMM inside a parallel region spawned threads";
#endif
    omp_set_max_active_levels(old_levels);

    for (int i = 0; i < kProblems; ++i) {
        const Case& c = cs[i];
        expect_matches(c, true, [&](int64_t j) { return f32[i].A[j]; }, [&](int64_t j) { return f32[i].B[j]; },
                       f32_c0[i].C, f32[i].C, 1e-5);
        expect_matches(c, true, [&](int64_t j) { return from_bf16(bf16[i].Ah[j]); },
                       [&](int64_t j) { return from_bf16(bf16[i].Bh[j]); }, bf16_c0[i].C, bf16[i].C, 1e-5);
        expect_matches(c, true, [&](int64_t j) { return mixed[i].A[j]; },
                       [&](int64_t j) { return from_bf16(mixed[i].Bh[j]); }, mixed_c0[i].C, mixed[i].C, 1e-5);
    }
}

}  // namespace
