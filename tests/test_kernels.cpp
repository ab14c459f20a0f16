// The fast backend's vector kernels against scalar double references, for every ISA variant. The variant is
// chosen once per process from MLA_CPU_ISA, so IsaVariants re-runs this binary with MLA_CPU_ISA=scalar and
// =avx512 (MLA_TEST_CHILD=1 stops the recursion); the parent process covers the best variant of the machine.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

#include "cpu/kernels.hpp"
#include "testing.hpp"

namespace mla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::string expected_isa() {
  std::string best = "scalar";
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = "avx512";
  if (best == "avx512" && __builtin_cpu_supports("avx512bf16")) best = "avx512-bf16";
  if (const char* f = std::getenv("MLA_CPU_ISA")) {
    if (std::string(f) == "scalar") best = "scalar";
    else if (std::string(f) == "avx512" && best != "scalar") best = "avx512";
  }
  return best;
}

TEST(KernelIsa, ReflectsEnvironment) {
  RecordProperty("isa", cpu::kernel_isa());
  EXPECT_EQ(cpu::kernel_isa(), expected_isa());
  if (const char* f = std::getenv("MLA_CPU_ISA"); f && std::string(f) == "scalar") EXPECT_EQ(cpu::kernel_isa(), "scalar");
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

// ---------------------------------------------------------------------------------------------------------
// Every ISA variant, by re-running this binary.

std::string self_exe() {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string();
}

TEST(IsaVariants, EveryVariantPasses) {
  if (std::getenv("MLA_TEST_CHILD")) GTEST_SKIP() << "child process";
  const std::string exe = self_exe();
  ASSERT_FALSE(exe.empty());
  for (const char* isa : {"scalar", "avx512"}) {
    SCOPED_TRACE(isa);
    const testing::TempDir tmp(std::string("isa_") + isa);
    const auto log = tmp.path() / "child.log";
    const std::string cmd = "MLA_TEST_CHILD=1 MLA_CPU_ISA=" + std::string(isa) + " '" + exe +
                            "' --gtest_filter='Kernels.*:KernelIsa.*' > '" + log.string() + "' 2>&1";
    const int rc = std::system(cmd.c_str());
    std::ifstream in(log);
    std::stringstream text;
    text << in.rdbuf();
    ASSERT_TRUE(WIFEXITED(rc)) << text.str();
    EXPECT_EQ(WEXITSTATUS(rc), 0) << text.str();
    // The child really ran the kernel tests.
    EXPECT_NE(text.str().find("[       OK ] KernelIsa.ReflectsEnvironment"), std::string::npos) << text.str();
    EXPECT_NE(text.str().find("[       OK ] Kernels.OnlineSoftmaxStepMatchesScalarReference"), std::string::npos)
        << text.str();
    EXPECT_EQ(text.str().find("FAILED"), std::string::npos) << text.str();
  }
}

}  // namespace
}  // namespace mla
