// `mla forward`: one layer of a checkpoint over hidden states read from a safetensors file.
#include <iostream>

#include "commands.hpp"
#include "mla/mla.hpp"

namespace mla::tools {

Precision parse_precision(const std::string& s) {
  if (s == "f32") return Precision::F32;
  if (s == "bf16") return Precision::BF16;
  throw InvalidArgument("--dtype must be f32 or bf16, got '" + s + "'");
}

Path parse_path(const std::string& s) {
  if (s == "auto") return Path::Auto;
  if (s == "expanded") return Path::Expanded;
  if (s == "absorbed") return Path::Absorbed;
  throw InvalidArgument("--path must be auto, expanded or absorbed, got '" + s + "'");
}

CacheDtype parse_cache_dtype(const std::string& s, Precision precision) {
  if (s != "auto" && s != "fp8") throw InvalidArgument("--cache-dtype must be auto or fp8, got '" + s + "'");
  if (s == "auto") return CacheDtype::Auto;
  if (precision != Precision::BF16)
    throw InvalidArgument("--cache-dtype fp8 needs --dtype bf16 (the fp8 cache stores a bf16 layer's rows), got --dtype " +
                          std::string(precision_name(precision)));
  return CacheDtype::FP8;
}

int run_forward(const ForwardArgs& a) {
  const LayerWeights weights = LayerWeights::load(a.model, a.layer);
  const Config& c = weights.config;

  SafetensorsFile io(a.input);
  const TensorRef h = io.tensor("hidden_states");
  if (h.info.shape.size() != 3 || h.info.shape[2] != c.hidden_size) {
    std::string shape;
    for (int64_t d : h.info.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    throw InvalidArgument(a.input + ": hidden_states has shape [" + shape + "], expected [B, T, " +
                          std::to_string(c.hidden_size) + "] (hidden_size of " + a.model + ")");
  }
  const int64_t B = h.info.shape[0], T = h.info.shape[1];
  const std::vector<float> hidden = io.read_f32("hidden_states");
  std::vector<int64_t> positions;
  if (io.contains("position_ids")) {
    const int64_t shape[] = {B, T};
    positions = io.read_i64("position_ids", shape);
  }

  LayerOptions opt;
  opt.device = a.device;
  opt.precision = parse_precision(a.dtype);
  opt.path = parse_path(a.path);
  opt.cache_dtype = parse_cache_dtype(a.cache_dtype, opt.precision);
  Attention layer(weights, opt);
  RunOptions run;
  run.chunk = a.chunk;
  run.decode_after = a.decode_after;
  run.page_size = a.page_size;
  const RunResult r = run_sequences(layer, hidden.data(), positions.empty() ? nullptr : positions.data(), B, T, run);

  const TensorToWrite out[] = {
      {"output", DType::F32, {B, T, c.hidden_size}, r.output.data()},
      {"latent", DType::F32, {B, T, c.latent_dim()}, r.latent.data()},
  };
  write_safetensors(a.output, out,
                    {{"producer", "mla forward"}, {"dtype", a.dtype}, {"path", a.path}, {"cache_dtype", a.cache_dtype}});
  std::cerr << "mla forward: " << B << "x" << T << " tokens, " << r.calls << " calls, wrote " << a.output << "\n";
  return 0;
}

}  // namespace mla::tools
