// Every golden case (transformers' DeepseekV3Attention in float64) through every way of feeding the tokens,
// on both CPU backends, in f32 and bf16.
#include <gtest/gtest.h>

#include "testing.hpp"

namespace mla {
namespace {

enum class Feed { OneShot, Chunked, Decode };

struct Param {
  std::string name;
  std::string device;
  Precision precision;
  Feed feed;
  CacheDtype cache = CacheDtype::Auto;
};

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const Param& p = info.param;
  std::string s = p.name + "_" + p.device + "_" + std::string(precision_name(p.precision)) +
                  (p.cache == CacheDtype::FP8 ? "_fp8cache_" : "_") +
                  (p.feed == Feed::OneShot ? "oneshot" : p.feed == Feed::Chunked ? "chunked" : "decode");
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

class Golden : public ::testing::TestWithParam<Param> {};

TEST_P(Golden, MatchesTransformers) {
  const Param& p = GetParam();
  const testing::GoldenCase g = testing::load_golden(p.name);
  LayerOptions opt;
  opt.device = p.device;
  opt.precision = p.precision;
  opt.cache_dtype = p.cache;
  Attention layer(g.weights, opt);
  RunOptions run;
  run.page_size = 16;
  if (p.feed == Feed::Chunked) run.chunk = 7;
  if (p.feed == Feed::Decode) run.decode_after = g.tokens / 2;
  const RunResult r = run_sequences(layer, g.hidden.data(), g.positions.data(), g.batch, g.tokens, run);
  const double tol = p.cache == CacheDtype::FP8       ? testing::kGoldenToleranceFp8Cache
                     : p.precision == Precision::F32 ? testing::kGoldenToleranceF32
                                                     : testing::kGoldenToleranceBf16;
  const double out_err = testing::rel_error(r.output, g.output);
  const double lat_err = testing::rel_error(r.latent, g.latent);
  EXPECT_LT(out_err, tol) << "output";
  EXPECT_LT(lat_err, tol) << "latent";
  RecordProperty("output_rel_error", std::to_string(out_err));
}

std::vector<Param> all_params() {
  std::vector<Param> ps;
  for (const std::string& name : testing::golden_cases())
    for (const char* dev : {"cpu", "cpu-reference"})
      for (Precision pr : {Precision::F32, Precision::BF16})
        for (Feed f : {Feed::OneShot, Feed::Chunked, Feed::Decode}) {
          ps.push_back({name, dev, pr, f});
          if (pr == Precision::BF16) ps.push_back({name, dev, pr, f, CacheDtype::FP8});
        }
  return ps;
}

INSTANTIATE_TEST_SUITE_P(AllCases, Golden, ::testing::ValuesIn(all_params()), param_name);

}  // namespace
}  // namespace mla
