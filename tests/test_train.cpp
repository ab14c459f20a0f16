// The training reference (mla/train.hpp): its forward against transformers' float64 goldens, its backward
// against central finite differences of the same forward (every weight tensor, the norms, the biases and the
// hidden states), and its argument checks. The fast CPU path (train::forward / backward): against the reference on
// random configs and against the same goldens, and the same argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "mla/train.hpp"
#include "testing.hpp"

namespace mla {
namespace {

using testing::rel_error;

std::vector<int32_t> golden_cu_seqlens(const testing::GoldenCase& g) {
  std::vector<int32_t> cu{0};
  for (int64_t b = 0; b < g.batch; ++b) cu.push_back(cu.back() + static_cast<int32_t>(g.tokens));
  return cu;
}

TEST(TrainReference, ForwardMatchesGoldens) {
  for (const char* name : {"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions", "fp8-sharded"}) {
    SCOPED_TRACE(name);
    const testing::GoldenCase g = testing::load_golden(name);
    const train::ForwardResult r = train::forward_reference(g.weights, g.hidden, golden_cu_seqlens(g), g.positions);
    EXPECT_LT(rel_error(r.out, g.output), 2e-6);
  }
}

// The fast path in float32: 1e-5 relative, the bound for f32 (measured: below 1e-6).
TEST(TrainFast, ForwardMatchesGoldens) {
  for (const char* name : {"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions", "fp8-sharded"}) {
    SCOPED_TRACE(name);
    const testing::GoldenCase g = testing::load_golden(name);
    const train::ForwardResultF32 r = train::forward(g.weights, g.hidden, golden_cu_seqlens(g), g.positions);
    const double err = rel_error(r.out, g.output);
    EXPECT_LT(err, 1e-5);
    if (std::getenv("MLA_TEST_VERBOSE")) std::printf("fast forward %s out %.3g\n", name, err);
  }
}

// The gradients [name in grad.safetensors] -> the layer's, for one backward result.
std::vector<std::pair<const char*, const std::vector<float>*>> named_gradients(const train::BackwardResult& r) {
  const train::LayerGradients& d = r.grads;
  return {{"hidden_states", &r.d_hidden},          {"q_proj.weight", &d.q_proj.data},
          {"q_a_proj.weight", &d.q_a_proj.data},   {"q_a_layernorm.weight", &d.q_a_norm},
          {"q_b_proj.weight", &d.q_b_proj.data},   {"kv_a_proj_with_mqa.weight", &d.kv_a_proj.data},
          {"kv_a_layernorm.weight", &d.kv_a_norm}, {"kv_b_proj.weight", &d.kv_b_proj.data},
          {"o_proj.weight", &d.o_proj.data}};
}

// The backward against transformers' float64 autograd (tests/data/make_grad_goldens.py wrote grad.safetensors:
// the gradients of DeepseekV3Attention for the case's weights and inputs under a fixed output gradient), through
// the reference or the fast path; every gradient within `bound` relative.
void check_golden_gradients(bool fast, double bound) {
  for (const char* name : {"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions"}) {
    SCOPED_TRACE(name);
    const testing::GoldenCase g = testing::load_golden(name);
    const SafetensorsFile want(testing::golden_dir(name) / "grad.safetensors");
    const std::vector<int32_t> cu = golden_cu_seqlens(g);
    const std::vector<float> d_out = want.read_f32("d_output");
    const train::BackwardResult r =
        fast ? train::backward(g.weights, train::forward(g.weights, g.hidden, cu, g.positions).saved, d_out)
             : train::backward_reference(g.weights,
                                         train::forward_reference(g.weights, g.hidden, cu, g.positions).saved, d_out);
    int compared = 0;
    for (const auto& [tensor, got] : named_gradients(r)) {
      const std::string key = std::string("grad.") + tensor;
      if (!want.contains(key)) {
        EXPECT_TRUE(got->empty()) << key << " is missing from the golden but the layer has it";
        continue;
      }
      const std::vector<float> ref = want.read_f32(key);
      ASSERT_EQ(got->size(), ref.size()) << key;
      const double err = rel_error(*got, ref);
      EXPECT_LT(err, bound) << key;
      if (std::getenv("MLA_TEST_VERBOSE"))
        std::printf("%s %s %s %.3g\n", fast ? "fast" : "reference", name, key.c_str(), err);
      ++compared;
    }
    EXPECT_GE(compared, 6);  // hidden, kv_a, its norm, kv_b, o and q_proj or (q_a, its norm, q_b)
  }
}

TEST(TrainReference, BackwardMatchesTransformersAutograd) { check_golden_gradients(false, 1e-5); }

// The f32 bound, 1e-5 relative (measured: see docs/training.md).
TEST(TrainFast, BackwardMatchesTransformersAutograd) { check_golden_gradients(true, 1e-5); }

// L = Σ d_out · out, evaluated in double from the saved attention output (out = o_proj · o + b is linear in o).
double loss(const LayerWeights& w, const std::vector<float>& hidden, const std::vector<int32_t>& cu,
            const std::vector<float>& d_out) {
  const train::ForwardResult r = train::forward_reference(w, hidden, cu);
  const int64_t D = w.config.hidden_size, HV = w.config.num_heads * w.config.v_head_dim;
  double sum = 0;
  for (int64_t t = 0; t < r.saved.tokens; ++t)
    for (int64_t e = 0; e < D; ++e) {
      double y = w.o_bias.empty() ? 0.0 : w.o_bias[static_cast<size_t>(e)];
      for (int64_t j = 0; j < HV; ++j)
        y += static_cast<double>(w.o_proj.data[static_cast<size_t>(e * HV + j)]) *
             r.saved.o[static_cast<size_t>(t * HV + j)];
      sum += d_out[static_cast<size_t>(t * D + e)] * y;
    }
  return sum;
}

// Central differences at a few entries of one tensor (its f32 values nudged by ±h, the actual step taken from
// the rounded values) against the analytic gradient at the same entries.
void check_tensor(const std::string& name, std::vector<float>& values, const std::vector<float>& grad,
                  const std::function<double()>& f, uint64_t seed) {
  SCOPED_TRACE(name);
  ASSERT_EQ(values.size(), grad.size());
  if (values.empty()) return;
  std::vector<double> numeric, analytic;
  uint64_t s = seed;
  for (int sample = 0; sample < 6; ++sample) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const size_t i = static_cast<size_t>(s >> 33) % values.size();
    const float keep = values[i];
    const float h = 1e-3f * std::max(1.0f, std::fabs(keep));
    values[i] = keep + h;
    const double up = f(), x_up = values[i];
    values[i] = keep - h;
    const double down = f(), x_down = values[i];
    values[i] = keep;
    numeric.push_back((up - down) / (x_up - x_down));
    analytic.push_back(grad[i]);
  }
  double num = 0, den = 0;
  for (size_t j = 0; j < numeric.size(); ++j)
    num += (numeric[j] - analytic[j]) * (numeric[j] - analytic[j]), den += numeric[j] * numeric[j];
  EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 1e-5)
      << "numeric[0] " << numeric[0] << " analytic[0] " << analytic[0];
}

void check_gradients(const Config& config, uint64_t seed) {
  LayerWeights w = LayerWeights::random(config, seed);
  const std::vector<int32_t> cu{0, 5, 5, 8};  // three sequences, one empty
  const int64_t T = cu.back(), D = config.hidden_size;
  std::vector<float> hidden = testing::random_values(static_cast<size_t>(T * D), seed + 1);
  const std::vector<float> d_out = testing::random_values(static_cast<size_t>(T * D), seed + 2);
  const train::ForwardResult fwd = train::forward_reference(w, hidden, cu);
  const train::BackwardResult bwd = train::backward_reference(w, fwd.saved, d_out);
  const auto f = [&] { return loss(w, hidden, cu, d_out); };
  const train::LayerGradients& g = bwd.grads;
  check_tensor("hidden", hidden, bwd.d_hidden, f, seed + 3);
  check_tensor("q_proj", w.q_proj.data, g.q_proj.data, f, seed + 4);
  check_tensor("q_a_proj", w.q_a_proj.data, g.q_a_proj.data, f, seed + 5);
  check_tensor("q_a_norm", w.q_a_norm, g.q_a_norm, f, seed + 6);
  check_tensor("q_b_proj", w.q_b_proj.data, g.q_b_proj.data, f, seed + 7);
  check_tensor("kv_a_proj", w.kv_a_proj.data, g.kv_a_proj.data, f, seed + 8);
  check_tensor("kv_a_norm", w.kv_a_norm, g.kv_a_norm, f, seed + 9);
  check_tensor("kv_b_proj", w.kv_b_proj.data, g.kv_b_proj.data, f, seed + 10);
  check_tensor("o_proj", w.o_proj.data, g.o_proj.data, f, seed + 11);
  check_tensor("q_bias", w.q_bias, g.q_bias, f, seed + 12);
  check_tensor("kv_a_bias", w.kv_a_bias, g.kv_a_bias, f, seed + 13);
  check_tensor("o_bias", w.o_bias, g.o_bias, f, seed + 14);
  // The kv_a rows of the rope key only reach the loss through RoPE: check them explicitly too.
  const int64_t dc = config.kv_lora_rank;
  double worst = 0;
  for (int64_t col = 0; col < D; col += 5) {
    const size_t i = static_cast<size_t>((dc + 1) * D + col);
    const float keep = w.kv_a_proj.data[i];
    w.kv_a_proj.data[i] = keep + 1e-3f;
    const double up = f(), x_up = w.kv_a_proj.data[i];
    w.kv_a_proj.data[i] = keep - 1e-3f;
    const double down = f(), x_down = w.kv_a_proj.data[i];
    w.kv_a_proj.data[i] = keep;
    const double numeric = (up - down) / (x_up - x_down), analytic = g.kv_a_proj.data[i];
    worst = std::max(worst, std::fabs(numeric - analytic) / std::max(1e-6, std::fabs(numeric)));
  }
  EXPECT_LT(worst, 1e-4) << "rope-key rows of kv_a_proj";
}

TEST(TrainReference, GradientsMatchFiniteDifferencesWithQueryLora) {
  check_gradients(testing::small_config(24, 3, 16, 12, 8, 4, 6), 101);
}

TEST(TrainReference, GradientsMatchFiniteDifferencesWithoutLoraWithBiases) {
  Config c = testing::small_config(20, 2, 0, 10, 6, 4, 5, /*yarn=*/false);
  c.attention_bias = true;
  check_gradients(c, 202);
}

// max_i |a_i − b_i| / max_i |b_i|: unlike rel_error, not diluted when only a few entries (one token's rope part,
// one head) are wrong.
double max_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return diff / (scale > 0 ? scale : 1);
}

// The fast path against the reference on one random layer and batch: the output, the log-sum-exps and every
// gradient, each by rel_error and by max_error. Returns the worst of them.
double fast_vs_reference(const Config& config, const std::vector<int32_t>& cu, bool random_positions, uint64_t seed) {
  const LayerWeights w = LayerWeights::random(config, seed);
  const int64_t T = cu.back(), D = config.hidden_size;
  const std::vector<float> hidden = testing::random_values(static_cast<size_t>(T * D), seed + 1);
  const std::vector<float> d_out = testing::random_values(static_cast<size_t>(T * D), seed + 2);
  std::vector<int64_t> positions;
  for (uint64_t s = seed; random_positions && static_cast<int64_t>(positions.size()) < T;) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    positions.push_back(static_cast<int64_t>((s >> 33) % 5000));
  }
  const train::ForwardResult ref_f = train::forward_reference(w, hidden, cu, positions);
  const train::BackwardResult ref_b = train::backward_reference(w, ref_f.saved, d_out);
  const train::ForwardResultF32 fast_f = train::forward(w, hidden, cu, positions);
  const train::BackwardResult fast_b = train::backward(w, fast_f.saved, d_out);
  EXPECT_EQ(fast_f.saved.positions, ref_f.saved.positions);

  const std::vector<float> ref_lse(ref_f.saved.lse.begin(), ref_f.saved.lse.end());
  std::vector<std::tuple<std::string, const std::vector<float>*, const std::vector<float>*>> pairs{
      {"out", &fast_f.out, &ref_f.out}, {"lse", &fast_f.saved.lse, &ref_lse}};
  const auto fast_grads = named_gradients(fast_b), ref_grads = named_gradients(ref_b);
  for (size_t i = 0; i < fast_grads.size(); ++i)
    pairs.emplace_back(fast_grads[i].first, fast_grads[i].second, ref_grads[i].second);
  const train::LayerGradients &fg = fast_b.grads, &rg = ref_b.grads;
  pairs.emplace_back("q_bias", &fg.q_bias, &rg.q_bias);
  pairs.emplace_back("kv_a_bias", &fg.kv_a_bias, &rg.kv_a_bias);
  pairs.emplace_back("o_bias", &fg.o_bias, &rg.o_bias);
  double worst = 0;
  for (const auto& [name, f, r] : pairs) {
    EXPECT_EQ(f->size(), r->size()) << name;
    const double norm = rel_error(*f, *r), max = max_error(*f, *r);
    if (std::getenv("MLA_TEST_VERBOSE")) std::printf("  %-26s %9.3g %9.3g\n", name.c_str(), norm, max);
    worst = std::max({worst, norm, max});
  }
  return worst;
}

// f32 against double: 5e-6 relative per tensor, by both measures (measured worst: 6.5e-7 over these cases;
// docs/training.md). Sequences longer than the attention's 64-query tiles, an empty one, random positions; with
// and without query compression, YaRN and plain RoPE, with and without biases.
constexpr double kFastTolerance = 5e-6;

TEST(TrainFast, MatchesReferenceWithQueryLoraYarnRandomPositions) {
  const double worst =
      fast_vs_reference(testing::small_config(24, 3, 16, 12, 8, 4, 6), {0, 70, 70, 75, 150}, true, 301);
  EXPECT_LT(worst, kFastTolerance);
}

TEST(TrainFast, MatchesReferenceWithoutLoraPlainRopeBiases) {
  Config c = testing::small_config(20, 2, 0, 10, 6, 4, 5, /*yarn=*/false);
  c.attention_bias = true;
  EXPECT_LT(fast_vs_reference(c, {0, 3, 3, 133}, false, 302), kFastTolerance);
}

TEST(TrainFast, MatchesReferenceWiderHeads) {
  Config c = testing::small_config(64, 4, 0, 32, 16, 8, 16);
  c.attention_bias = true;
  EXPECT_LT(fast_vs_reference(c, {0, 130, 131}, true, 303), kFastTolerance);
  EXPECT_LT(fast_vs_reference(testing::small_config(48, 4, 24, 32, 16, 8, 16, false), {0, 1, 65, 65, 129}, false, 304),
            kFastTolerance);
}

TEST(TrainFast, RepeatsBitForBit) {
  const LayerWeights w = LayerWeights::random(testing::small_config(32, 4, 16, 16, 8, 8, 8), 11);
  const std::vector<int32_t> cu{0, 100, 170};
  const std::vector<float> hidden = testing::random_values(170 * 32, 12), d_out = testing::random_values(170 * 32, 13);
  const train::BackwardResult a = train::backward(w, train::forward(w, hidden, cu).saved, d_out);
  const train::BackwardResult b = train::backward(w, train::forward(w, hidden, cu).saved, d_out);
  EXPECT_EQ(a.d_hidden, b.d_hidden);
  EXPECT_EQ(a.grads.q_b_proj.data, b.grads.q_b_proj.data);
  EXPECT_EQ(a.grads.kv_a_proj.data, b.grads.kv_a_proj.data);
  EXPECT_EQ(a.grads.kv_a_norm, b.grads.kv_a_norm);
}

TEST(TrainFast, NoTokens) {
  const LayerWeights w = LayerWeights::random(testing::small_config(16, 2, 8, 8, 4, 4, 4), 9);
  const train::ForwardResultF32 f = train::forward(w, std::vector<float>{}, std::vector<int32_t>{0, 0, 0});
  EXPECT_TRUE(f.out.empty());
  const train::BackwardResult b = train::backward(w, f.saved, std::vector<float>{});
  EXPECT_TRUE(b.d_hidden.empty());
  ASSERT_EQ(b.grads.q_a_proj.data.size(), w.q_a_proj.data.size());
  for (float x : b.grads.q_a_proj.data) EXPECT_EQ(x, 0.f);
  for (float x : b.grads.kv_a_norm) EXPECT_EQ(x, 0.f);
}

// Both paths reject the same bad arguments, naming them.
TEST(Train, RejectsBadArgumentsByName) {
  const LayerWeights w = LayerWeights::random(testing::small_config(16, 2, 8, 8, 4, 4, 4), 7);
  const std::vector<float> hidden(3 * 16, 0.1f);
  auto expect_error = [](const std::function<void()>& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "accepted; expected an error naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  for (const bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fast" : "reference");
    const auto forward = [&](const std::vector<float>& x, std::vector<int32_t> cu, std::vector<int64_t> pos = {}) {
      if (fast)
        train::forward(w, x, cu, pos);
      else
        train::forward_reference(w, x, cu, pos);
    };
    expect_error([&] { forward(hidden, {0, 2}); }, "cu_seqlens ends at 2");
    expect_error([&] { forward(hidden, {1, 3}); }, "cu_seqlens must start");
    expect_error([&] { forward(hidden, {0, 2, 1, 3}); }, "cu_seqlens[2]");
    expect_error([&] { forward(std::vector<float>(47, 0.f), {0, 3}); }, "not a multiple of hidden_size");
    expect_error([&] { forward(hidden, {0, 3}, {0, 1}); }, "positions has 2 entries");
    expect_error([&] { forward(hidden, {0, 3}, {0, -1, 2}); }, "positions must be >= 0");
    std::vector<float> nan_hidden = hidden;
    nan_hidden[20] = std::nanf("");
    expect_error([&] { forward(nan_hidden, {0, 3}); }, "hidden[1, 4]");
    expect_error(
        [&] {
          forward(hidden, {0, 4});
        },
        fast ? "train::forward: cu_seqlens ends at 4" : "train::forward_reference: cu_seqlens ends at 4");
    std::vector<float> nan_d_out(3 * 16, 0.f);
    nan_d_out[17] = INFINITY;
    if (fast) {
      const train::ForwardResultF32 r = train::forward(w, hidden, std::vector<int32_t>{0, 3});
      expect_error([&] { train::backward(w, r.saved, std::vector<float>(16, 0.f)); }, "d_out has 16 values");
      expect_error([&] { train::backward(w, r.saved, nan_d_out); }, "train::backward: d_out[1, 1] is not finite");
      train::SavedF32 cut = r.saved;
      cut.lse.pop_back();
      expect_error([&] { train::backward(w, cut, std::vector<float>(3 * 16, 0.f)); }, "saved.lse has 5 values");
      cut = r.saved;
      cut.cu_seqlens = {0, 2};
      expect_error([&] { train::backward(w, cut, std::vector<float>(3 * 16, 0.f)); }, "cu_seqlens ends at 2");
    } else {
      const train::ForwardResult r = train::forward_reference(w, hidden, std::vector<int32_t>{0, 3});
      expect_error([&] { train::backward_reference(w, r.saved, std::vector<float>(16, 0.f)); }, "d_out has 16 values");
      expect_error([&] { train::backward_reference(w, r.saved, nan_d_out); }, "d_out[1, 1] is not finite");
    }
  }
}

}  // namespace
}  // namespace mla
