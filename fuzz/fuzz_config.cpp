// libFuzzer target: config.json text through Config::from_json (which validates), then what every layer
// constructor computes from an accepted config (DerivedConstants, CostModel).
//
// Oracle: bad input must throw mla::Error (include/mla/error.hpp); any other exception, a sanitizer report
// (UBSan includes float-cast-overflow and signed overflow), a timeout or an allocation over -rss_limit_mb is
// a crash. A config that validate() accepts must be one the library can compute its constants for.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "mla/config.hpp"
#include "mla/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const mla::Config config = mla::Config::from_json(text, "fuzz/config.json");
    config.validate();
    (void)mla::DerivedConstants::compute(config);
    (void)mla::CostModel::of(config);
  } catch (const mla::Error&) {
  }
  return 0;
}
