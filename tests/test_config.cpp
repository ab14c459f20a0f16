// Config parsing (both RoPE forms), presets, the derived constants of spec section 3 and the cost model of
// section 6.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numbers>
#include <string>

#include <nlohmann/json.hpp>

#include "testing.hpp"

namespace mla {
namespace {

using testing::expect_throw_with;

using testing::golden_dir;


double rel(double a, double b) { return std::fabs(a - b) / std::fabs(b); }

double m_scale(double s, double x) { return s <= 1 ? 1.0 : 0.1 * x * std::log(s) + 1.0; }

// ---------------------------------------------------------------------------------------------------------
// Golden configs

struct Expected {
  const char* name;
  int64_t D, H, dq, dc, dn, dr, dv;
  RopeType type;
  double factor, L0, mscale, mscale_all, eps;
};

const Expected kGolden[] = {
    {"v3-tiny", 256, 4, 96, 80, 48, 64, 40, RopeType::Yarn, 40, 4096, 1.0, 1.0, 1e-6},
    {"v2lite-tiny", 192, 3, 0, 64, 32, 32, 48, RopeType::Yarn, 40, 4096, 0.707, 0.707, 1e-6},
    {"noyarn", 128, 2, 64, 48, 16, 16, 24, RopeType::Default, 1, 4096, 1.0, 0.0, 1e-6},
    {"yarn-ramp", 160, 5, 80, 72, 24, 64, 32, RopeType::Yarn, 8, 256, 1.0, 0.707, 1e-5},
    {"fp8-sharded", 384, 2, 200, 136, 32, 64, 48, RopeType::Yarn, 40, 4096, 1.0, 1.0, 1e-6},
    {"long-positions", 256, 2, 96, 80, 48, 64, 40, RopeType::Yarn, 40, 4096, 1.0, 1.0, 1e-6},
};

TEST(Config, ParsesEveryGoldenConfig) {
  for (const Expected& e : kGolden) {
    SCOPED_TRACE(e.name);
    const Config c = Config::from_file(golden_dir(e.name) / "config.json");
    EXPECT_EQ(c.hidden_size, e.D);
    EXPECT_EQ(c.num_heads, e.H);
    EXPECT_EQ(c.q_lora_rank, e.dq);
    EXPECT_EQ(c.has_q_lora(), e.dq > 0);
    EXPECT_EQ(c.kv_lora_rank, e.dc);
    EXPECT_EQ(c.qk_nope_head_dim, e.dn);
    EXPECT_EQ(c.qk_rope_head_dim, e.dr);
    EXPECT_EQ(c.v_head_dim, e.dv);
    EXPECT_EQ(c.qk_head_dim(), e.dn + e.dr);
    EXPECT_EQ(c.latent_dim(), e.dc + e.dr);
    EXPECT_EQ(c.num_layers, 1);
    EXPECT_FALSE(c.attention_bias);
    EXPECT_DOUBLE_EQ(c.rms_norm_eps, e.eps);
    EXPECT_EQ(c.rope.type, e.type);
    EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
    if (e.type == RopeType::Yarn) {
      EXPECT_DOUBLE_EQ(c.rope.factor, e.factor);
      EXPECT_DOUBLE_EQ(c.rope.original_max_position, e.L0);
      EXPECT_DOUBLE_EQ(c.rope.beta_fast, 32.0);
      EXPECT_DOUBLE_EQ(c.rope.beta_slow, 1.0);
      EXPECT_DOUBLE_EQ(c.rope.mscale, e.mscale);
      EXPECT_DOUBLE_EQ(c.rope.mscale_all_dim, e.mscale_all);
    }
  }
}

TEST(Config, YarnRampV5FormConstants) {
  const Config c = Config::from_file(golden_dir("yarn-ramp") / "config.json");
  const DerivedConstants k = DerivedConstants::compute(c);
  const double A = m_scale(8, 1.0) / m_scale(8, 0.707);  // 1.05311836...
  EXPECT_NEAR(A, 1.0531, 1e-4);
  EXPECT_LT(rel(k.rope_magnitude, A), 1e-6) << k.rope_magnitude;
  const double tau = 1.0 / std::sqrt(88.0) * m_scale(8, 0.707) * m_scale(8, 0.707);
  EXPECT_LT(rel(k.softmax_scale, tau), 1e-6) << k.softmax_scale;
  // d_r = 64, L0 = 256: corr(32) = 0.84 -> lo 0; corr(1) = 12.9 -> hi 13.
  EXPECT_EQ(k.yarn_low, 0.f);
  EXPECT_EQ(k.yarn_high, 13.f);
  // The latent norms ignore rms_norm_eps = 1e-5.
  EXPECT_EQ(kLatentNormEps, 1e-6f);
}

TEST(Config, HubAndV5FormsAgree) {
  const std::string common = R"("hidden_size": 64, "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 16, "v_head_dim": 8,)";
  const std::string hub = "{" + common + R"("rope_theta": 5000.0, "rope_scaling": {"type": "yarn", "factor": 4,
    "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5}})";
  const std::string v5 = "{" + common + R"("rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4,
    "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5}})";
  const Config a = Config::from_json(hub), b = Config::from_json(v5);
  for (const Config* c : {&a, &b}) {
    EXPECT_EQ(c->rope.type, RopeType::Yarn);
    EXPECT_DOUBLE_EQ(c->rope.theta, 5000.0);
    EXPECT_DOUBLE_EQ(c->rope.factor, 4.0);
    EXPECT_DOUBLE_EQ(c->rope.original_max_position, 512.0);
    EXPECT_DOUBLE_EQ(c->rope.beta_fast, 16.0);
    EXPECT_DOUBLE_EQ(c->rope.beta_slow, 2.0);
    EXPECT_DOUBLE_EQ(c->rope.mscale, 0.9);
    EXPECT_DOUBLE_EQ(c->rope.mscale_all_dim, 0.5);
  }
  const DerivedConstants ka = DerivedConstants::compute(a), kb = DerivedConstants::compute(b);
  EXPECT_EQ(ka.inv_freq, kb.inv_freq);
  EXPECT_EQ(ka.softmax_scale, kb.softmax_scale);
  EXPECT_EQ(ka.rope_magnitude, kb.rope_magnitude);
}

TEST(Config, PlainRope) {
  const std::string common = R"("hidden_size": 64, "num_attention_heads": 2, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 16, "v_head_dim": 8)";
  for (const std::string& text :
       {"{" + common + R"(, "rope_scaling": null})", "{" + common + "}",
        "{" + common + R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})",
        "{" + common + R"(, "q_lora_rank": null, "rope_scaling": null})"}) {
    SCOPED_TRACE(text);
    const Config c = Config::from_json(text);
    EXPECT_EQ(c.rope.type, RopeType::Default);
    EXPECT_FALSE(c.has_q_lora());
    const DerivedConstants k = DerivedConstants::compute(c);
    EXPECT_LT(rel(k.softmax_scale, 1.0 / std::sqrt(24.0)), 1e-6);
    EXPECT_EQ(k.rope_magnitude, 1.f);
    ASSERT_EQ(k.inv_freq.size(), 8u);
    for (int i = 0; i < 8; ++i) EXPECT_LT(rel(k.inv_freq[i], std::pow(10000.0, -2.0 * i / 16)), 1e-6) << i;
  }
  // noyarn golden: 192-wide heads would give 192^-1/2; this one has d_qk = 32.
  const Config g = Config::from_file(golden_dir("noyarn") / "config.json");
  EXPECT_LT(rel(DerivedConstants::compute(g).softmax_scale, 1.0 / std::sqrt(32.0)), 1e-6);
  // Plain RoPE with the released head dims: 192^-1/2.
  Config p = Config::preset("v3");
  p.rope = RopeParams{};
  EXPECT_LT(rel(DerivedConstants::compute(p).softmax_scale, 0.0721687836), 1e-6);
}

// ---------------------------------------------------------------------------------------------------------
// Presets

TEST(Config, Presets) {
  struct P {
    const char* name;
    int64_t D, H, dq, layers;
    double mscale, tau;
  };
  for (const P& p : {P{"v2-lite", 2048, 16, 0, 27, 0.707, 0.1147213868}, P{"v2", 5120, 128, 1536, 60, 0.707, 0.1147213868},
                     P{"v3", 7168, 128, 1536, 61, 1.0, 0.1352337789}, P{"r1", 7168, 128, 1536, 61, 1.0, 0.1352337789}}) {
    SCOPED_TRACE(p.name);
    const Config c = Config::preset(p.name);
    EXPECT_EQ(c.hidden_size, p.D);
    EXPECT_EQ(c.num_heads, p.H);
    EXPECT_EQ(c.q_lora_rank, p.dq);
    EXPECT_EQ(c.kv_lora_rank, 512);
    EXPECT_EQ(c.qk_nope_head_dim, 128);
    EXPECT_EQ(c.qk_rope_head_dim, 64);
    EXPECT_EQ(c.v_head_dim, 128);
    EXPECT_EQ(c.num_layers, p.layers);
    EXPECT_EQ(c.latent_dim(), 576);
    EXPECT_EQ(c.qk_head_dim(), 192);
    EXPECT_EQ(c.rope.type, RopeType::Yarn);
    EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
    EXPECT_DOUBLE_EQ(c.rope.factor, 40.0);
    EXPECT_DOUBLE_EQ(c.rope.original_max_position, 4096.0);
    EXPECT_DOUBLE_EQ(c.rope.beta_fast, 32.0);
    EXPECT_DOUBLE_EQ(c.rope.beta_slow, 1.0);
    EXPECT_DOUBLE_EQ(c.rope.mscale, p.mscale);
    EXPECT_DOUBLE_EQ(c.rope.mscale_all_dim, p.mscale);
    const DerivedConstants k = DerivedConstants::compute(c);
    EXPECT_LT(rel(k.softmax_scale, p.tau), 1e-6) << k.softmax_scale;
    EXPECT_LT(rel(k.rope_magnitude, 1.0), 1e-7);  // A = 1 for every released checkpoint
  }
  const auto names = Config::preset_names();
  for (const char* n : {"v2-lite", "v2", "v3"}) EXPECT_NE(std::find(names.begin(), names.end(), n), names.end());
  expect_throw_with<InvalidArgument>([] { Config::preset("v4"); }, {"unknown preset", "v4"});
  expect_throw_with<InvalidArgument>([] { Config::preset(""); }, {"unknown preset"});
}

TEST(Config, V3YarnFrequencies) {
  const Config c = Config::preset("v3");
  const DerivedConstants k = DerivedConstants::compute(c);
  EXPECT_EQ(k.yarn_low, 10.f);
  EXPECT_EQ(k.yarn_high, 23.f);
  ASSERT_EQ(k.inv_freq.size(), 32u);
  for (int i = 0; i < 32; ++i) {
    const double w0 = std::pow(10000.0, -2.0 * i / 64.0);
    double want;
    if (i <= 10) want = w0;
    else if (i >= 23) want = w0 / 40.0;
    else {
      const double rho = (i - 10) / 13.0;
      want = w0 * (1 - rho) + w0 / 40.0 * rho;
    }
    EXPECT_LT(rel(k.inv_freq[i], want), 1e-6) << "pair " << i << ": " << k.inv_freq[i] << " vs " << want;
  }
  // The blend is strictly between the two ends inside the ramp.
  for (int i = 11; i <= 22; ++i) {
    const double w0 = std::pow(10000.0, -2.0 * i / 64.0);
    EXPECT_LT(k.inv_freq[i], w0 * (1 - 1e-3));
    EXPECT_GT(k.inv_freq[i], w0 / 40.0 * (1 + 1e-3));
  }
}

TEST(Config, YarnMscale) {
  EXPECT_EQ(yarn_mscale(1.0, 0.707), 1.0);
  EXPECT_EQ(yarn_mscale(0.5, 3.0), 1.0);
  EXPECT_NEAR(yarn_mscale(40.0, 1.0), 0.1 * std::log(40.0) + 1.0, 1e-15);
  EXPECT_NEAR(yarn_mscale(40.0, 0.707), 0.0707 * std::log(40.0) + 1.0, 1e-15);
}

TEST(Config, MagnitudeWithoutMscaleAllDim) {
  // mscale_all_dim = 0: A = m(s, 1) and τ stays d_qk^-1/2.
  const Config c = Config::from_json(R"({"hidden_size": 64, "num_attention_heads": 2, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 16, "v_head_dim": 8,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 512}})");
  const DerivedConstants k = DerivedConstants::compute(c);
  EXPECT_LT(rel(k.rope_magnitude, 0.1 * std::log(4.0) + 1.0), 1e-6);
  EXPECT_LT(rel(k.softmax_scale, 1.0 / std::sqrt(24.0)), 1e-6);
}

// ---------------------------------------------------------------------------------------------------------
// Errors

const char* kGood = R"({"hidden_size": 64, "num_attention_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
  "qk_rope_head_dim": 16, "v_head_dim": 8})";

TEST(ConfigErrors, NotJson) {
  expect_throw_with<Error>([] { Config::from_json("{\"hidden_size\": 64,", "my.json"); }, {"my.json", "JSON"});
  expect_throw_with<Error>([] { Config::from_json("[1, 2]"); }, {"object"});
  expect_throw_with<Error>([] { Config::from_json(""); }, {"JSON"});
}

TEST(ConfigErrors, MissingKey) {
  EXPECT_NO_THROW(Config::from_json(kGood));
  for (const char* key : {"hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                          "v_head_dim"}) {
    SCOPED_TRACE(key);
    nlohmann::json j = nlohmann::json::parse(kGood);
    j.erase(key);
    expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {key, "missing"});
  }
}

TEST(ConfigErrors, WrongType) {
  nlohmann::json j = nlohmann::json::parse(kGood);
  j["kv_lora_rank"] = "512";
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"kv_lora_rank"});
  j = nlohmann::json::parse(kGood);
  j["hidden_size"] = 64.5;
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"hidden_size"});
  j = nlohmann::json::parse(kGood);
  j["rms_norm_eps"] = "small";
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"rms_norm_eps"});
  j = nlohmann::json::parse(kGood);
  j["attention_bias"] = 1;
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"attention_bias"});
  j = nlohmann::json::parse(kGood);
  j["rope_scaling"] = "yarn";
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"rope_scaling"});
}

TEST(ConfigErrors, OddRopeDim) {
  nlohmann::json j = nlohmann::json::parse(kGood);
  j["qk_rope_head_dim"] = 15;
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"qk_rope_head_dim", "even"});
}

TEST(ConfigErrors, NonPositiveDims) {
  nlohmann::json j = nlohmann::json::parse(kGood);
  j["num_attention_heads"] = 0;
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"num_attention_heads"});
  j = nlohmann::json::parse(kGood);
  j["kv_lora_rank"] = -4;
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"kv_lora_rank"});
}

TEST(ConfigErrors, UnsupportedRopeType) {
  nlohmann::json j = nlohmann::json::parse(kGood);
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"linear", "not supported"});
  j = nlohmann::json::parse(kGood);
  j["rope_parameters"] = {{"rope_type", "dynamic"}, {"factor", 2.0}, {"rope_theta", 10000.0}};
  expect_throw_with<Error>([&] { Config::from_json(j.dump()); }, {"dynamic"});
}

TEST(ConfigErrors, MissingFile) {
  expect_throw_with<Error>([] { Config::from_file("/nonexistent/dir/config.json"); }, {"/nonexistent/dir/config.json"});
}

// Numbers that used to reach a double->int64 cast or int64 arithmetic unchecked.
TEST(ConfigErrors, NumbersOutOfRangeAreNamed) {
  auto with = [](const std::string& key, const std::string& raw) {
    std::string text = kGood;
    text.insert(text.rfind('}'), ", \"" + key + "\": " + raw);
    return text;
  };
  // nlohmann keeps the last of duplicate keys: each raw value below replaces kGood's.
  expect_throw_with<Error>([&] { Config::from_json(with("hidden_size", "1e28"), "c.json"); },
                           {"c.json", "'hidden_size'", "out of range"});
  expect_throw_with<Error>([&] { Config::from_json(with("hidden_size", "-1e28")); }, {"'hidden_size'", "out of range"});
  expect_throw_with<Error>([&] { Config::from_json(with("kv_lora_rank", "18446744073709551615")); },
                           {"'kv_lora_rank'", "out of range"});
  expect_throw_with<Error>([&] { Config::from_json(with("num_hidden_layers", "9223372036854775807")); },
                           {"'num_hidden_layers'", "[1, 65536]"});
  expect_throw_with<Error>([&] { Config::from_json(with("qk_rope_head_dim", "268435456")); },
                           {"'qk_rope_head_dim'", "[1, 4096]", "268435456"});
  expect_throw_with<Error>([&] { Config::from_json(with("rope_theta", "1e300")); }, {"rope_theta"});
  expect_throw_with<Error>([&] { Config::from_json(with("rms_norm_eps", "1e999")); }, {"JSON"});
  // Integral floats in range are still integers (some exporters write 7168.0).
  EXPECT_EQ(Config::from_json(with("hidden_size", "128.0")).hidden_size, 128);
}

TEST(ConfigErrors, BoundsAreExactAndDocumented) {
  const Config good = Config::from_json(kGood);
  struct Field {
    int64_t Config::*member;
    int64_t max;
    const char* key;
  };
  for (const Field& f : {Field{&Config::hidden_size, kMaxHiddenSize, "hidden_size"},
                         Field{&Config::num_heads, kMaxHeads, "num_attention_heads"},
                         Field{&Config::q_lora_rank, kMaxLoraRank, "q_lora_rank"},
                         Field{&Config::kv_lora_rank, kMaxLoraRank, "kv_lora_rank"},
                         Field{&Config::qk_nope_head_dim, kMaxHeadDim, "qk_nope_head_dim"},
                         Field{&Config::qk_rope_head_dim, kMaxHeadDim, "qk_rope_head_dim"},
                         Field{&Config::v_head_dim, kMaxHeadDim, "v_head_dim"},
                         Field{&Config::num_layers, kMaxLayers, "num_hidden_layers"}}) {
    SCOPED_TRACE(f.key);
    Config c = good;
    c.*f.member = f.max;
    EXPECT_NO_THROW(c.validate());
    c.*f.member = f.max + 1;
    expect_throw_with<Error>([&] { c.validate(); }, {f.key, std::to_string(f.max)});
  }
  // Every size derived from the largest config fits in int64 with room to spare.
  Config c = good;
  c.hidden_size = kMaxHiddenSize, c.num_heads = kMaxHeads, c.q_lora_rank = c.kv_lora_rank = kMaxLoraRank;
  c.qk_nope_head_dim = c.qk_rope_head_dim = c.v_head_dim = kMaxHeadDim;
  c.validate();
  const double largest = static_cast<double>(c.num_heads) * (c.qk_head_dim() + c.v_head_dim) *
                         std::max(c.hidden_size, c.kv_lora_rank) * 8;  // bytes of the largest f64 weight
  EXPECT_LT(largest, 0x1p62);
}

TEST(ConfigErrors, RealDeepSeekConfigsAreWithinBounds) {
  // DeepSeek-V3's config.json attention fields, verbatim.
  const char* v3 = R"({"hidden_size": 7168, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_hidden_layers": 61,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"}})";
  EXPECT_NO_THROW(Config::from_json(v3));
  for (const std::string& name : Config::preset_names()) EXPECT_NO_THROW(Config::preset(name).validate()) << name;
}

TEST(ConfigErrors, YarnParametersInRange) {
  auto yarn = [](const char* key, double v) {
    nlohmann::json j = nlohmann::json::parse(kGood);
    j["rope_scaling"] = {{"type", "yarn"}, {"factor", 40}, {"beta_fast", 32}, {"beta_slow", 1},
                         {"mscale", 1.0}, {"mscale_all_dim", 1.0}, {"original_max_position_embeddings", 4096}};
    j["rope_scaling"][key] = v;
    return j.dump();
  };
  EXPECT_NO_THROW(Config::from_json(yarn("factor", 40)));
  struct Case {
    const char* key;
    double value;
    const char* word;
  };
  for (const Case& c : {Case{"factor", 1e-300, "'factor'"}, Case{"factor", 0.999, "'factor'"},
                        Case{"beta_fast", 0, "'beta_fast'"}, Case{"beta_slow", -1, "'beta_slow'"},
                        Case{"beta_slow", 32, "greater than 'beta_slow'"},
                        Case{"attention_factor", 1e300, "'attention_factor'"},
                        Case{"mscale", -0.5, "'mscale'"}, Case{"mscale_all_dim", 101, "'mscale_all_dim'"},
                        Case{"original_max_position_embeddings", -4096, "'original_max_position_embeddings'"},
                        Case{"original_max_position_embeddings", 2e9, "'original_max_position_embeddings'"}}) {
    SCOPED_TRACE(c.key);
    expect_throw_with<Error>([&] { Config::from_json(yarn(c.key, c.value)); }, {"yarn", c.word});
  }
  // A validated config gives finite derived constants at the edges of the bounds.
  for (const auto& [key, v] : std::vector<std::pair<const char*, double>>{
           {"factor", kMaxYarnFactor}, {"mscale_all_dim", kMaxYarnMscale}, {"attention_factor", kMaxYarnMscale},
           {"original_max_position_embeddings", kMaxPositions}, {"beta_fast", kMaxYarnBeta}}) {
    SCOPED_TRACE(key);
    const DerivedConstants k = DerivedConstants::compute(Config::from_json(yarn(key, v)));
    EXPECT_TRUE(std::isfinite(k.softmax_scale) && k.softmax_scale > 0);
    EXPECT_TRUE(std::isfinite(k.rope_magnitude) && k.rope_magnitude > 0);
    for (float w : k.inv_freq) EXPECT_TRUE(std::isfinite(w));
  }
}

TEST(ConfigErrors, SpecialFiles) {
  const testing::TempDir tmp("cfgfiles");
  const auto p = tmp.path() / "config.json";
  std::filesystem::create_symlink("/dev/zero", p);
  expect_throw_with<Error>([&] { Config::from_file(p); }, {p.string(), "character device"});
  std::filesystem::remove(p);
  std::filesystem::create_directory(p);
  expect_throw_with<Error>([&] { Config::from_file(p); }, {p.string(), "is a folder"});
}

// ---------------------------------------------------------------------------------------------------------
// Cost model and path choice

TEST(CostModel, V3Numbers) {
  const CostModel m = CostModel::of(Config::preset("v3"));
  // q: 2·7168·1536 + 2·1536·128·192; kv_a: 2·7168·576; o: 2·128·128·7168.
  const double q = 2.0 * 7168 * 1536 + 2.0 * 1536 * 128 * 192, kva = 2.0 * 7168 * 576, o = 2.0 * 128 * 128 * 7168;
  EXPECT_DOUBLE_EQ(m.projection_flops_per_token, q + kva + o);
  // Spec section 6: "V3: 340.7 MFLOP per token per layer before attention" is the projections alone.
  EXPECT_NEAR(m.projection_flops_per_token / 1e6, 340.7, 0.05);
  EXPECT_DOUBLE_EQ(m.absorb_flops_per_token, 2.0 * 128 * 128 * 512 * 2);
  EXPECT_DOUBLE_EQ(m.expand_flops_per_key, 2.0 * 512 * 128 * 256);
  EXPECT_DOUBLE_EQ(m.expanded_attention_flops_per_pair, 2.0 * 128 * 320);
  EXPECT_DOUBLE_EQ(m.absorbed_attention_flops_per_pair, 2.0 * 128 * 1088);
  EXPECT_EQ(m.cache_values_per_token, 576);
  EXPECT_EQ(m.expanded_cache_values_per_token, 40960);
  EXPECT_NEAR(static_cast<double>(m.expanded_cache_values_per_token) / m.cache_values_per_token, 71.1, 0.05);
}

TEST(CostModel, NoQueryCompression) {
  const CostModel m = CostModel::of(Config::preset("v2-lite"));
  const double q = 2.0 * 2048 * 16 * 192, kva = 2.0 * 2048 * 576, o = 2.0 * 16 * 128 * 2048;
  EXPECT_DOUBLE_EQ(m.projection_flops_per_token, q + kva + o);
}

TEST(CostModel, ChoosePath) {
  for (const char* name : {"v3", "v2", "v2-lite"}) {
    SCOPED_TRACE(name);
    const Config c = Config::preset(name);
    EXPECT_EQ(choose_path(c, 1, 4096), Path::Absorbed);
    EXPECT_EQ(choose_path(c, 1, 64), Path::Absorbed);
    EXPECT_EQ(choose_path(c, 1024, 1024), Path::Expanded);
    EXPECT_EQ(choose_path(c, 4096, 4096), Path::Expanded);
  }
  EXPECT_EQ(path_name(Path::Absorbed), "absorbed");
  EXPECT_EQ(path_name(Path::Expanded), "expanded");
  EXPECT_EQ(path_name(Path::Auto), "auto");
}

}  // namespace
}  // namespace mla
