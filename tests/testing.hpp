// Helpers shared by the tests.
#pragma once

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "mla/mla.hpp"

namespace mla::testing {

inline std::filesystem::path data_dir() { return MLA_TEST_DATA_DIR; }
inline std::filesystem::path golden_dir(const std::string& name) { return data_dir() / "golden" / name; }

inline const std::vector<std::string>& golden_cases() {
  static const std::vector<std::string> cases{"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "fp8-sharded",
                                              "long-positions"};
  return cases;
}

// ‖a − b‖ / ‖b‖; NaN anywhere gives infinity.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

struct GoldenCase {
  LayerWeights weights;
  int64_t batch = 0, tokens = 0;
  std::vector<float> hidden, output, latent;
  std::vector<int64_t> positions;
};

inline GoldenCase load_golden(const std::string& name) {
  GoldenCase g;
  const auto dir = golden_dir(name);
  g.weights = LayerWeights::load(dir, 0);
  SafetensorsFile io(dir / "io.safetensors");
  const TensorRef h = io.tensor("hidden_states");
  g.batch = h.info.shape.at(0);
  g.tokens = h.info.shape.at(1);
  g.hidden = io.read_f32("hidden_states");
  g.output = io.read_f32("output");
  g.latent = io.read_f32("latent");
  g.positions = io.read_i64("position_ids");
  return g;
}

// Deterministic pseudo-random floats in [-1, 1).
inline std::vector<float> random_values(size_t n, uint64_t seed, float scale = 1.f) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 12345;
  for (float& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = scale * (static_cast<float>(s >> 40) / 8388608.0f - 1.0f);
  }
  return v;
}

}  // namespace mla::testing
