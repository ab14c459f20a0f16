#include "mla/config.hpp"

#include <cmath>
#include <numbers>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/input.hpp"
#include "mla/error.hpp"

namespace mla {
namespace {

using nlohmann::json;

[[noreturn]] void fail(std::string_view source, const std::string& what) {
  throw Error(std::string(source) + ": " + what);
}

// Largest integer a JSON float holds exactly: 1e28 is "integral" but casting it to int64 is undefined.
constexpr double kMaxExactInteger = 9007199254740992.0;  // 2^53

// Reads an integer key; absent or null gives `fallback` when `required` is false. Non-integral and
// out-of-range numbers are refused by name here, before anything converts them.
int64_t get_int(const json& j, const char* key, std::string_view source, bool required, int64_t fallback = 0) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) fail(source, std::string("missing key '") + key + "'");
    return fallback;
  }
  if (it->is_number_unsigned()) {
    if (it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(source, std::string("key '") + key + "' is out of range, got " + it->dump());
    return static_cast<int64_t>(it->get<uint64_t>());
  }
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_number_float()) {
    const double v = it->get<double>();
    if (std::floor(v) != v) fail(source, std::string("key '") + key + "' must be an integer, got " + it->dump());
    if (std::fabs(v) > kMaxExactInteger) fail(source, std::string("key '") + key + "' is out of range, got " + it->dump());
    return static_cast<int64_t>(v);
  }
  fail(source, std::string("key '") + key + "' must be an integer, got " + it->dump());
}

double get_double(const json& j, const char* key, std::string_view source, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) fail(source, std::string("key '") + key + "' must be a number, got " + it->dump());
  const double v = it->get<double>();
  if (!std::isfinite(v)) fail(source, std::string("key '") + key + "' must be finite, got " + it->dump());
  return v;
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
  // A regular file of at most 64 MiB: config.json as a FIFO, a folder or a link to /dev/zero is refused by name.
  return from_json(detail::read_small_file(path), path.string());
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
  // Each bound is named in the message and listed in docs/mla.md ("Input limits").
  auto in_range = [&](int64_t v, int64_t lo, int64_t hi, const char* key) {
    if (v < lo || v > hi)
      fail(name, std::string("'") + key + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "], got " + std::to_string(v));
  };
  in_range(hidden_size, 1, kMaxHiddenSize, "hidden_size");
  in_range(num_heads, 1, kMaxHeads, "num_attention_heads");
  in_range(q_lora_rank, 0, kMaxLoraRank, "q_lora_rank");
  in_range(kv_lora_rank, 1, kMaxLoraRank, "kv_lora_rank");
  in_range(qk_nope_head_dim, 0, kMaxHeadDim, "qk_nope_head_dim");
  in_range(qk_rope_head_dim, 1, kMaxHeadDim, "qk_rope_head_dim");
  in_range(v_head_dim, 1, kMaxHeadDim, "v_head_dim");
  in_range(num_layers, 1, kMaxLayers, "num_hidden_layers");
  if (qk_rope_head_dim % 2 != 0) fail(name, "'qk_rope_head_dim' must be even, got " + std::to_string(qk_rope_head_dim));

  // Reals: the negated comparisons also refuse NaN.
  auto real_in = [&](double v, double lo, double hi, bool lo_open, const std::string& key) {
    const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi;
    if (!ok) {
      std::ostringstream m;
      m << key << " must be finite and in " << (lo_open ? "(" : "[") << lo << ", " << hi << "], got " << v;
      fail(name, m.str());
    }
  };
  real_in(rms_norm_eps, 0.0, 1.0, true, "'rms_norm_eps'");
  real_in(rope.theta, 1.0, kMaxRopeTheta, true, "rope_theta");
  if (rope.type == RopeType::Yarn) {
    real_in(rope.factor, 1.0, kMaxYarnFactor, false, "yarn 'factor'");
    real_in(rope.original_max_position, 0.0, kMaxPositions, true, "yarn 'original_max_position_embeddings'");
    real_in(rope.beta_slow, 0.0, kMaxYarnBeta, true, "yarn 'beta_slow'");
    real_in(rope.beta_fast, 0.0, kMaxYarnBeta, true, "yarn 'beta_fast'");
    if (!(rope.beta_fast > rope.beta_slow)) {
      std::ostringstream m;
      m << "yarn 'beta_fast' (" << rope.beta_fast << ") must be greater than 'beta_slow' (" << rope.beta_slow << ")";
      fail(name, m.str());
    }
    real_in(rope.mscale, 0.0, kMaxYarnMscale, false, "yarn 'mscale'");
    real_in(rope.mscale_all_dim, 0.0, kMaxYarnMscale, false, "yarn 'mscale_all_dim'");
    real_in(rope.attention_factor, 0.0, kMaxYarnMscale, false, "yarn 'attention_factor'");
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
