// libFuzzer target: a whole safetensors file (8-byte little-endian header length, JSON header, data section) as
// SafetensorsFile opens it, then every tensor read back the way LayerWeights::load reads it.
//
// Oracle: the library's error policy (include/mla/error.hpp) is that bad input throws mla::Error. Any other
// exception escapes this function and libFuzzer reports it as a crash, as it does for ASan/UBSan reports,
// timeouts and allocations over -rss_limit_mb.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"
#include "mla/error.hpp"
#include "mla/safetensors.hpp"

namespace {

// Reading converts to f32 in a fresh vector; bigger tensors than this cannot come from a small fuzz input
// unless the header lies about sizes, which is what the size checks must catch. Kept as a bound so that a
// missed check shows up as an ASan read overflow rather than a multi-GB allocation.
constexpr int64_t kMaxReadElements = int64_t{1} << 22;

void read_back(const mla::SafetensorsFile& file) {
  for (const std::string& name : file.names()) {
    try {
      const mla::TensorRef t = file.tensor(name);
      if (t.info.numel() > kMaxReadElements) continue;
      if (t.info.dtype == mla::DType::I64 || t.info.dtype == mla::DType::I32) {
        (void)file.read_i64(name, t.info.shape);
      } else {
        (void)file.read_f32(name, t.info.shape);
      }
    } catch (const mla::Error&) {
    }
  }
  (void)file.contains("model.layers.0.self_attn.kv_a_proj_with_mqa.weight");
  (void)file.metadata();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const mla_fuzz::MemFile input("fuzz_safetensors");
  input.replace(data, size);
  try {
    const mla::SafetensorsFile file(input.path());
    read_back(file);
  } catch (const mla::Error&) {
  }
  return 0;
}
