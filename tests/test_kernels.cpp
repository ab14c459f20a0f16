// The fast backend's vector kernels against scalar double references, for every ISA variant. The variant is
// chosen once per process; tests/CMakeLists.txt runs this binary once per variant (MLA_TEST_ISA, main.cpp) and
// the plain run covers the best variant of the machine. KernelIsa.* check the dispatcher itself, its errors in
// child processes.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "cpu/kernels.hpp"
#include "testing.hpp"

namespace mla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// What this CPU runs, from its own feature bits (independent of the dispatcher), best first.
std::vector<std::string> runnable_variants() {
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  std::vector<std::string> v;
  if (avx512 && __builtin_cpu_supports("avx512bf16")) v.push_back("avx512-bf16");
  if (avx512) v.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) v.push_back("avx2");
  v.push_back("scalar");
  return v;
}

std::string self_exe() {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string();
}

// Runs this binary's `filter` with MLA_CPU_ISA=isa (no MLA_TEST_ISA); returns its exit code and output.
std::pair<int, std::string> run_child(const std::string& isa, const std::string& filter) {
  const testing::TempDir tmp("isa_child");
  const auto log = tmp.path() / "child.log";
  const std::string cmd = "env -u MLA_TEST_ISA MLA_TEST_CHILD=1 MLA_CPU_ISA='" + isa + "' '" + self_exe() +
                          "' --gtest_filter='" + filter + "' > '" + log.string() + "' 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, text.str()};
}

TEST(KernelIsa, ReflectsEnvironment) {
  const std::vector<std::string> runs = runnable_variants();
  std::vector<std::string> listed;
  for (cpu::Isa v : cpu::supported_isas()) listed.emplace_back(cpu::isa_name(v));
  EXPECT_EQ(listed, runs);
  const char* f = std::getenv("MLA_CPU_ISA");
  const std::string forced = f ? f : "";
  if (forced.empty()) {
    EXPECT_EQ(cpu::kernel_isa(), runs.front());
  } else if (std::find(runs.begin(), runs.end(), forced) != runs.end()) {
    EXPECT_EQ(cpu::kernel_isa(), forced);
    EXPECT_EQ(cpu::native_bf16(), forced == "avx512-bf16");
  } else {  // a variant this CPU lacks, or no variant at all: every call throws, naming it
    for (int i = 0; i < 2; ++i)
      testing::expect_throw_with<InvalidArgument>([] { cpu::kernel_isa(); }, {"MLA_CPU_ISA=" + forced, runs.back()});
  }
  RecordProperty("isa", forced.empty() ? cpu::kernel_isa() : forced);
}

// MLA_CPU_ISA naming a variant this CPU lacks, or an unknown one, is an error that says so; never a fallback.
TEST(KernelIsa, ForcingWhatTheCpuLacksThrows) {
  if (std::getenv("MLA_TEST_CHILD")) GTEST_SKIP() << "child process";
  const std::vector<std::string> runs = runnable_variants();
  std::vector<std::pair<std::string, std::string>> bad = {{"avx512_bf16", "unknown variant"}};
  for (const char* v : {"avx512-bf16", "avx512", "avx2"})
    if (std::find(runs.begin(), runs.end(), v) == runs.end()) bad.push_back({v, "lacks"});
  for (const auto& [isa, words] : bad) {
    SCOPED_TRACE(isa);
    const auto [rc, text] = run_child(isa, "KernelIsa.ReflectsEnvironment:Kernels.ScaleInplace");
    EXPECT_EQ(rc, 0) << text;
    EXPECT_NE(text.find("[       OK ] KernelIsa.ReflectsEnvironment"), std::string::npos) << text;
    // The layer-level entry points throw too (here through to_bf16 in a kernel test, which must fail).
    const auto [rc2, text2] = run_child(isa, "Kernels.ToBf16Random");
    EXPECT_NE(rc2, 0) << text2;
    EXPECT_NE(text2.find("MLA_CPU_ISA=" + isa), std::string::npos) << text2;
    EXPECT_NE(text2.find(words), std::string::npos) << text2;
  }
}

// Every variant this CPU runs can be forced (the per-variant CTest runs rely on it).
TEST(KernelIsa, EveryRunnableVariantCanBeForced) {
  if (std::getenv("MLA_TEST_CHILD")) GTEST_SKIP() << "child process";
  for (const std::string& isa : runnable_variants()) {
    SCOPED_TRACE(isa);
    const auto [rc, text] = run_child(isa, "KernelIsa.ReflectsEnvironment");
    EXPECT_EQ(rc, 0) << text;
    EXPECT_NE(text.find("[       OK ] KernelIsa.ReflectsEnvironment"), std::string::npos) << text;
  }
}

// ---------------------------------------------------------------------------------------------------------
// to_bf16

float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

// Round to nearest even, computed independently of float_to_bf16 (finite inputs).
uint16_t bf16_rne_reference(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  uint32_t hi = u >> 16;
  const uint32_t lo = u & 0xffffu;
  if (lo > 0x8000u || (lo == 0x8000u && (hi & 1u))) ++hi;
  return static_cast<uint16_t>(hi);
}

std::vector<float> bf16_cases() {
  std::vector<float> v = {
      0.f, -0.f, 1.f, -1.f, 3.14159265f, -2.71828f, 1e-3f, 65504.f, 1e30f, -1e30f, 3.0e38f,
      std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), kInf, -kInf,
      std::numeric_limits<float>::min(),  // smallest normal
      from_bits(0x3f808000u),   // exactly halfway between 1 and the next bf16, lower is even: rounds down
      from_bits(0x3f818000u),   // halfway, upper is even: rounds up
      from_bits(0xbf808000u), from_bits(0xbf818000u),  // the same, negative
      from_bits(0x3f808001u),   // just above halfway: up
      from_bits(0x3f807fffu),   // just below halfway: down
      from_bits(0x7f7f8000u),   // halfway near the top: rounds to even (down)
      from_bits(0x7f7fffffu),   // rounds up to infinity
      from_bits(0x477fffffu), from_bits(0x00808000u), from_bits(0x00818000u),
  };
  return v;
}

std::vector<float> subnormal_cases() {
  return {from_bits(0x00000001u), from_bits(0x00008000u), from_bits(0x00018000u), from_bits(0x00400000u),
          from_bits(0x007fffffu), from_bits(0x80400000u), from_bits(0x0000c000u)};
}

// Runs to_bf16 over `v` placed at every offset of a 40-wide buffer, so each value lands in both the 16-wide
// vector body and the scalar tail.
void check_to_bf16(const std::vector<float>& values) {
  for (float f : values) {
    const uint16_t want = bf16_rne_reference(f);
    ASSERT_EQ(float_to_bf16(f), want) << "float_to_bf16(" << f << ") bits " << std::hex << std::bit_cast<uint32_t>(f);
    for (int64_t n : {1, 15, 16, 17, 40}) {
      for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
        std::vector<float> x(static_cast<size_t>(n), 0.5f);
        x[at] = f;
        std::vector<uint16_t> y(static_cast<size_t>(n), 0xdead);
        cpu::to_bf16(x.data(), y.data(), n);
        EXPECT_EQ(y[at], want) << "to_bf16(" << f << ") bits 0x" << std::hex << std::bit_cast<uint32_t>(f) << std::dec
                               << " n=" << n << " at=" << at << " isa=" << cpu::kernel_isa();
        for (int64_t i = 0; i < n; ++i)
          if (i != at) EXPECT_EQ(y[i], 0x3f00) << i;
        std::vector<float> back(static_cast<size_t>(n));
        cpu::from_bf16(y.data(), back.data(), n);
        EXPECT_EQ(std::bit_cast<uint32_t>(back[at]), static_cast<uint32_t>(want) << 16);
      }
    }
  }
}

TEST(Kernels, ToBf16SpecialValues) { check_to_bf16(bf16_cases()); }

// Exact round-to-nearest-even on the scalar and plain AVX-512 variants. The AVX512-BF16 instruction
// (VCVTNEPS2BF16) treats subnormal inputs as zero whatever MXCSR says, so that variant gives ±0 for them: a
// known divergence (|error| < 1.2e-38) between ISA variants, reported rather than hidden. Everything else
// about that variant is still checked exactly.
TEST(Kernels, ToBf16Subnormals) {
  // Every variant rounds subnormals exactly (the native vcvtneps2bf16, which flushes them, is not used here).
  check_to_bf16(subnormal_cases());
  for (float f : subnormal_cases()) {
    std::vector<float> x(40, 0.5f);
    x[3] = f, x[35] = f;  // vector body and scalar tail
    std::vector<uint16_t> y(40);
    cpu::to_bf16(x.data(), y.data(), 40);
    EXPECT_EQ(y[3], bf16_rne_reference(f)) << "vector body, bits 0x" << std::hex << std::bit_cast<uint32_t>(f);
    EXPECT_EQ(y[35], bf16_rne_reference(f)) << "scalar tail";
  }
}

TEST(Kernels, ToBf16Random) {
  const int64_t n = 1000 + 13;
  std::vector<float> x(static_cast<size_t>(n));
  uint64_t s = 12345;
  for (float& f : x) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    uint32_t u = static_cast<uint32_t>(s);
    if ((u & 0x7f800000u) == 0x7f800000u) u &= 0xbfffffffu;  // keep finite
    f = from_bits(u);
  }
  // Plenty of exact halfway cases.
  for (int64_t i = 0; i < n; i += 7) x[i] = from_bits((std::bit_cast<uint32_t>(x[i]) & 0xffff0000u) | 0x8000u);
  std::vector<uint16_t> y(static_cast<size_t>(n));
  cpu::to_bf16(x.data(), y.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(y[i], bf16_rne_reference(x[i])) << i << " bits 0x" << std::hex << std::bit_cast<uint32_t>(x[i]);
  }
}

TEST(Kernels, ToBf16NaNStaysNaN) {
  // The canonical quiet NaN on every variant.
  std::vector<float> x(20, std::numeric_limits<float>::quiet_NaN());
  x[7] = -x[7];
  std::vector<uint16_t> y(20);
  cpu::to_bf16(x.data(), y.data(), 20);
  for (uint16_t b : y) EXPECT_TRUE(std::isnan(bf16_to_float(b))) << std::hex << b;
  // A NaN whose payload fills the low mantissa bits: naive rounding (add 0x7fff + lsb) would carry it into the
  // sign bit and give -0.
  std::fill(x.begin(), x.end(), from_bits(0x7fffffffu));
  cpu::to_bf16(x.data(), y.data(), 20);
  for (uint16_t b : y) EXPECT_TRUE(std::isnan(bf16_to_float(b))) << std::hex << b;
}

// Widening is exact: the bits shifted up by 16, NaN payloads and signs included.
TEST(Kernels, FromBf16IsTheShift) {
  std::vector<uint16_t> x;
  for (uint32_t b = 0; b < 0x10000u; b += 7) x.push_back(static_cast<uint16_t>(b));
  for (uint16_t b : {0x7fc0, 0xffc1, 0x7f81, 0x0001, 0x8000, 0x7f80, 0xff80}) x.push_back(b);
  for (int64_t n : {int64_t{1}, int64_t{15}, int64_t{17}, static_cast<int64_t>(x.size())}) {
    std::vector<float> y(static_cast<size_t>(n) + 1, 1.5f);
    cpu::from_bf16(x.data(), y.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(std::bit_cast<uint32_t>(y[i]), uint32_t{x[i]} << 16) << i;
    EXPECT_EQ(y[n], 1.5f) << "wrote past n=" << n;
  }
}

// round_bf16_values == the bits of to_bf16, kept as f32, in place or not; subnormals, ties and NaN included.
TEST(Kernels, RoundBf16ValuesMatchesToBf16) {
  std::vector<float> x = bf16_cases();
  for (float f : subnormal_cases()) x.push_back(f);
  x.push_back(std::numeric_limits<float>::quiet_NaN());
  x.push_back(from_bits(0xffffffffu));
  uint64_t s = 99;
  for (int i = 0; i < 3000; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x.push_back(from_bits(i % 3 ? static_cast<uint32_t>(s) : (static_cast<uint32_t>(s) & 0xffff0000u) | 0x8000u));
  }
  const auto n = static_cast<int64_t>(x.size());
  std::vector<float> y(x.size()), z = x;
  cpu::round_bf16_values(x.data(), y.data(), n);
  cpu::round_bf16_values(z.data(), z.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t want = uint32_t{float_to_bf16(x[i])} << 16;
    ASSERT_EQ(std::bit_cast<uint32_t>(y[i]), want) << i << " bits 0x" << std::hex << std::bit_cast<uint32_t>(x[i]);
    ASSERT_EQ(std::bit_cast<uint32_t>(z[i]), want) << "in place, " << i;
  }
}

TEST(Kernels, ScaleInplace) {
  auto y = testing::random_values(37, 3);
  const auto x = y;
  cpu::scale_inplace(y.data(), 37, 0.25f);
  for (int i = 0; i < 37; ++i) EXPECT_EQ(y[i], x[i] * 0.25f);
}

// ---------------------------------------------------------------------------------------------------------
// online_softmax_step

struct StepRef {
  double m, l, alpha;
  std::vector<double> p;
};

StepRef softmax_step_reference(const std::vector<float>& s, int64_t n, int64_t visible, float scale, float m0, float l0) {
  StepRef r;
  const int64_t vis = std::clamp<int64_t>(visible, 0, n);
  r.p.assign(static_cast<size_t>(n), 0.0);
  if (vis == 0) {
    r.m = m0, r.l = l0, r.alpha = 1.0;
    return r;
  }
  double mx = m0;
  for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, static_cast<double>(scale * s[j]));  // fp32 logits
  r.alpha = m0 == -kInf ? 0.0 : std::exp(static_cast<double>(m0) - mx);
  double sum = 0;
  for (int64_t j = 0; j < vis; ++j) sum += (r.p[j] = std::exp(static_cast<double>(scale) * s[j] - mx));
  r.l = l0 * r.alpha + sum;
  r.m = mx;
  return r;
}

TEST(Kernels, OnlineSoftmaxStepMatchesScalarReference) {
  uint64_t seed = 1;
  int checked = 0;
  for (int64_t n : {1, 5, 16, 17, 33, 64, 100, 256}) {
    for (int trial = 0; trial < 6; ++trial) {
      ++seed;
      std::vector<int64_t> visibles = {0, n, n / 2, 1, n + 5, -3};
      for (int64_t visible : visibles) {
        for (bool bf16_out : {false, true}) {
          for (int start : {0, 1}) {  // fresh state, or a running one
            SCOPED_TRACE(::testing::Message() << "n=" << n << " visible=" << visible << " bf16=" << bf16_out
                                              << " start=" << start << " isa=" << cpu::kernel_isa());
            std::vector<float> s = testing::random_values(static_cast<size_t>(n), seed, 8.f);
            // Masked keys hold garbage that must not leak: NaN and huge values.
            for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j)
              s[j] = (j % 2) ? std::numeric_limits<float>::quiet_NaN() : 1e30f;
            const float scale = 0.1352337789f;
            float m = start ? 0.37f : -kInf, l = start ? 2.5f : 0.f;
            const StepRef ref = softmax_step_reference(s, n, visible, scale, m, l);
            std::vector<float> pf(static_cast<size_t>(n), -1.f);
            std::vector<uint16_t> pb(static_cast<size_t>(n), 0xffff);
            const float alpha = cpu::online_softmax_step(s.data(), n, visible, scale, m, l,
                                                         bf16_out ? nullptr : pf.data(), bf16_out ? pb.data() : nullptr);
            EXPECT_NEAR(alpha, ref.alpha, 1e-6 * std::max(1.0, ref.alpha));
            if (std::isinf(ref.m)) EXPECT_EQ(m, ref.m);
            else EXPECT_NEAR(m, ref.m, 1e-6 * std::max(1.0, std::fabs(ref.m)));
            EXPECT_NEAR(l, ref.l, 2e-6 * std::max(1.0, ref.l));
            for (int64_t j = 0; j < n; ++j) {
              if (bf16_out) {
                const float got = bf16_to_float(pb[j]);
                if (ref.p[j] == 0.0) {
                  EXPECT_EQ(pb[j], 0) << j;
                } else {  // within one bf16 step (the reference is not rounded the same way)
                  EXPECT_NEAR(got, ref.p[j], ref.p[j] * (1.0 / 128)) << j;
                }
              } else if (ref.p[j] == 0.0) {
                EXPECT_EQ(pf[j], 0.f) << j;
              } else {
                EXPECT_NEAR(pf[j], ref.p[j], 2e-6 * ref.p[j] + 1e-30) << j;
              }
            }
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 500);
}

// round_p: the f32 weights are exactly the bf16 weights, and m, l and alpha are those of the unrounded step.
TEST(Kernels, OnlineSoftmaxRoundedF32EqualsBf16Output) {
  for (int64_t n : {1, 7, 16, 33, 256}) {
    for (int64_t visible : {n, n / 2 + 1}) {
      const auto s = testing::random_values(static_cast<size_t>(n), static_cast<uint64_t>(n + visible), 9.f);
      float m1 = 0.25f, l1 = 1.5f, m2 = m1, l2 = l1, m3 = m1, l3 = l1;
      std::vector<float> pr(static_cast<size_t>(n)), pf(pr.size());
      std::vector<uint16_t> pb(pr.size());
      const float a1 = cpu::online_softmax_step(s.data(), n, visible, 0.3f, m1, l1, pr.data(), nullptr, true);
      const float a2 = cpu::online_softmax_step(s.data(), n, visible, 0.3f, m2, l2, nullptr, pb.data());
      const float a3 = cpu::online_softmax_step(s.data(), n, visible, 0.3f, m3, l3, pf.data(), nullptr, false);
      EXPECT_EQ(a1, a2);
      EXPECT_EQ(a1, a3);
      EXPECT_EQ(m1, m2);
      EXPECT_EQ(l1, l2);
      EXPECT_EQ(l1, l3);
      for (int64_t j = 0; j < n; ++j) {
        ASSERT_EQ(std::bit_cast<uint32_t>(pr[j]), uint32_t{pb[j]} << 16) << "n=" << n << " j=" << j;
        ASSERT_EQ(pr[j], round_bf16(pf[j])) << "n=" << n << " j=" << j;
      }
    }
  }
}

// Many steps over a row in blocks: the merged result must be the softmax-weighted average of the row.
TEST(Kernels, OnlineSoftmaxBlocksComposeToSoftmax) {
  for (int64_t N : {1, 17, 300, 1013}) {
    for (int64_t block : {16, 64, 256}) {
      for (int64_t V : {int64_t{1}, N / 3 + 1, N}) {
        for (bool bf16_out : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "N=" << N << " block=" << block << " V=" << V << " bf16=" << bf16_out);
          const auto s = testing::random_values(static_cast<size_t>(N), static_cast<uint64_t>(N * 7 + V), 20.f);
          const auto v = testing::random_values(static_cast<size_t>(N), static_cast<uint64_t>(N * 3 + V + 1));
          const float scale = 0.3f;
          float m = -kInf, l = 0.f, acc = 0.f;
          std::vector<float> pf(static_cast<size_t>(block));
          std::vector<uint16_t> pb(static_cast<size_t>(block));
          for (int64_t k0 = 0; k0 < N; k0 += block) {
            const int64_t kb = std::min(block, N - k0);
            const float alpha = cpu::online_softmax_step(s.data() + k0, kb, V - k0, scale, m, l,
                                                         bf16_out ? nullptr : pf.data(), bf16_out ? pb.data() : nullptr);
            acc *= alpha;
            for (int64_t j = 0; j < kb; ++j) acc += (bf16_out ? bf16_to_float(pb[j]) : pf[j]) * v[k0 + j];
          }
          double mx = -INFINITY;
          for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(scale * s[j]));
          double num = 0, den = 0;
          for (int64_t j = 0; j < V; ++j) {
            const double p = std::exp(static_cast<double>(scale * s[j]) - mx);
            num += p * v[j];
            den += p;
          }
          EXPECT_NEAR(l * std::exp(static_cast<double>(m) - mx), den, 1e-5 * den);
          EXPECT_NEAR(acc / l, num / den, bf16_out ? 1e-2 : 1e-5);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The widening GEMV (f32 A, bf16 B) against a double loop, on odd shapes: every M, N and K tail of the 16-, 8-
// and 4-wide tiles, padded leading dimensions (padding must stay untouched), beta 0 with NaN in C (not read),
// 1 and 0.5.

void check_gemv(bool nt, int64_t M, int64_t N, int64_t K, int64_t pad, float beta, uint64_t seed) {
  const int64_t lda = K + pad, ldb = (nt ? K : N) + pad, ldc = N + pad;
  const auto A = testing::random_values(static_cast<size_t>(M * lda), seed);
  const auto Bf = testing::random_values(static_cast<size_t>((nt ? N : K) * ldb), seed + 1);
  std::vector<uint16_t> B(Bf.size());
  for (size_t i = 0; i < B.size(); ++i) B[i] = float_to_bf16(Bf[i]);
  std::vector<float> C = testing::random_values(static_cast<size_t>(M * ldc), seed + 2);
  if (beta == 0.f)
    for (int64_t m = 0; m < M; ++m) std::fill_n(&C[m * ldc], N, std::numeric_limits<float>::quiet_NaN());
  const std::vector<float> C0 = C;
  (nt ? cpu::gemv_nt_bf16 : cpu::gemv_nn_bf16)(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, beta);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < ldc; ++n) {
      const float got = C[m * ldc + n];
      if (n >= N) {
        ASSERT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(C0[m * ldc + n])) << "padding written";
        continue;
      }
      double sum = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(A[m * lda + k]) * bf16_to_float(B[nt ? n * ldb + k : k * ldb + n]);
        sum += p, mag += std::fabs(p);
      }
      if (beta != 0.f) sum += double(beta) * C0[m * ldc + n], mag += std::fabs(double(beta) * C0[m * ldc + n]);
      ASSERT_NEAR(got, sum, 1e-5 * mag + 1e-30) << (nt ? "nt" : "nn") << " M=" << M << " N=" << N << " K=" << K
                                                 << " m=" << m << " n=" << n << " isa=" << cpu::kernel_isa();
    }
}

TEST(Kernels, GemvBf16MatchesDoubleLoop) {
  uint64_t seed = 5;
  int cases = 0;
  for (bool nt : {true, false})
    for (int64_t M : {1, 2, 3, 4, 5, 7, 16})
      for (int64_t N : {1, 3, 4, 5, 8, 17, 33, 64, 65, 130})
        for (int64_t K : {1, 7, 8, 15, 16, 17, 100, 513}) {
          const float beta = cases % 3 == 0 ? 0.f : cases % 3 == 1 ? 1.f : 0.5f;
          check_gemv(nt, M, N, K, cases % 4 == 0 ? 0 : 3, beta, seed += 3);
          ++cases;
        }
  EXPECT_EQ(cases, 2 * 7 * 10 * 8);
}

// ---------------------------------------------------------------------------------------------------------
// mqa_block against a double loop: odd key counts (the 8-, 4- and 1-key logit tiles), value widths off the
// 16- and 4-column tiles, per-lane visibility from none to past the block, fresh and running state, P rounded
// to bf16 or not. Lanes past `rows` and lanes that see nothing must keep their state bit for bit.

// kv [keys, ld] row-major into mqa_block's panels [ceil(keys/16), d, 16] (zero padding), by the definition.
std::vector<float> panels_of(const std::vector<float>& kv, int64_t keys, int64_t ld, int64_t d) {
  constexpr int L = cpu::kMqaLanes;
  std::vector<float> p(static_cast<size_t>((keys + L - 1) / L * d * L), 0.f);
  for (int64_t t = 0; t < keys; ++t)
    for (int64_t k = 0; k < d; ++k) p[((t / L) * d + k) * L + t % L] = kv[t * ld + k];
  return p;
}

void check_mqa(int rows, int64_t keys, int64_t d, int64_t dv, bool round_p, bool running, uint64_t seed) {
  constexpr int L = cpu::kMqaLanes;
  const int64_t ld = d + 3;
  const float scale = 0.13f;
  const auto qT = testing::random_values(static_cast<size_t>(d * L), seed, 2.f);
  const auto kv = testing::random_values(static_cast<size_t>(keys * ld), seed + 1, 2.f);
  const auto panels = panels_of(kv, keys, ld, d);
  std::vector<int32_t> visible(L);
  for (int r = 0; r < L; ++r) visible[r] = static_cast<int32_t>((seed * 7 + r * 13) % (keys + 3)) - 1;  // -1..keys+1
  visible[0] = static_cast<int32_t>(keys);
  std::vector<float> m(L), l(L), accT = testing::random_values(static_cast<size_t>(dv * L), seed + 2);
  for (int r = 0; r < L; ++r) m[r] = running ? 1.5f + 0.1f * r : -kInf, l[r] = running ? 2.f + r : 0.f;
  if (!running) std::fill(accT.begin(), accT.end(), 0.f);
  const auto m0 = m, l0 = l, acc0 = accT;
  std::vector<float> s(static_cast<size_t>((keys + L - 1) / L * L * L));
  cpu::mqa_block({.qT = qT.data(), .kv = panels.data(), .d = d, .dv = dv, .keys = keys, .rows = rows,
                  .visible = visible.data(), .scale = scale, .round_p = round_p, .m = m.data(), .l = l.data(),
                  .accT = accT.data(), .s = s.data()});
  for (int r = 0; r < L; ++r) {
    SCOPED_TRACE(::testing::Message() << "rows=" << rows << " keys=" << keys << " d=" << d << " dv=" << dv
                                      << " round_p=" << round_p << " running=" << running << " lane=" << r
                                      << " isa=" << cpu::kernel_isa());
    const int64_t vis = r < rows ? std::clamp<int64_t>(visible[r], 0, keys) : 0;
    if (vis == 0) {
      EXPECT_EQ(std::bit_cast<uint32_t>(m[r]), std::bit_cast<uint32_t>(m0[r]));
      EXPECT_EQ(l[r], l0[r]);
      for (int64_t j = 0; j < dv; ++j) ASSERT_EQ(accT[j * L + r], acc0[j * L + r]) << j;
      continue;
    }
    std::vector<double> logit(static_cast<size_t>(vis));
    double mx = m0[r], lmag = 0;  // lmag: the largest scale·Σ|q·k|, which bounds the fp32 error of a logit
    for (int64_t t = 0; t < vis; ++t) {
      double dot = 0, mag = 0;
      for (int64_t k = 0; k < d; ++k) dot += double(qT[k * L + r]) * kv[t * ld + k];
      for (int64_t k = 0; k < d; ++k) mag += std::fabs(double(qT[k * L + r]) * kv[t * ld + k]);
      mx = std::max(mx, logit[t] = scale * dot);
      lmag = std::max(lmag, scale * mag);
    }
    const double alpha = m0[r] == -kInf ? 0.0 : std::exp(m0[r] - mx);
    double sum = 0;
    std::vector<double> pr(logit.size());
    for (int64_t t = 0; t < vis; ++t) sum += (pr[t] = std::exp(logit[t] - mx));
    EXPECT_NEAR(m[r], mx, 1e-5 * std::max(1.0, std::fabs(mx)));
    EXPECT_NEAR(l[r], l0[r] * alpha + sum, 1e-5 * (l0[r] * alpha + sum));
    // Relative error of a weight: a logit's fp32 error (~sqrt(d) roundings of lmag), plus a bf16 step with round_p.
    const double ptol = (round_p ? 1.0 / 256 : 0.0) + 1e-5 + 4 * 6e-8 * std::sqrt(double(d)) * lmag;
    for (int64_t j = 0; j < dv; ++j) {
      double o = alpha * acc0[j * L + r], mag = std::fabs(o);
      for (int64_t t = 0; t < vis; ++t) o += pr[t] * kv[t * ld + j], mag += pr[t] * std::fabs(kv[t * ld + j]);
      ASSERT_NEAR(accT[j * L + r], o, ptol * mag + 1e-6 * std::fabs(alpha * acc0[j * L + r]) + 1e-30) << j;
    }
  }
}

TEST(Kernels, MqaBlockMatchesDoubleLoop) {
  uint64_t seed = 11;
  int cases = 0;
  for (int rows : {1, 5, 16})
    for (int64_t keys : {1, 3, 8, 13, 256})
      for (auto [d, dv] : {std::pair<int64_t, int64_t>{576, 512}, {37, 21}, {5, 5}})
        for (bool round_p : {false, true}) {
          check_mqa(rows, keys, d, dv, round_p, cases % 2 == 1, seed += 5);
          ++cases;
        }
  EXPECT_EQ(cases, 3 * 5 * 3 * 2);
}

// With round_p the weights that multiply V are the bf16 roundings of the weights without it: with one-hot values
// (key t's value is e_t) output column t is exactly key t's weight.
TEST(Kernels, MqaBlockRoundsPToBf16Values) {
  constexpr int L = cpu::kMqaLanes;
  const int64_t keys = 19, d = 24;
  const auto qT = testing::random_values(static_cast<size_t>(d * L), 3, 4.f);
  std::vector<float> kv(static_cast<size_t>(keys * d), 0.f);
  for (int64_t t = 0; t < keys; ++t) kv[t * d + t] = 1.f;
  const auto panels = panels_of(kv, keys, d, d);
  const std::vector<int32_t> visible(L, static_cast<int32_t>(keys));
  std::vector<float> out[2];
  for (int round_p : {0, 1}) {
    std::vector<float> m(L, -kInf), l(L, 0.f), s(32 * L);
    out[round_p].assign(static_cast<size_t>(keys * L), 0.f);
    cpu::mqa_block({.qT = qT.data(), .kv = panels.data(), .d = d, .dv = keys, .keys = keys, .rows = L,
                    .visible = visible.data(), .scale = 0.7f, .round_p = round_p == 1, .m = m.data(), .l = l.data(),
                    .accT = out[round_p].data(), .s = s.data()});
  }
  int differ = 0;
  for (size_t i = 0; i < out[0].size(); ++i) {
    ASSERT_EQ(out[1][i], round_bf16(out[0][i])) << i;
    differ += out[1][i] != out[0][i];
  }
  EXPECT_GT(differ, 100) << "the unrounded weights were bf16 values already: the test proves nothing";
}

// mqa_pack == the panel layout by definition, from bf16 rows (widened) and f32 rows, for every row count and for
// widths off the 16- and 8-wide transposes; rows past n are zeros.
TEST(Kernels, MqaPackMatchesTheLayout) {
  constexpr int L = cpu::kMqaLanes;
  for (int64_t d : {1, 7, 8, 16, 17, 40, 576})
    for (int n : {1, 5, 15, 16}) {
      SCOPED_TRACE(::testing::Message() << "d=" << d << " n=" << n << " isa=" << cpu::kernel_isa());
      const int64_t ld = d + 5;
      const auto vals = testing::random_values(static_cast<size_t>(L * ld), static_cast<uint64_t>(d * 31 + n));
      std::vector<uint16_t> bits(vals.size());
      for (size_t i = 0; i < vals.size(); ++i) bits[i] = float_to_bf16(vals[i]);
      const uint16_t* brows[L];
      const float* frows[L];
      for (int i = 0; i < n; ++i) brows[i] = &bits[i * ld], frows[i] = &vals[i * ld];
      std::vector<float> pb(static_cast<size_t>(d * L), -1.f), pf(pb.size(), -1.f);
      cpu::mqa_pack(brows, n, d, pb.data());
      cpu::mqa_pack(frows, n, d, pf.data());
      for (int64_t k = 0; k < d; ++k)
        for (int i = 0; i < L; ++i) {
          ASSERT_EQ(pb[k * L + i], i < n ? bf16_to_float(bits[i * ld + k]) : 0.f) << "bf16 k=" << k << " i=" << i;
          ASSERT_EQ(pf[k * L + i], i < n ? vals[i * ld + k] : 0.f) << "f32 k=" << k << " i=" << i;
        }
    }
}

// The whole fast layer on this ISA against the scalar reference backend: several 256-key blocks, both paths.
TEST(Kernels, FastLayerMatchesReferenceOnThisIsa) {
  const Config cfg = testing::small_config(48, 3, 24, 16, 8, 8, 8);
  const LayerWeights w = LayerWeights::random(cfg, 77);
  const int64_t T = 300, D = cfg.hidden_size;
  const auto hidden = testing::random_values(static_cast<size_t>(T * D), 9);
  for (Precision pr : {Precision::F32, Precision::BF16}) {
    for (Path path : {Path::Expanded, Path::Absorbed}) {
      SCOPED_TRACE(::testing::Message() << precision_name(pr) << " " << path_name(path) << " " << cpu::kernel_isa());
      std::vector<float> outs[2];
      int k = 0;
      for (const char* dev : {"cpu", "cpu-reference"}) {
        LayerOptions lo;
        lo.device = dev, lo.precision = pr, lo.path = path;
        Attention layer(w, lo);
        outs[k++] = run_sequences(layer, hidden.data(), nullptr, 1, T, {}).output;
      }
      EXPECT_LT(testing::rel_error(outs[0], outs[1]), pr == Precision::F32 ? 1e-5 : 5e-3);
    }
  }
}

// ---- fp8 cache rows (fp8_row_to_bf16 / fp8_row_to_float) against load_row, bit for bit ----

// Compares one dequantised row with load_row's: equal bits, or both NaN.
void expect_fp8_row_matches(const RowLayout& lay, const std::vector<std::byte>& bytes, const std::string& what) {
  std::vector<float> want(static_cast<size_t>(lay.width())), got_f(want.size(), -7.f);
  std::vector<uint16_t> got_b(want.size(), 0x1234);
  load_row(lay, bytes.data(), want.data());
  cpu::fp8_row_to_float(lay, bytes.data(), got_f.data());
  cpu::fp8_row_to_bf16(lay, bytes.data(), got_b.data());
  int bad = 0;
  for (size_t j = 0; j < want.size() && bad < 5; ++j) {
    const float w = want[j], f = got_f[j], b = bf16_to_float(got_b[j]);
    const bool ok = std::isnan(w) ? std::isnan(f) && std::isnan(b)
                                  : std::bit_cast<uint32_t>(f) == std::bit_cast<uint32_t>(w) &&
                                        got_b[j] == static_cast<uint16_t>(std::bit_cast<uint32_t>(w) >> 16);
    if (!ok) {
      ++bad;
      ADD_FAILURE() << what << " column " << j << ": load_row " << w << ", float " << f << ", bf16 " << b;
    }
  }
}

void put_scale(const RowLayout& lay, std::vector<std::byte>& bytes, int64_t g, float s) {
  std::memcpy(bytes.data() + lay.scale_offset() + 4 * g, &s, 4);
}

// Every one of the 256 codes under scales that exercise every corner: 1, an ordinary scale, 0 (an all-zero
// group), subnormal scales (subnormal products, which bf16 keeps and VCVTNEPS2BF16 would flush), products near
// the overflow threshold and past it, infinite and NaN scales, negative zero and negative scales.
TEST(Kernels, Fp8RowEveryCodeAndScale) {
  const RowLayout lay{.dtype = DType::F8_E4M3, .latent = 256, .rope = 24};
  const float scales[] = {1.f,
                          0.0123f,
                          0.f,
                          -0.f,
                          1e-40f,
                          3e-39f,
                          0x1p-133f,
                          2.3e-38f,
                          7.5e35f,
                          1e38f,
                          std::numeric_limits<float>::max(),
                          kInf,
                          -kInf,
                          std::nanf(""),
                          1.f / 448.f,
                          0x1p-116f,  // the edges of the AVX-512 table route (kernels_avx512.cpp, fp8_scaled)
                          0x1.fffffep-117f,
                          0x1p118f,
                          0x1.000002p118f,
                          0x1.7654p-100f,
                          -0.5f};
  std::vector<std::byte> bytes(static_cast<size_t>(lay.bytes()));
  const auto rope = testing::random_values(static_cast<size_t>(lay.rope), 5, 100.f);
  for (float s0 : scales)
    for (float s1 : {1.f, 1e-40f}) {
      for (int c = 0; c < 256; ++c) bytes[static_cast<size_t>(c)] = static_cast<std::byte>(c ^ (s1 == 1.f ? 0 : 0x5a));
      put_scale(lay, bytes, 0, s0);
      put_scale(lay, bytes, 1, s1);
      for (int64_t j = 0; j < lay.rope; ++j) {
        const uint16_t b = j == 3 ? 0x7fc1 : j == 4 ? 0xff80 : j == 5 ? 0x0001 : float_to_bf16(rope[j]);
        std::memcpy(bytes.data() + lay.rope_offset() + 2 * j, &b, 2);
      }
      expect_fp8_row_matches(lay, bytes, "scale " + std::to_string(s0) + "/" + std::to_string(s1));
    }
}

// Random rows as the layer writes them (store_row of random latents, incl. all-zero groups, saturated values
// and subnormal codes) and random bytes, on layouts whose groups and tails are not multiples of the vector width.
TEST(Kernels, Fp8RowRandomRowsMatchLoadRow) {
  for (auto [dc, dr] : {std::pair<int64_t, int64_t>{512, 64}, {136, 64}, {48, 16}, {7, 3}, {129, 2}, {200, 0}}) {
    const RowLayout lay{.dtype = DType::F8_E4M3, .latent = dc, .rope = dr};
    std::vector<std::byte> bytes(static_cast<size_t>(lay.bytes()));
    for (int trial = 0; trial < 30; ++trial) {
      const std::string what = "dc " + std::to_string(dc) + " trial " + std::to_string(trial);
      auto row = testing::random_values(static_cast<size_t>(lay.width()), 300 + trial, std::ldexp(1.f, trial - 15));
      if (trial % 3 == 0) std::fill(row.begin(), row.begin() + std::min<int64_t>(dc, 128), 0.f);  // zero group
      if (trial % 4 == 1) row[0] = 1e4f * std::ldexp(1.f, trial - 15);  // outlier: subnormal codes
      store_row(lay, row.data(), bytes.data());
      expect_fp8_row_matches(lay, bytes, what + " stored");
      // Arbitrary bytes: every code, random scales of any magnitude (finite).
      const auto noise = testing::random_values(bytes.size(), 900 + trial);
      for (size_t i = 0; i < static_cast<size_t>(lay.scale_offset()); ++i)
        bytes[i] = static_cast<std::byte>(static_cast<int>((noise[i] + 1.f) * 128.f) & 0xff);
      for (int64_t g = 0; g < lay.groups(); ++g) put_scale(lay, bytes, g, std::ldexp(noise[g] + 1.5f, trial * 9 - 140));
      expect_fp8_row_matches(lay, bytes, what + " random bytes");
    }
  }
}

// mqa_pack_fp8 (dequantised in registers on AVX-512) == fp8_row_to_float then mqa_pack, bit for bit, for n < 16
// rows and latent widths that are not multiples of 16 (one block straddles latent and rope).
TEST(Kernels, MqaPackFp8EqualsDequantiseThenPack) {
  for (auto [dc, dr] : {std::pair<int64_t, int64_t>{512, 64}, {136, 64}, {40, 8}, {7, 3}}) {
    const RowLayout lay{.dtype = DType::F8_E4M3, .latent = dc, .rope = dr};
    const int64_t d = lay.width();
    for (int n : {16, 5}) {
      std::vector<std::byte> bytes(static_cast<size_t>(n * lay.bytes()));
      const void* rows[16];
      const float* frows[16];
      std::vector<float> deq(static_cast<size_t>(n * d));
      for (int i = 0; i < n; ++i) {
        auto row = testing::random_values(static_cast<size_t>(d), 70 + i + n, std::ldexp(1.f, i - 4));
        if (i == 2) row[0] = 1e5f;  // subnormal codes for the rest of its group
        store_row(lay, row.data(), &bytes[i * lay.bytes()]);
        if (i == 3) bytes[i * lay.bytes() + 1] = std::byte{0x7f};  // a NaN code
        rows[i] = &bytes[i * lay.bytes()];
        cpu::fp8_row_to_float(lay, rows[i], &deq[i * d]);
        frows[i] = &deq[i * d];
      }
      std::vector<float> want(static_cast<size_t>(d * 16), -1.f), got(want.size(), -2.f);
      cpu::mqa_pack(frows, n, d, want.data());
      cpu::mqa_pack_fp8(lay, rows, n, got.data());
      for (size_t k = 0; k < want.size(); ++k)
        ASSERT_TRUE(std::bit_cast<uint32_t>(want[k]) == std::bit_cast<uint32_t>(got[k]) ||
                    (std::isnan(want[k]) && std::isnan(got[k])))
            << "dc " << dc << " n " << n << " at " << k << ": " << want[k] << " vs " << got[k];
    }
  }
}

}  // namespace
}  // namespace mla
