// libFuzzer target: a whole safetensors file (8-byte little-endian header length, JSON header, data section) as
// SafetensorsFile opens it, then every tensor read back the way LayerWeights::load reads it.
//
// Each input is used twice: as the file itself, and read by FuzzedDataProvider as a header assembled from
// extreme values (shapes and data_offsets near 2^63 and 2^64, negative or fractional numbers, unknown dtypes,
// offsets that overlap or run past the data) followed by a data section. Byte mutation of the JSON text reaches
// such numbers only digit by digit; the second reading reaches them at once.
//
// Oracle: the library's error policy (include/mla/error.hpp) is that bad input throws mla::Error. Any other
// exception escapes this function and libFuzzer reports it as a crash, as it does for ASan/UBSan reports,
// timeouts and allocations over -rss_limit_mb.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>
#include <nlohmann/json.hpp>

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

void open_and_read(const mla_fuzz::MemFile& input, const uint8_t* data, size_t size) {
  input.replace(data, size);
  try {
    const mla::SafetensorsFile file(input.path());
    read_back(file);
  } catch (const mla::Error&) {
  }
}

using nlohmann::json;

// A size: mostly small and plausible, sometimes at or past the limits of int64/uint64, negative or fractional.
json number(FuzzedDataProvider& in, uint64_t plausible) {
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: case 1: case 2: case 3: return in.ConsumeIntegralInRange<uint64_t>(0, plausible);
    case 4: return in.ConsumeIntegral<uint64_t>();
    case 5: return (uint64_t{1} << in.ConsumeIntegralInRange<int>(0, 63)) - in.ConsumeIntegralInRange<uint64_t>(0, 2);
    case 6: return in.ConsumeIntegral<int64_t>();
    default: return in.ConsumeFloatingPoint<double>();
  }
}

std::string assembled(FuzzedDataProvider& in) {
  static constexpr const char* kDTypes[] = {"F32", "F64", "BF16", "F16", "F8_E4M3", "I64", "I32", "U8", "BOOL", "U64", "F8_E5M2", "X"};
  const auto data_bytes = in.ConsumeIntegralInRange<uint64_t>(0, 256);
  json header = json::object();
  if (in.ConsumeBool()) header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (int t = in.ConsumeIntegralInRange<int>(0, 4); t > 0; --t) {
    json shape = json::array();
    for (int d = in.ConsumeIntegralInRange<int>(0, 4); d > 0; --d) shape.push_back(number(in, 16));
    json begin = in.ConsumeBool() ? json(offset) : number(in, data_bytes);
    json end = in.ConsumeBool() ? json(offset + in.ConsumeIntegralInRange<uint64_t>(0, 64)) : number(in, data_bytes);
    if (end.is_number_unsigned()) offset = end.get<uint64_t>();
    header["t" + std::to_string(t)] = {{"dtype", in.PickValueInArray(kDTypes)}, {"shape", shape},
                                        {"data_offsets", {begin, end}}};
  }
  const std::string text = header.dump();
  std::string file(8, '\0');
  const uint64_t len = in.ConsumeBool() ? text.size() : in.ConsumeIntegral<uint64_t>();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(len >> (8 * i));
  file += text;
  file += in.ConsumeBytesAsString(static_cast<size_t>(data_bytes));
  return file;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const mla_fuzz::MemFile input("fuzz_safetensors");
  open_and_read(input, data, size);
  FuzzedDataProvider in(data, size);
  const std::string file = assembled(in);
  open_and_read(input, reinterpret_cast<const uint8_t*>(file.data()), file.size());
  return 0;
}
