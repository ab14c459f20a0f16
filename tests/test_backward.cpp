// prefill_attention_backward on the CPU: the fast path against the scalar reference on random varlen shapes, the
// reference against central finite differences of a scalar loss (the math), and parameter validation.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "testing.hpp"

namespace mla {
namespace {

using testing::expect_throw_with;
using testing::random_values;

// One varlen problem in f32: inputs, forward's out and lse (from "cpu-reference"), and an upstream gradient.
struct Problem {
  int64_t heads = 2, dqk = 8, dv = 4;
  bool causal = true;
  float scale = 0.3f;
  std::vector<int32_t> cu_q{0}, cu_k{0};
  std::vector<float> q, k, v, out, lse, d_out;

  Problem(std::vector<int> n_q, std::vector<int> n_k, int64_t heads_, int64_t dqk_, int64_t dv_, bool causal_,
          uint64_t seed)
      : heads(heads_), dqk(dqk_), dv(dv_), causal(causal_), scale(1.f / std::sqrt(static_cast<float>(dqk_))) {
    for (size_t b = 0; b < n_q.size(); ++b) cu_q.push_back(cu_q.back() + n_q[b]), cu_k.push_back(cu_k.back() + n_k[b]);
    q = random_values(static_cast<size_t>(tq() * heads * dqk), seed, 1.f);
    k = random_values(static_cast<size_t>(tk() * heads * dqk), seed + 1, 1.f);
    v = random_values(static_cast<size_t>(tk() * heads * dv), seed + 2, 1.f);
    d_out = random_values(static_cast<size_t>(tq() * heads * dv), seed + 3, 1.f);
    forward();
  }
  int64_t batch() const { return static_cast<int64_t>(cu_q.size()) - 1; }
  int64_t tq() const { return cu_q.back(); }
  int64_t tk() const { return cu_k.back(); }

  PrefillParams forward_params() {
    PrefillParams p;
    p.batch = batch(), p.num_heads = heads, p.head_dim_qk = dqk, p.head_dim_v = dv, p.total_q = tq(), p.total_k = tk();
    p.dtype = DType::F32, p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data();
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.softmax_scale = scale, p.causal = causal;
    return p;
  }
  void forward() {
    out.assign(static_cast<size_t>(tq() * heads * dv), 0.f);
    lse.assign(static_cast<size_t>(heads * tq()), 0.f);
    PrefillParams p = forward_params();
    p.out = out.data(), p.lse = lse.data();
    prefill_attention("cpu-reference", p);
  }
  // Σ out ⊙ d_out: the loss whose gradient the backward computes.
  double loss() {
    forward();
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += static_cast<double>(out[i]) * d_out[i];
    return l;
  }
};

struct Grads {
  std::vector<float> dq, dk, dv;
};

// Runs the backward on `device` (dtype F32, or BF16 with the inputs rounded to bf16 and the results widened).
Grads backward(const std::string& device, Problem& pr, DType dtype = DType::F32) {
  Grads g{std::vector<float>(pr.q.size(), NAN), std::vector<float>(pr.k.size(), NAN), std::vector<float>(pr.v.size(), NAN)};
  PrefillBackwardParams p;
  p.batch = pr.batch(), p.num_heads = pr.heads, p.head_dim_qk = pr.dqk, p.head_dim_v = pr.dv;
  p.total_q = pr.tq(), p.total_k = pr.tk(), p.dtype = dtype;
  p.cu_seqlens_q = pr.cu_q.data(), p.cu_seqlens_k = pr.cu_k.data();
  p.softmax_scale = pr.scale, p.causal = pr.causal, p.lse = pr.lse.data();
  if (dtype == DType::F32) {
    p.q = pr.q.data(), p.k = pr.k.data(), p.v = pr.v.data(), p.out = pr.out.data(), p.d_out = pr.d_out.data();
    p.d_q = g.dq.data(), p.d_k = g.dk.data(), p.d_v = g.dv.data();
    prefill_attention_backward(device, p);
    return g;
  }
  auto bf = [](const std::vector<float>& x) {
    std::vector<uint16_t> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = float_to_bf16(x[i]);
    return y;
  };
  const auto q = bf(pr.q), k = bf(pr.k), v = bf(pr.v), o = bf(pr.out), d_o = bf(pr.d_out);
  std::vector<uint16_t> dq(g.dq.size()), dk(g.dk.size()), dv(g.dv.size());
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = o.data(), p.d_out = d_o.data();
  p.d_q = dq.data(), p.d_k = dk.data(), p.d_v = dv.data();
  prefill_attention_backward(device, p);
  for (size_t i = 0; i < dq.size(); ++i) g.dq[i] = bf16_to_float(dq[i]);
  for (size_t i = 0; i < dk.size(); ++i) g.dk[i] = bf16_to_float(dk[i]);
  for (size_t i = 0; i < dv.size(); ++i) g.dv[i] = bf16_to_float(dv[i]);
  return g;
}

// max |a − b| relative to max |b| (1 where b is all zero).
void expect_near_rel(const std::vector<float>& a, const std::vector<float>& b, double tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << what << "[" << i << "]";
    err = std::max(err, std::abs(static_cast<double>(a[i]) - b[i]));
    ref = std::max(ref, std::abs(static_cast<double>(b[i])));
  }
  EXPECT_LE(err, tol * std::max(ref, 1.0)) << what << ": max abs error " << err << ", max |ref| " << ref;
}

struct Shape {
  std::vector<int> n_q, n_k;
  int64_t heads, dqk, dv;
  bool causal;
};

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s{
      {{5}, {5}, 1, 8, 4, true},
      {{3, 0, 70, 17}, {3, 4, 70, 40}, 2, 16, 8, true},  // an empty query range, n_q < n_k, tiles of 64
      {{130, 1}, {150, 9}, 3, 12, 20, true},
      {{6, 9, 0}, {11, 2, 0}, 2, 8, 8, false},           // n_q > n_k (non-causal), an empty sequence
      {{8, 5}, {3, 0}, 1, 4, 4, true},                   // rows that see no key, a sequence without keys
      {{65, 2}, {65, 33}, 2, 192, 128, true},
  };
  return s;
}

TEST(PrefillBackward, FastMatchesReference) {
  uint64_t seed = 11;
  for (const Shape& s : shapes()) {
    Problem pr(s.n_q, s.n_k, s.heads, s.dqk, s.dv, s.causal, seed += 10);
    const Grads want = backward("cpu-reference", pr), got = backward("cpu", pr);
    const std::string name = "shape " + std::to_string(&s - shapes().data());
    expect_near_rel(got.dq, want.dq, 1e-5, name + " d_q");
    expect_near_rel(got.dk, want.dk, 1e-5, name + " d_k");
    expect_near_rel(got.dv, want.dv, 1e-5, name + " d_v");
  }
}

TEST(PrefillBackward, Bf16MatchesF32) {
  Problem pr({20, 7}, {33, 7}, 2, 24, 16, true, 5);
  const Grads want = backward("cpu-reference", pr);
  for (const std::string dev : {"cpu", "cpu-reference"}) {
    const Grads got = backward(dev, pr, DType::BF16);
    expect_near_rel(got.dq, want.dq, 3e-2, dev + " d_q");
    expect_near_rel(got.dk, want.dk, 3e-2, dev + " d_k");
    expect_near_rel(got.dv, want.dv, 3e-2, dev + " d_v");
  }
}

TEST(PrefillBackward, RowsThatSeeNoKeyGiveZeros) {
  // Causal, n_q = 4 over n_k = 2: queries 0 and 1 see no key (lse = +inf); the empty second sequence has keys only.
  Problem pr({4, 0}, {2, 3}, 1, 4, 4, true, 3);
  EXPECT_TRUE(std::isinf(pr.lse[0]) && std::isinf(pr.lse[1]));
  for (const std::string dev : {"cpu", "cpu-reference"}) {
    const Grads g = backward(dev, pr);
    for (int e = 0; e < 8; ++e) EXPECT_EQ(g.dq[e], 0.f) << dev;
    for (size_t e = 2 * 4; e < g.dk.size(); ++e) EXPECT_EQ(g.dk[e], 0.f) << dev;
    for (size_t e = 2 * 4; e < g.dv.size(); ++e) EXPECT_EQ(g.dv[e], 0.f) << dev;
  }
}

// d(Σ out ⊙ g)/dx by central differences of the f32 forward against the reference backward, at tiny sizes.
TEST(PrefillBackward, ReferenceMatchesFiniteDifferences) {
  for (const bool causal : {true, false}) {
    Problem pr({3, 2}, {4, 2}, 2, 6, 5, causal, causal ? 21 : 31);
    const Grads g = backward("cpu-reference", pr);
    const float eps = 1e-2f;
    auto check = [&](std::vector<float>& x, const std::vector<float>& grad, const char* what) {
      for (size_t i = 0; i < x.size(); ++i) {
        const float x0 = x[i];
        x[i] = x0 + eps;
        const double up = pr.loss();
        x[i] = x0 - eps;
        const double down = pr.loss();
        x[i] = x0;
        const double fd = (up - down) / (2.0 * eps);
        EXPECT_NEAR(grad[i], fd, 2e-3 + 2e-3 * std::abs(fd)) << what << "[" << i << "] causal " << causal;
      }
    };
    check(pr.q, g.dq, "d_q");
    check(pr.k, g.dk, "d_k");
    check(pr.v, g.dv, "d_v");
    pr.forward();
  }
}

// ---- validation ----

struct Fixture {
  Problem pr{{3, 2}, {4, 2}, 2, 8, 4, true, 1};
  Grads g{std::vector<float>(pr.q.size()), std::vector<float>(pr.k.size()), std::vector<float>(pr.v.size())};
  PrefillBackwardParams p;
  Fixture() {
    p.batch = 2, p.num_heads = 2, p.head_dim_qk = 8, p.head_dim_v = 4, p.total_q = 5, p.total_k = 6;
    p.dtype = DType::F32, p.cu_seqlens_q = pr.cu_q.data(), p.cu_seqlens_k = pr.cu_k.data();
    p.q = pr.q.data(), p.k = pr.k.data(), p.v = pr.v.data(), p.out = pr.out.data(), p.lse = pr.lse.data();
    p.d_out = pr.d_out.data(), p.softmax_scale = 0.3f, p.d_q = g.dq.data(), p.d_k = g.dk.data(), p.d_v = g.dv.data();
  }
};

void expect_rejects(const std::function<void(PrefillBackwardParams&)>& edit, std::initializer_list<std::string> words) {
  for (const std::string dev : {"cpu", "cpu-reference"}) {
    Fixture f;
    edit(f.p);
    expect_throw_with<InvalidArgument>([&] { prefill_attention_backward(dev, f.p); }, words);
  }
}

TEST(PrefillBackward, ValidFixtureRunsAndNeedsNoWorkspace) {
  Fixture f;
  for (const std::string dev : {"cpu", "cpu-reference"}) {
    EXPECT_NO_THROW(prefill_attention_backward(dev, f.p));
    EXPECT_EQ(prefill_attention_backward_workspace_bytes(dev, f.p), 0);
  }
}

TEST(PrefillBackward, RejectsBadParameters) {
  expect_rejects([](auto& p) { p.q = nullptr; }, {"prefill_attention_backward", "q must not be null"});
  expect_rejects([](auto& p) { p.k = nullptr; }, {"k must not be null"});
  expect_rejects([](auto& p) { p.lse = nullptr; }, {"lse must not be null"});
  expect_rejects([](auto& p) { p.d_out = nullptr; }, {"d_out must not be null"});
  expect_rejects([](auto& p) { p.d_q = nullptr; }, {"d_q must not be null"});
  expect_rejects([](auto& p) { p.d_k = nullptr; }, {"d_k must not be null"});
  expect_rejects([](auto& p) { p.d_v = nullptr; }, {"d_v must not be null"});
  expect_rejects([](auto& p) { p.cu_seqlens_k = nullptr; }, {"cu_seqlens_k must not be null"});
  expect_rejects([](auto& p) { p.dtype = DType::F16; }, {"dtype", "F16"});
  expect_rejects([](auto& p) { p.num_heads = 0; }, {"num_heads"});
  expect_rejects([](auto& p) { p.head_dim_v = -1; }, {"head_dim_v"});
  expect_rejects([](auto& p) { p.softmax_scale = 0.f; }, {"softmax_scale"});
  expect_rejects([](auto& p) { p.total_q = 4; }, {"cu_seqlens_q[batch]", "total_q"});
  expect_rejects([](auto& p) { p.total_k = 7; }, {"cu_seqlens_k[batch]", "total_k"});
  expect_rejects([](auto& p) { p.cu_seqlens_on_device = true; }, {"cu_seqlens_on_device"});
  expect_throw_with<InvalidArgument>([] { prefill_attention_backward("tpu", Fixture().p); }, {"tpu"});
}

}  // namespace
}  // namespace mla
