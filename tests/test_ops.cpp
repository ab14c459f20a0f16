// The kernel-level ops (mla/ops.hpp) against plain double loops: random shapes, permuted block tables, NaN in
// every unused cache slot, zero-length sequences, every dtype, causal and not; plus every validation error.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "cpu/common.hpp"
#include "testing.hpp"

namespace mla {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
const std::vector<std::string> kDevices{"cpu", "cpu-reference"};

// IEEE binary16 bits of x, round to nearest even, computed in double arithmetic: an oracle independent of the
// library's bit manipulation (src/cpu/ops.cpp). Not _Float16, which clang before 15 lacks on x86.
uint16_t to_f16(float x) {
  const auto sign = static_cast<uint16_t>(std::signbit(x) ? 0x8000u : 0u);
  const double a = std::fabs(static_cast<double>(x));
  if (std::isnan(a)) return sign | 0x7e00u;
  if (a >= 65520.0) return sign | 0x7c00u;  // the halfway point above the largest finite value, 65504
  if (a == 0.0) return sign;
  int e = 0;
  std::frexp(a, &e);                      // a in [2^(e-1), 2^e)
  const int exp = std::max(e - 1, -14);   // the binade; below 2^-14 the subnormal spacing 2^-24
  const double q = std::nearbyint(std::ldexp(a, 10 - exp));  // a / ulp is exact; the default mode rounds to even
  // q in [1024, 2048] for normals (2048 carries into the next binade), [0, 1024] for subnormals: one formula.
  return sign | static_cast<uint16_t>(((exp + 15) << 10) + static_cast<int>(q) - 1024);
}

// A BF16/F16/F32 array: the stored bytes and the values they hold, as float.
struct Array {
  DType dt = DType::F32;
  std::vector<float> f32;      // the values (already rounded to dt)
  std::vector<uint16_t> bits;  // BF16/F16 storage

  Array(DType t, std::vector<float> v) : dt(t), f32(std::move(v)) {
    if (dt == DType::F32) return;
    bits.resize(f32.size());
    for (size_t i = 0; i < f32.size(); ++i) {
      bits[i] = dt == DType::BF16 ? float_to_bf16(f32[i]) : to_f16(f32[i]);
      f32[i] = dt == DType::BF16 ? bf16_to_float(bits[i]) : f16_to_float(bits[i]);
    }
  }
  Array(DType t, size_t n) : Array(t, std::vector<float>(n, 0.f)) {}
  void* data() { return dt == DType::F32 ? static_cast<void*>(f32.data()) : bits.data(); }
  std::vector<float> values() const {  // read back after a kernel wrote `bits`
    if (dt == DType::F32) return f32;
    std::vector<float> v(bits.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = dt == DType::BF16 ? bf16_to_float(bits[i]) : f16_to_float(bits[i]);
    return v;
  }
};

// Output tolerance (relative Frobenius): bf16 rounds P and the output, f16 only the output.
double tolerance(DType dt) { return dt == DType::F32 ? 2e-6 : dt == DType::F16 ? 1e-3 : 1e-2; }

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << " [" << i << "] = " << got[i];
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), tol) << what;
}

void expect_lse(const std::vector<float>& got, const std::vector<double>& want, const std::string& what) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i])) EXPECT_EQ(got[i], kInf) << what << " lse[" << i << "]";
    else EXPECT_NEAR(got[i], want[i], 2e-5 * std::max(1.0, std::abs(want[i]))) << what << " lse[" << i << "]";
  }
}

// Softmax-weighted sum in double over keys [0, visible): o (dv values) and lse; o = 0, lse = +inf when none.
template <class Key, class Val>
void reference_row(int64_t visible, int64_t dv, double scale, Key logit, Val value, double* o, double& lse) {
  std::fill(o, o + dv, 0.0);
  if (visible <= 0) {
    lse = INFINITY;
    return;
  }
  std::vector<double> s(static_cast<size_t>(visible));
  for (int64_t t = 0; t < visible; ++t) s[t] = scale * logit(t);
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (int64_t t = 0; t < visible; ++t) {
    const double w = std::exp(s[t] - mx);
    sum += w;
    for (int64_t j = 0; j < dv; ++j) o[j] += w * value(t, j);
  }
  for (int64_t j = 0; j < dv; ++j) o[j] /= sum;
  lse = mx + std::log(sum);
}

// ---- decode ----

struct DecodeCase {
  int64_t h_q, s_q, page_size, head_dim = 576, head_dim_v = 512;
  std::vector<int32_t> seqlens;
  bool causal;
  DType dtype;
  uint64_t seed;
};

void run_decode_case(const DecodeCase& c, const std::string& device) {
  const int64_t B = static_cast<int64_t>(c.seqlens.size()), P = c.page_size, d = c.head_dim, dv = c.head_dim_v;
  std::mt19937_64 rng(c.seed);
  int64_t max_pages = 1, used_pages = 0;
  for (int32_t L : c.seqlens) {
    max_pages = std::max<int64_t>(max_pages, (L + P - 1) / P + 1);  // one spare entry per row
    used_pages += (L + P - 1) / P;
  }
  const int64_t num_pages = used_pages + 3;  // a few pages nobody uses
  std::vector<int32_t> order(static_cast<size_t>(num_pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> table(static_cast<size_t>(B * max_pages), -1);  // unused entries are invalid on purpose
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (c.seqlens[b] + P - 1) / P; ++j) table[b * max_pages + j] = order[next++];

  // NaN in every slot, then real rows where tokens are stored.
  std::vector<float> cache_vals(static_cast<size_t>(num_pages * P * d), kNaN);
  const std::vector<float> rows = testing::random_values(static_cast<size_t>(used_pages * P * d), c.seed + 1);
  size_t used = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < c.seqlens[b]; ++t, ++used) {
      const int64_t slot = int64_t{table[b * max_pages + t / P]} * P + t % P;
      std::copy_n(&rows[used * d], d, &cache_vals[slot * d]);
    }
  Array cache(c.dtype, cache_vals);
  Array q(c.dtype, testing::random_values(static_cast<size_t>(B * c.s_q * c.h_q * d), c.seed + 2));
  Array out(c.dtype, static_cast<size_t>(B * c.s_q * c.h_q * dv));
  std::vector<float> lse(static_cast<size_t>(B * c.h_q * c.s_q), kNaN);

  DecodeParams p;
  p.batch = B, p.s_q = c.s_q, p.h_q = c.h_q, p.head_dim = d, p.head_dim_v = dv;
  p.page_size = P, p.num_pages = num_pages, p.max_pages = max_pages, p.dtype = c.dtype;
  p.q = q.data(), p.kv_cache = cache.data(), p.block_table = table.data(), p.cache_seqlens = c.seqlens.data();
  p.softmax_scale = 0.125f, p.causal = c.causal, p.out = out.data(), p.lse = lse.data();
  decode_attention(device, p);

  std::vector<double> want(out.f32.size()), want_lse(lse.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < c.s_q; ++i)
      for (int64_t h = 0; h < c.h_q; ++h) {
        const float* qr = &q.f32[((b * c.s_q + i) * c.h_q + h) * d];
        auto key = [&](int64_t t) { return &cache.f32[(int64_t{table[b * max_pages + t / P]} * P + t % P) * d]; };
        auto logit = [&](int64_t t) {
          double s = 0;
          for (int64_t j = 0; j < d; ++j) s += double{qr[j]} * key(t)[j];
          return s;
        };
        const int64_t L = c.seqlens[b], visible = c.causal ? L - (c.s_q - 1 - i) : L;
        reference_row(visible, dv, p.softmax_scale, logit, [&](int64_t t, int64_t j) { return double{key(t)[j]}; },
                      &want[((b * c.s_q + i) * c.h_q + h) * dv], want_lse[(b * c.h_q + h) * c.s_q + i]);
      }
  const std::string what = device + " " + std::string(dtype_name(c.dtype)) + " h_q=" + std::to_string(c.h_q) +
                           " s_q=" + std::to_string(c.s_q) + " page=" + std::to_string(P) +
                           (c.causal ? " causal" : "") + " seed=" + std::to_string(c.seed);
  expect_close(out.values(), want, tolerance(c.dtype), what);
  expect_lse(lse, want_lse, what);
}

// Lengths that hit page edges, zeros and a random one.
std::vector<int32_t> random_lengths(std::mt19937_64& rng, int64_t batch, int64_t page, int64_t max_len) {
  const int64_t picks[] = {0, 1, 17, page - 1, page, page + 1, 2 * page + 3};
  std::vector<int32_t> v;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t k = static_cast<int64_t>(rng() % 9);
    v.push_back(static_cast<int32_t>(k < 7 ? std::min(picks[k], max_len) : static_cast<int64_t>(rng() % (max_len + 1))));
  }
  return v;
}

TEST(DecodeAttention, MatchesDoubleLoopF32) {
  uint64_t seed = 1;
  for (int64_t h_q : {1, 3, 16, 128})
    for (int64_t s_q : {1, 2, 4})
      for (int64_t page : {1, 16, 64, 256}) {
        std::mt19937_64 rng(seed);
        DecodeCase c{h_q, s_q, page, 576, 512, random_lengths(rng, 3, page, h_q >= 16 ? 300 : 600),
                     seed % 2 == 0, DType::F32, seed};
        c.seqlens[0] = 0;  // always one empty sequence
        run_decode_case(c, "cpu");
        ++seed;
      }
}

TEST(DecodeAttention, MatchesDoubleLoopHalfTypes) {
  uint64_t seed = 100;
  for (DType dt : {DType::BF16, DType::F16})
    for (int64_t h_q : {1, 16, 128})
      for (int64_t page : {1, 64, 256})
        for (bool causal : {false, true}) {
          std::mt19937_64 rng(seed);
          DecodeCase c{h_q, causal ? 4 : 1, page, 576, 512, random_lengths(rng, 2, page, 300), causal, dt, seed++};
          run_decode_case(c, "cpu");
        }
}

TEST(DecodeAttention, OddHeadDimsAndLongSequences) {
  run_decode_case({3, 2, 16, 72, 40, {1013, 0, 5}, true, DType::F32, 7}, "cpu");
  run_decode_case({63, 1, 64, 576, 512, {2049}, false, DType::BF16, 8}, "cpu");
  run_decode_case({126, 2, 256, 576, 512, {700, 1}, true, DType::F16, 9}, "cpu");
  run_decode_case({5, 3, 2, 64, 64, {3, 2, 1, 0}, true, DType::F32, 10}, "cpu");  // causal rows with no key
}

TEST(DecodeAttention, ReferenceBackendUsesTheSameKernels) {
  run_decode_case({16, 2, 64, 576, 512, {100, 0, 65}, true, DType::BF16, 11}, "cpu-reference");
}

TEST(DecodeAttention, LseMayBeNullAndEmptySequencesGiveZeros) {
  std::vector<float> q(2 * 4 * 8, 1.f), cache(4 * 8, kNaN), out(2 * 4 * 8, kNaN);
  std::vector<int32_t> table{0, 1, 2, 3}, lens{0, 0};
  DecodeParams p;
  p.batch = 2, p.s_q = 1, p.h_q = 4, p.head_dim = 8, p.head_dim_v = 8, p.page_size = 2, p.num_pages = 2;
  p.max_pages = 2, p.dtype = DType::F32, p.q = q.data(), p.kv_cache = cache.data(), p.block_table = table.data();
  p.cache_seqlens = lens.data(), p.softmax_scale = 1.f, p.out = out.data();
  decode_attention("cpu", p);
  for (float v : out) EXPECT_EQ(v, 0.f);
}

// ---- prefill ----

struct PrefillCase {
  int64_t heads, dqk, dv;
  std::vector<int32_t> n_q, n_k;
  bool causal;
  DType dtype;
  uint64_t seed;
};

void run_prefill_case(const PrefillCase& c, const std::string& device = "cpu") {
  const int64_t B = static_cast<int64_t>(c.n_q.size()), H = c.heads;
  std::vector<int32_t> cu_q{0}, cu_k{0};
  for (int64_t b = 0; b < B; ++b) cu_q.push_back(cu_q.back() + c.n_q[b]), cu_k.push_back(cu_k.back() + c.n_k[b]);
  const int64_t Tq = cu_q.back(), Tk = cu_k.back();
  Array q(c.dtype, testing::random_values(static_cast<size_t>(Tq * H * c.dqk), c.seed));
  Array k(c.dtype, testing::random_values(static_cast<size_t>(Tk * H * c.dqk), c.seed + 1));
  Array v(c.dtype, testing::random_values(static_cast<size_t>(Tk * H * c.dv), c.seed + 2));
  Array out(c.dtype, static_cast<size_t>(Tq * H * c.dv));
  std::vector<float> lse(static_cast<size_t>(H * Tq), kNaN);
  PrefillParams p;
  p.batch = B, p.num_heads = H, p.head_dim_qk = c.dqk, p.head_dim_v = c.dv, p.total_q = Tq, p.total_k = Tk;
  p.dtype = c.dtype, p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data();
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.softmax_scale = 0.3f, p.causal = c.causal;
  p.out = out.data(), p.lse = lse.data();
  prefill_attention(device, p);

  std::vector<double> want(out.f32.size()), want_lse(lse.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < c.n_q[b]; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const float* qr = &q.f32[((cu_q[b] + i) * H + h) * c.dqk];
        auto logit = [&](int64_t t) {
          double s = 0;
          for (int64_t j = 0; j < c.dqk; ++j) s += double{qr[j]} * k.f32[((cu_k[b] + t) * H + h) * c.dqk + j];
          return s;
        };
        auto value = [&](int64_t t, int64_t j) { return double{v.f32[((cu_k[b] + t) * H + h) * c.dv + j]}; };
        const int64_t visible = c.causal ? std::min<int64_t>(c.n_k[b], c.n_k[b] - c.n_q[b] + i + 1) : c.n_k[b];
        reference_row(visible, c.dv, p.softmax_scale, logit, value, &want[((cu_q[b] + i) * H + h) * c.dv],
                      want_lse[h * Tq + cu_q[b] + i]);
      }
  const std::string what = device + " " + std::string(dtype_name(c.dtype)) + " heads=" + std::to_string(H) +
                           (c.causal ? " causal" : "") + " seed=" + std::to_string(c.seed);
  expect_close(out.values(), want, tolerance(c.dtype), what);
  expect_lse(lse, want_lse, what);
}

TEST(PrefillAttention, MatchesDoubleLoop) {
  uint64_t seed = 200;
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (int64_t heads : {1, 3, 16})
      for (bool causal : {true, false}) {
        std::mt19937_64 rng(seed);
        std::vector<int32_t> n_q, n_k;
        for (int b = 0; b < 4; ++b) {
          const auto nk = static_cast<int32_t>(rng() % 300);
          n_k.push_back(nk);
          n_q.push_back(b == 0 ? nk : static_cast<int32_t>(rng() % (nk + 1)));  // self-attention, then with a prefix
        }
        n_k[3] = 0, n_q[3] = 2;  // queries with no key at all
        run_prefill_case({heads, 192, 128, n_q, n_k, causal, dt, seed++});
      }
  run_prefill_case({2, 40, 24, {70, 5, 0}, {3, 5, 9}, true, DType::F32, 300});  // n_q > n_k: leading rows see nothing
  run_prefill_case({2, 192, 128, {130}, {130}, true, DType::BF16, 301}, "cpu-reference");
}

// ---- validation ----

struct DecodeFixture {
  std::vector<float> q = std::vector<float>(2 * 3 * 16, 0.5f), cache = std::vector<float>(4 * 4 * 16, 0.25f);
  std::vector<float> out = std::vector<float>(2 * 3 * 8), lse = std::vector<float>(2 * 3);
  std::vector<int32_t> table{0, 1, 3, 2}, lens{5, 8};
  DecodeParams p;
  DecodeFixture() {
    p.batch = 2, p.s_q = 1, p.h_q = 3, p.head_dim = 16, p.head_dim_v = 8, p.page_size = 4, p.num_pages = 4;
    p.max_pages = 2, p.dtype = DType::F32, p.q = q.data(), p.kv_cache = cache.data(), p.block_table = table.data();
    p.cache_seqlens = lens.data(), p.softmax_scale = 0.25f, p.out = out.data(), p.lse = lse.data();
  }
};

// Runs f, expects InvalidArgument whose message contains every piece.
template <class F>
void expect_invalid(F f, std::initializer_list<std::string> pieces) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning " << *pieces.begin();
  } catch (const InvalidArgument& e) {
    for (const std::string& s : pieces) EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << e.what();
  }
}

TEST(DecodeAttention, ValidFixtureRuns) {
  DecodeFixture f;
  for (const std::string& dev : kDevices) EXPECT_NO_THROW(decode_attention(dev, f.p));
}

TEST(DecodeAttention, RejectsBadParameters) {
  auto bad = [](auto edit, std::initializer_list<std::string> pieces) {
    DecodeFixture f;
    edit(f);
    expect_invalid([&] { decode_attention("cpu", f.p); }, pieces);
  };
  bad([](DecodeFixture& f) { f.p.q = nullptr; }, {"q must not be null"});
  bad([](DecodeFixture& f) { f.p.kv_cache = nullptr; }, {"kv_cache"});
  bad([](DecodeFixture& f) { f.p.block_table = nullptr; }, {"block_table"});
  bad([](DecodeFixture& f) { f.p.cache_seqlens = nullptr; }, {"cache_seqlens"});
  bad([](DecodeFixture& f) { f.p.out = nullptr; }, {"out"});
  bad([](DecodeFixture& f) { f.p.batch = 0; }, {"batch", "got 0"});
  bad([](DecodeFixture& f) { f.p.s_q = -1; }, {"s_q", "got -1"});
  bad([](DecodeFixture& f) { f.p.h_q = 0; }, {"h_q", "got 0"});
  bad([](DecodeFixture& f) { f.p.head_dim = 0; }, {"head_dim"});
  bad([](DecodeFixture& f) { f.p.head_dim_v = 17; }, {"head_dim_v", "<= head_dim = 16", "got 17"});
  bad([](DecodeFixture& f) { f.p.page_size = 3; }, {"page_size", "power of two", "got 3"});
  bad([](DecodeFixture& f) { f.p.num_pages = 0; }, {"num_pages"});
  bad([](DecodeFixture& f) { f.p.max_pages = 0; }, {"max_pages"});
  bad([](DecodeFixture& f) { f.p.dtype = DType::F64; }, {"dtype", "BF16, F16 or F32", "F64"});
  bad([](DecodeFixture& f) { f.p.softmax_scale = 0.f; }, {"softmax_scale"});
  bad([](DecodeFixture& f) { f.p.softmax_scale = kNaN; }, {"softmax_scale"});
  bad([](DecodeFixture& f) { f.lens[1] = 9; }, {"cache_seqlens[1]", "max_pages * page_size = 8", "got 9", "batch index 1"});
  bad([](DecodeFixture& f) { f.lens[0] = -2; }, {"cache_seqlens[0]", "got -2", "batch index 0"});
  bad([](DecodeFixture& f) { f.table[3] = 4; }, {"block_table[1, 1]", "num_pages = 4", "got 4", "batch index 1"});
  bad([](DecodeFixture& f) { f.table[1] = -1; }, {"block_table[0, 1]", "got -1", "batch index 0"});
  expect_invalid([] { decode_attention("tpu", DecodeFixture().p); }, {"unknown device 'tpu'", "cpu"});
}

TEST(DecodeAttention, UnusedBlockTableEntriesAreNotChecked) {
  DecodeFixture f;
  f.lens[0] = 4;        // one page used
  f.table[1] = 99999;   // the second entry of row 0 is never read
  EXPECT_NO_THROW(decode_attention("cpu", f.p));
}

struct PrefillFixture {
  std::vector<float> q = std::vector<float>(5 * 2 * 8, 0.5f), k = std::vector<float>(7 * 2 * 8, 0.25f);
  std::vector<float> v = std::vector<float>(7 * 2 * 4, 1.f), out = std::vector<float>(5 * 2 * 4);
  std::vector<int32_t> cu_q{0, 2, 5}, cu_k{0, 3, 7};
  PrefillParams p;
  PrefillFixture() {
    p.batch = 2, p.num_heads = 2, p.head_dim_qk = 8, p.head_dim_v = 4, p.total_q = 5, p.total_k = 7;
    p.dtype = DType::F32, p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data();
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.softmax_scale = 0.5f, p.out = out.data();
  }
};

TEST(PrefillAttention, RejectsBadParameters) {
  auto bad = [](auto edit, std::initializer_list<std::string> pieces) {
    PrefillFixture f;
    edit(f);
    expect_invalid([&] { prefill_attention("cpu", f.p); }, pieces);
  };
  {
    PrefillFixture f;
    EXPECT_NO_THROW(prefill_attention("cpu", f.p));
    for (float x : f.out) EXPECT_NEAR(x, 1.f, 1e-6);
  }
  bad([](PrefillFixture& f) { f.p.q = nullptr; }, {"q must not be null"});
  bad([](PrefillFixture& f) { f.p.v = nullptr; }, {"v must not be null"});
  bad([](PrefillFixture& f) { f.p.cu_seqlens_k = nullptr; }, {"cu_seqlens_k"});
  bad([](PrefillFixture& f) { f.p.cu_seqlens_on_device = true; }, {"cu_seqlens_on_device", "cuda"});
  bad([](PrefillFixture& f) { f.p.num_heads = 0; }, {"num_heads", "got 0"});
  bad([](PrefillFixture& f) { f.p.head_dim_v = 0; }, {"head_dim_v"});
  bad([](PrefillFixture& f) { f.p.dtype = DType::I32; }, {"dtype", "I32"});
  bad([](PrefillFixture& f) { f.cu_q[0] = 1; }, {"cu_seqlens_q[0] must be 0", "got 1"});
  bad([](PrefillFixture& f) { f.cu_k[1] = 8; }, {"cu_seqlens_k", "non-decreasing", "batch index 1"});
  bad([](PrefillFixture& f) { f.p.total_q = 6; }, {"cu_seqlens_q[batch]", "total_q = 6", "got 5"});
  bad([](PrefillFixture& f) { f.p.softmax_scale = -1.f; }, {"softmax_scale"});
}

// ---- fp8 cache (DecodeParams::fp8_kv_cache) ----

// The fp8 decode computes exactly what the bf16 decode computes over a bf16 cache holding the dequantised rows
// bf16(fp8 · scale): both gather the same values into the same blocks and splits, so out and lse are equal bit
// for bit (only the gather differs). Random shapes, s_q 1 and 2, causal or not, lengths with zeros and page
// edges, permuted pages, NaN rows in every unused slot of both caches; plus a double loop over the dequantised
// rows as an independent check.
TEST(DecodeAttention, Fp8CacheEqualsBf16DecodeOfDequantisedRows) {
  uint64_t seed = 500;
  struct Dims {
    int64_t d, dv;
  };
  for (Dims dims : {Dims{576, 512}, Dims{200, 136}})
    for (int64_t h_q : {1, 16})
      for (int64_t s_q : {1, 2})
        for (int64_t P : {1, 16, 64}) {
          if (dims.d != 576 && P == 64) continue;  // for time
          ++seed;
          std::mt19937_64 rng(seed);
          std::vector<int32_t> lens = random_lengths(rng, 3, P, 260);
          lens[seed % 3] = 0;
          const int64_t B = 3, d = dims.d, dv = dims.dv;
          const RowLayout lay{.dtype = DType::F8_E4M3, .latent = dv, .rope = d - dv};
          int64_t max_pages = 1, used_pages = 0;
          for (int32_t L : lens) {
            max_pages = std::max<int64_t>(max_pages, (L + P - 1) / P + 1);
            used_pages += (L + P - 1) / P;
          }
          const int64_t num_pages = used_pages + 2;
          std::vector<int32_t> order(static_cast<size_t>(num_pages));
          std::iota(order.begin(), order.end(), 0);
          std::shuffle(order.begin(), order.end(), rng);
          std::vector<int32_t> table(static_cast<size_t>(B * max_pages), -1);
          int64_t next = 0;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < (lens[b] + P - 1) / P; ++j) table[b * max_pages + j] = order[next++];
          // Both caches NaN everywhere, then the stored rows: fp8 from store_row, bf16 from load_row of those bytes.
          std::vector<std::byte> fp8(static_cast<size_t>(num_pages * P * lay.bytes()));
          const std::vector<float> nan_row(static_cast<size_t>(d), kNaN);
          for (int64_t slot = 0; slot < num_pages * P; ++slot) store_row(lay, nan_row.data(), &fp8[slot * lay.bytes()]);
          std::vector<uint16_t> bf16(static_cast<size_t>(num_pages * P * d), 0x7fc0);
          std::vector<float> deq(static_cast<size_t>(num_pages * P * d), kNaN);
          for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < lens[b]; ++t) {
              const int64_t slot = int64_t{table[b * max_pages + t / P]} * P + t % P;
              // Rows of varied magnitude; every fifth has an outlier that pushes its group's others to subnormal codes.
              std::vector<float> row = testing::random_values(static_cast<size_t>(d), seed * 1000 + b * 400 + t,
                                                              std::ldexp(1.f, static_cast<int>(t % 7) - 3));
              if (t % 5 == 0) row[static_cast<size_t>(t % dv)] *= 300.f;
              store_row(lay, row.data(), &fp8[slot * lay.bytes()]);
              load_row(lay, &fp8[slot * lay.bytes()], &deq[slot * d]);
              for (int64_t j = 0; j < d; ++j) bf16[slot * d + j] = float_to_bf16(deq[slot * d + j]);
            }
          Array q(DType::BF16, testing::random_values(static_cast<size_t>(B * s_q * h_q * d), seed + 2));
          Array out8(DType::BF16, static_cast<size_t>(B * s_q * h_q * dv)), out16 = out8;
          std::vector<float> lse8(static_cast<size_t>(B * h_q * s_q), kNaN), lse16 = lse8;
          DecodeParams p;
          p.batch = B, p.s_q = s_q, p.h_q = h_q, p.head_dim = d, p.head_dim_v = dv;
          p.page_size = P, p.num_pages = num_pages, p.max_pages = max_pages, p.dtype = DType::BF16;
          p.q = q.data(), p.block_table = table.data(), p.cache_seqlens = lens.data();
          p.softmax_scale = 0.07f, p.causal = seed % 2 == 0;
          DecodeParams p8 = p, p16 = p;
          p8.fp8_kv_cache = true, p8.kv_cache = fp8.data(), p8.out = out8.data(), p8.lse = lse8.data();
          p16.kv_cache = bf16.data(), p16.out = out16.data(), p16.lse = lse16.data();
          const std::string what = "h_q=" + std::to_string(h_q) + " s_q=" + std::to_string(s_q) +
                                   " page=" + std::to_string(P) + " d=" + std::to_string(d) +
                                   (p.causal ? " causal" : "");
          for (const std::string& dev : kDevices) {
            decode_attention(dev, p8);
            decode_attention(dev, p16);
            EXPECT_EQ(out8.bits, out16.bits) << dev << " " << what;
            for (size_t i = 0; i < lse8.size(); ++i)
              EXPECT_EQ(std::bit_cast<uint32_t>(lse8[i]), std::bit_cast<uint32_t>(lse16[i])) << dev << " " << what;
          }
          // Independently: a double loop over the dequantised rows (one page size, for time).
          if (P != 16) continue;
          std::vector<double> want(out8.f32.size()), want_lse(lse8.size());
          for (int64_t b = 0; b < B; ++b)
            for (int64_t i = 0; i < s_q; ++i)
              for (int64_t h = 0; h < h_q; ++h) {
                const float* qr = &q.f32[((b * s_q + i) * h_q + h) * d];
                auto key = [&](int64_t t) { return &deq[(int64_t{table[b * max_pages + t / P]} * P + t % P) * d]; };
                auto logit = [&](int64_t t) {
                  double acc = 0;
                  for (int64_t j = 0; j < d; ++j) acc += double{qr[j]} * key(t)[j];
                  return acc;
                };
                const int64_t L = lens[b], visible = p.causal ? L - (s_q - 1 - i) : L;
                reference_row(
                    visible, dv, p.softmax_scale, logit, [&](int64_t t, int64_t j) { return double{key(t)[j]}; },
                    &want[((b * s_q + i) * h_q + h) * dv], want_lse[(b * h_q + h) * s_q + i]);
              }
          expect_close(out8.values(), want, tolerance(DType::BF16), what);
          expect_lse(lse8, want_lse, what);
        }
}

}  // namespace
}  // namespace mla

// ---- the layer's absorbed path is decode_attention over its own cache ----

namespace mla {
namespace {

TEST(DecodeAttention, EqualsTheAbsorbedLayerOnItsCache) {
  const Config c = Config::preset("v2-lite");
  const LayerWeights w = LayerWeights::random(c, 5);
  const DerivedConstants k = DerivedConstants::compute(c);
  const int64_t D = c.hidden_size, H = c.num_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  const int64_t dv = c.v_head_dim, dc = c.kv_lora_rank, W = c.latent_dim(), dqk = dn + dr, L = 70;
  Attention layer(w, {.device = "cpu", .precision = Precision::F32, .path = Path::Absorbed});
  LatentCache cache = layer.make_cache(16, 16, 3);
  const SeqId seq = cache.add_sequence();
  const std::vector<float> hidden = testing::random_values(static_cast<size_t>((L + 1) * D), 6);
  std::vector<float> out(static_cast<size_t>((L + 1) * D));
  const SequenceChunk prompt{seq, L}, step{seq, 1};
  layer.forward({&prompt, 1}, hidden.data(), out.data(), cache);
  layer.forward({&step, 1}, hidden.data() + L * D, out.data() + L * D, cache);
  cache.fill_unused(kNaN);

  // The decode step by hand: q = W_q x, rope at position L, q̂_h = W_UK^hᵀ qn_h; rows [q̂_h | qr_h].
  const float* x = hidden.data() + L * D;
  std::vector<float> q(static_cast<size_t>(H * dqk), 0.f), rows(static_cast<size_t>(H * W), 0.f);
  for (int64_t r = 0; r < H * dqk; ++r)
    for (int64_t j = 0; j < D; ++j) q[r] += w.q_proj.row(r)[j] * x[j];
  for (int64_t h = 0; h < H; ++h) {
    cpu::rope_pairs(&q[h * dqk + dn], dr, L, k);
    for (int64_t j = 0; j < dn; ++j)
      for (int64_t e = 0; e < dc; ++e) rows[h * W + e] += q[h * dqk + j] * w.kv_b_proj.row(h * (dn + dv) + j)[e];
    std::copy_n(&q[h * dqk + dn], dr, &rows[h * W + dc]);
  }
  const auto table = cache.block_table(seq);
  const int32_t len = static_cast<int32_t>(L + 1);
  std::vector<float> ohat(static_cast<size_t>(H * dc));
  DecodeParams p;
  p.batch = 1, p.s_q = 1, p.h_q = H, p.head_dim = W, p.head_dim_v = dc, p.page_size = 16, p.num_pages = 16;
  p.max_pages = static_cast<int64_t>(table.size()), p.dtype = DType::F32, p.q = rows.data();
  p.kv_cache = cache.storage(), p.block_table = table.data(), p.cache_seqlens = &len;
  p.softmax_scale = k.softmax_scale, p.out = ohat.data();
  decode_attention("cpu", p);

  // o_h = W_UV^h ô_h, then out = W_o o.
  std::vector<float> o(static_cast<size_t>(H * dv), 0.f), want(static_cast<size_t>(D), 0.f);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < dv; ++j)
      for (int64_t e = 0; e < dc; ++e) o[h * dv + j] += w.kv_b_proj.row(h * (dn + dv) + dn + j)[e] * ohat[h * dc + e];
  for (int64_t r = 0; r < D; ++r)
    for (int64_t j = 0; j < H * dv; ++j) want[r] += w.o_proj.row(r)[j] * o[j];
  const std::vector<float> got(out.begin() + L * D, out.end());
  EXPECT_LT(testing::rel_error(got, want), 1e-5);
}

}  // namespace
}  // namespace mla
