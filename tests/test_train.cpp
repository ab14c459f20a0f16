// The training reference (mla/train.hpp): its forward against transformers' float64 goldens, its backward
// against central finite differences of the same forward (every weight tensor, the norms, the biases and the
// hidden states), and its argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "mla/train.hpp"
#include "testing.hpp"

namespace mla {
namespace {

using testing::rel_error;

TEST(TrainReference, ForwardMatchesGoldens) {
  for (const char* name : {"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions", "fp8-sharded"}) {
    SCOPED_TRACE(name);
    const testing::GoldenCase g = testing::load_golden(name);
    std::vector<int32_t> cu{0};
    for (int64_t b = 0; b < g.batch; ++b) cu.push_back(cu.back() + static_cast<int32_t>(g.tokens));
    const train::ForwardResult r = train::forward_reference(g.weights, g.hidden, cu, g.positions);
    EXPECT_LT(rel_error(r.out, g.output), 2e-6);
  }
}

// The backward against transformers' float64 autograd (tests/data/make_grad_goldens.py wrote grad.safetensors:
// the gradients of DeepseekV3Attention for the case's weights and inputs under a fixed output gradient).
TEST(TrainReference, BackwardMatchesTransformersAutograd) {
  for (const char* name : {"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions"}) {
    SCOPED_TRACE(name);
    const testing::GoldenCase g = testing::load_golden(name);
    const SafetensorsFile want(testing::golden_dir(name) / "grad.safetensors");
    std::vector<int32_t> cu{0};
    for (int64_t b = 0; b < g.batch; ++b) cu.push_back(cu.back() + static_cast<int32_t>(g.tokens));
    const train::ForwardResult f = train::forward_reference(g.weights, g.hidden, cu, g.positions);
    const train::BackwardResult r = train::backward_reference(g.weights, f.saved, want.read_f32("d_output"));
    const train::LayerGradients& d = r.grads;
    const std::pair<const char*, const std::vector<float>*> pairs[] = {
        {"hidden_states", &r.d_hidden},         {"q_proj.weight", &d.q_proj.data},
        {"q_a_proj.weight", &d.q_a_proj.data},  {"q_a_layernorm.weight", &d.q_a_norm},
        {"q_b_proj.weight", &d.q_b_proj.data},  {"kv_a_proj_with_mqa.weight", &d.kv_a_proj.data},
        {"kv_a_layernorm.weight", &d.kv_a_norm}, {"kv_b_proj.weight", &d.kv_b_proj.data},
        {"o_proj.weight", &d.o_proj.data}};
    int compared = 0;
    for (const auto& [tensor, got] : pairs) {
      const std::string key = std::string("grad.") + tensor;
      if (!want.contains(key)) {
        EXPECT_TRUE(got->empty()) << key << " is missing from the golden but the layer has it";
        continue;
      }
      const std::vector<float> ref = want.read_f32(key);
      ASSERT_EQ(got->size(), ref.size()) << key;
      const double err = rel_error(*got, ref);
      EXPECT_LT(err, 1e-5) << key;
      if (std::getenv("MLA_TEST_VERBOSE")) std::printf("%s %s %.3g\n", name, key.c_str(), err);
      ++compared;
    }
    EXPECT_GE(compared, 6);  // hidden, kv_a, its norm, kv_b, o and q_proj or (q_a, its norm, q_b)
  }
}

// L = Σ d_out · out, evaluated in double from the saved attention output (out = o_proj · o + b is linear in o).
double loss(const LayerWeights& w, const std::vector<float>& hidden, const std::vector<int32_t>& cu,
            const std::vector<float>& d_out) {
  const train::ForwardResult r = train::forward_reference(w, hidden, cu);
  const int64_t D = w.config.hidden_size, HV = w.config.num_heads * w.config.v_head_dim;
  double sum = 0;
  for (int64_t t = 0; t < r.saved.tokens; ++t)
    for (int64_t e = 0; e < D; ++e) {
      double y = w.o_bias.empty() ? 0.0 : w.o_bias[static_cast<size_t>(e)];
      for (int64_t j = 0; j < HV; ++j) y += static_cast<double>(w.o_proj.data[static_cast<size_t>(e * HV + j)]) * r.saved.o[static_cast<size_t>(t * HV + j)];
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
  EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 1e-5) << "numeric[0] " << numeric[0] << " analytic[0] " << analytic[0];
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

TEST(TrainReference, RejectsBadArgumentsByName) {
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
  expect_error([&] { train::forward_reference(w, hidden, std::vector<int32_t>{0, 2}); }, "cu_seqlens ends at 2");
  expect_error([&] { train::forward_reference(w, hidden, std::vector<int32_t>{1, 3}); }, "cu_seqlens must start");
  expect_error([&] { train::forward_reference(w, hidden, std::vector<int32_t>{0, 2, 1, 3}); }, "cu_seqlens[2]");
  expect_error([&] { train::forward_reference(w, std::vector<float>(47, 0.f), std::vector<int32_t>{0, 3}); },
               "not a multiple of hidden_size");
  expect_error([&] { train::forward_reference(w, hidden, std::vector<int32_t>{0, 3}, std::vector<int64_t>{0, 1}); },
               "positions has 2 entries");
  std::vector<float> nan_hidden = hidden;
  nan_hidden[20] = std::nanf("");
  expect_error([&] { train::forward_reference(w, nan_hidden, std::vector<int32_t>{0, 3}); }, "hidden[1, 4]");
  const train::ForwardResult r = train::forward_reference(w, hidden, std::vector<int32_t>{0, 3});
  expect_error([&] { train::backward_reference(w, r.saved, std::vector<float>(16, 0.f)); }, "d_out has 16 values");
}

}  // namespace
}  // namespace mla
