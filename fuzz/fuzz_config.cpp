// libFuzzer target: config.json text through Config::from_json (which validates), then what every layer
// constructor computes from an accepted config (DerivedConstants, CostModel).
//
// Each input is used twice: as the JSON text itself, and read by FuzzedDataProvider as the values of the keys
// from_json knows (a config assembled from them, then printed to JSON). The second reading reaches boundary
// numbers at once (any int64 or uint64, huge or fractional floats, null, wrong types) that byte mutation of JSON
// text reaches only digit by digit; the first keeps the JSON parser and unknown structure in play.
//
// Oracle: bad input must throw mla::Error (include/mla/error.hpp); any other exception, a sanitizer report
// (UBSan includes float-cast-overflow and signed overflow), a timeout or an allocation over -rss_limit_mb is
// a crash. A config that validate() accepts must be one the library can compute its constants for.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <fuzzer/FuzzedDataProvider.h>
#include <nlohmann/json.hpp>

#include "mla/config.hpp"
#include "mla/error.hpp"

namespace {

using nlohmann::json;

void check(std::string_view text) {
  try {
    const mla::Config config = mla::Config::from_json(text, "fuzz/config.json");
    config.validate();
    (void)mla::DerivedConstants::compute(config);
    (void)mla::CostModel::of(config);
  } catch (const mla::Error&) {
  }
}

// One value: mostly numbers, from plausible to extreme; sometimes another JSON type, or absent (discarded).
json value(FuzzedDataProvider& in, bool integer_like) {
  switch (in.ConsumeIntegralInRange<int>(0, 9)) {
    case 0: case 1: case 2:
      return integer_like ? json(in.ConsumeIntegralInRange<int64_t>(0, 4096)) : json(in.ConsumeFloatingPointInRange(0.0, 1e5));
    case 3: return in.ConsumeIntegral<int64_t>();
    case 4: return in.ConsumeIntegral<uint64_t>();
    case 5: return in.ConsumeFloatingPoint<double>();
    case 6: return static_cast<double>(in.ConsumeIntegral<int64_t>()) * 1024.0;   // integral floats, up to 2^73
    case 7: return nullptr;
    case 8: return in.ConsumeBool() ? json(in.ConsumeRandomLengthString(16)) : json(in.ConsumeBool());
    default: return json(json::value_t::discarded);
  }
}

json assembled(FuzzedDataProvider& in) {
  static constexpr const char* kIntegers[] = {"hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                              "num_hidden_layers"};
  static constexpr const char* kYarn[] = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                                          "mscale", "mscale_all_dim", "attention_factor"};
  json j = json::object();
  auto put = [&](json& obj, const char* key, bool integer_like) {
    json v = value(in, integer_like);
    if (!v.is_discarded()) obj[key] = std::move(v);
  };
  for (const char* key : kIntegers) put(j, key, true);
  put(j, "rms_norm_eps", false);
  put(j, "rope_theta", false);
  if (in.ConsumeBool()) j["attention_bias"] = in.ConsumeBool();
  if (in.ConsumeBool()) {
    json rope = json::object();
    rope[in.ConsumeBool() ? "type" : "rope_type"] = in.ConsumeBool() ? "yarn" : in.ConsumeRandomLengthString(8);
    for (const char* key : kYarn) put(rope, key, false);
    if (in.ConsumeBool()) {
      put(rope, "rope_theta", false);
      j["rope_parameters"] = std::move(rope);
    } else {
      j["rope_scaling"] = std::move(rope);
    }
  }
  return j;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check(std::string_view(reinterpret_cast<const char*>(data), size));
  FuzzedDataProvider in(data, size);
  // replace: the assembled strings are random bytes, which dump() would otherwise refuse as invalid UTF-8.
  check(assembled(in).dump(-1, ' ', false, json::error_handler_t::replace));
  return 0;
}
