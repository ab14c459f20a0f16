#include "mla/config.hpp"

#include <cmath>
#include <fstream>
#include <numbers>
#include <sstream>

#include <nlohmann/json.hpp>

#include "mla/error.hpp"

namespace mla {
namespace {

using nlohmann::json;

[[noreturn]] void fail(std::string_view source, const std::string& what) {
  throw Error(std::string(source) + ": " + what);
}

// Reads an integer key; absent or null gives `fallback` when `required` is false.
int64_t get_int(const json& j, const char* key, std::string_view source, bool required, int64_t fallback = 0) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) fail(source, std::string("missing key '") + key + "'");
    return fallback;
  }
  if (it->is_number_integer() || it->is_number_unsigned()) return it->get<int64_t>();
  if (it->is_number_float() && std::floor(it->get<double>()) == it->get<double>()) return static_cast<int64_t>(it->get<double>());
  fail(source, std::string("key '") + key + "' must be an integer, got " + it->dump());
}

double get_double(const json& j, const char* key, std::string_view source, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) fail(source, std::string("key '") + key + "' must be a number, got " + it->dump());
  return it->get<double>();
}

// Both config forms: v5 `rope_parameters: {rope_type, rope_theta, ...}` and hub `rope_theta` + `rope_scaling`.
RopeParams parse_rope(const json& j, std::string_view source) {
  RopeParams rope;
  const json* params = nullptr;
  std::string where;
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) fail(source, "'rope_parameters' must be an object");
    params = &*it;
    where = "rope_parameters";
    rope.theta = get_double(*params, "rope_theta", source, get_double(j, "rope_theta", source, 10000.0));
  } else {
    rope.theta = get_double(j, "rope_theta", source, 10000.0);
    if (auto s = j.find("rope_scaling"); s != j.end() && !s->is_null()) {
      if (!s->is_object()) fail(source, "'rope_scaling' must be an object or null");
      params = &*s;
      where = "rope_scaling";
    }
  }
  if (!params) return rope;

  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (auto t = params->find(key); t != params->end() && !t->is_null()) {
      if (!t->is_string()) fail(source, where + "." + key + " must be a string");
      type = t->get<std::string>();
      break;
    }
  }
  if (type == "default") return rope;
  if (type != "yarn") fail(source, where + ": rope type '" + type + "' is not supported (DeepSeek checkpoints use 'yarn' or none)");

  rope.type = RopeType::Yarn;
  rope.factor = get_double(*params, "factor", source, 1.0);
  rope.original_max_position = get_double(*params, "original_max_position_embeddings", source, 4096.0);
  rope.beta_fast = get_double(*params, "beta_fast", source, 32.0);
  rope.beta_slow = get_double(*params, "beta_slow", source, 1.0);
  rope.mscale = get_double(*params, "mscale", source, 1.0);
  rope.mscale_all_dim = get_double(*params, "mscale_all_dim", source, 0.0);
  rope.attention_factor = get_double(*params, "attention_factor", source, 0.0);
  if (params->find("factor") == params->end()) fail(source, where + ": yarn needs 'factor'");
  return rope;
}

}  // namespace

Config Config::from_json(std::string_view text, std::string_view source) {
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    fail(source, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "the top level must be a JSON object");

  Config c;
  c.name = std::string(source);
  c.hidden_size = get_int(j, "hidden_size", source, true);
  c.num_heads = get_int(j, "num_attention_heads", source, true);
  c.q_lora_rank = get_int(j, "q_lora_rank", source, false, 0);
  c.kv_lora_rank = get_int(j, "kv_lora_rank", source, true);
  c.qk_nope_head_dim = get_int(j, "qk_nope_head_dim", source, true);
  c.qk_rope_head_dim = get_int(j, "qk_rope_head_dim", source, true);
  c.v_head_dim = get_int(j, "v_head_dim", source, true);
  c.num_layers = get_int(j, "num_hidden_layers", source, false, 1);
  c.rms_norm_eps = get_double(j, "rms_norm_eps", source, 1e-6);
  if (auto b = j.find("attention_bias"); b != j.end() && !b->is_null()) {
    if (!b->is_boolean()) fail(source, "'attention_bias' must be true or false");
    c.attention_bias = b->get<bool>();
  }
  c.rope = parse_rope(j, source);
  c.validate();
  return c;
}

Config Config::from_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot open config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json(ss.str(), path.string());
}

std::vector<std::string> Config::preset_names() { return {"v2-lite", "v2", "v3"}; }

Config Config::preset(std::string_view name) {
  Config c;
  c.name = std::string(name);
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.rope.type = RopeType::Yarn;
  c.rope.theta = 10000.0;
  c.rope.factor = 40.0;
  c.rope.original_max_position = 4096.0;
  c.rope.beta_fast = 32.0;
  c.rope.beta_slow = 1.0;
  if (name == "v2-lite") {
    c.hidden_size = 2048, c.num_heads = 16, c.q_lora_rank = 0, c.num_layers = 27;
    c.rope.mscale = c.rope.mscale_all_dim = 0.707;
  } else if (name == "v2") {
    c.hidden_size = 5120, c.num_heads = 128, c.q_lora_rank = 1536, c.num_layers = 60;
    c.rope.mscale = c.rope.mscale_all_dim = 0.707;
  } else if (name == "v3" || name == "r1") {
    c.hidden_size = 7168, c.num_heads = 128, c.q_lora_rank = 1536, c.num_layers = 61;
    c.rope.mscale = c.rope.mscale_all_dim = 1.0;
  } else {
    throw InvalidArgument("unknown preset '" + std::string(name) + "' (known: v2-lite, v2, v3, r1)");
  }
  return c;
}

void Config::validate() const {
  auto positive = [&](int64_t v, const char* key) {
    if (v <= 0) fail(name, std::string("'") + key + "' must be positive, got " + std::to_string(v));
  };
  positive(hidden_size, "hidden_size");
  positive(num_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  positive(qk_rope_head_dim, "qk_rope_head_dim");
  positive(v_head_dim, "v_head_dim");
  positive(num_layers, "num_hidden_layers");
  if (qk_nope_head_dim < 0) fail(name, "'qk_nope_head_dim' must not be negative");
  if (q_lora_rank < 0) fail(name, "'q_lora_rank' must be null or positive");
  if (qk_rope_head_dim % 2 != 0) fail(name, "'qk_rope_head_dim' must be even, got " + std::to_string(qk_rope_head_dim));
  if (!(rms_norm_eps > 0)) fail(name, "'rms_norm_eps' must be positive");
  if (!(rope.theta > 1)) fail(name, "rope_theta must be > 1");
  if (rope.type == RopeType::Yarn) {
    if (!(rope.factor > 0)) fail(name, "yarn 'factor' must be positive");
    if (!(rope.original_max_position > 0)) fail(name, "yarn 'original_max_position_embeddings' must be positive");
  }
}

double yarn_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

DerivedConstants DerivedConstants::compute(const Config& c) {
  DerivedConstants d;
  const int64_t dim = c.qk_rope_head_dim;
  const int64_t half = dim / 2;
  const auto theta = static_cast<float>(c.rope.theta);
  d.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.qk_head_dim())));
  d.inv_freq.resize(half);
  // θ^(2i/d) in fp32, as the reference computes it.
  std::vector<float> pos_freq(half);
  for (int64_t i = 0; i < half; ++i)
    pos_freq[i] = std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(dim));

  if (c.rope.type == RopeType::Default) {
    for (int64_t i = 0; i < half; ++i) d.inv_freq[i] = 1.0f / pos_freq[i];
    return d;
  }

  const RopeParams& r = c.rope;
  const double s = r.factor;
  if (r.mscale_all_dim != 0.0) {
    const double m = yarn_mscale(s, r.mscale_all_dim);
    d.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.qk_head_dim())) * m * m);
  }
  if (r.attention_factor > 0) {
    d.rope_magnitude = static_cast<float>(r.attention_factor);
  } else if (r.mscale != 0.0 && r.mscale_all_dim != 0.0) {
    d.rope_magnitude = static_cast<float>(yarn_mscale(s, r.mscale) / yarn_mscale(s, r.mscale_all_dim));
  } else {
    d.rope_magnitude = static_cast<float>(yarn_mscale(s, 1.0));
  }

  // Correction range in double, as Python computes it.
  auto corr = [&](double rot) {
    return static_cast<double>(dim) * std::log(r.original_max_position / (rot * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(r.theta));
  };
  double lo = std::max(std::floor(corr(r.beta_fast)), 0.0);
  double hi = std::min(std::ceil(corr(r.beta_slow)), static_cast<double>(dim - 1));
  if (lo == hi) hi += 0.001;
  d.yarn_low = static_cast<float>(lo);
  d.yarn_high = static_cast<float>(hi);
  const auto sf = static_cast<float>(s);
  for (int64_t i = 0; i < half; ++i) {
    float ramp = (static_cast<float>(i) - d.yarn_low) / (d.yarn_high - d.yarn_low);
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float extrapolation = 1.0f / pos_freq[i];
    const float interpolation = 1.0f / (sf * pos_freq[i]);
    const float keep = 1.0f - ramp;  // weight of the unscaled frequency
    d.inv_freq[i] = interpolation * (1.0f - keep) + extrapolation * keep;
  }
  return d;
}

CostModel CostModel::of(const Config& c) {
  const double D = c.hidden_size, H = c.num_heads, dq = c.q_lora_rank, dc = c.kv_lora_rank;
  const double dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr;
  CostModel m{};
  const double q = c.has_q_lora() ? 2 * D * dq + 2 * dq * H * dqk : 2 * D * H * dqk;
  m.projection_flops_per_token = q + 2 * D * (dc + dr) + 2 * H * dv * D;
  m.absorb_flops_per_token = 2 * H * dn * dc + 2 * H * dc * dv;
  m.expand_flops_per_key = 2 * dc * H * (dn + dv);
  m.expanded_attention_flops_per_pair = 2 * H * (dqk + dv);
  m.absorbed_attention_flops_per_pair = 2 * H * (dc + dr + dc);
  m.cache_values_per_token = c.latent_dim();
  m.expanded_cache_values_per_token = c.num_heads * (c.qk_head_dim() + c.v_head_dim);
  // Plain MHA with the same number of heads and head size d_n (the DeepSeek-V2 paper's comparison).
  m.mha_cache_values_per_token = 2 * c.num_heads * c.qk_nope_head_dim;
  return m;
}

}  // namespace mla
