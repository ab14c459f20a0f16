// The attention weights of one layer, loaded from a checkpoint folder (any layer index) and held in f32
// on the host. Backends convert them once to what they compute with (bf16, device memory).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "mla/config.hpp"

namespace mla {

class Checkpoint;

// Row-major [rows, cols] f32; y = W x with W stored [out, in] as in the checkpoint.
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<float> data;
  bool empty() const { return data.empty(); }
  const float* row(int64_t r) const { return data.data() + r * cols; }
};

struct LayerWeights {
  Config config;
  int64_t layer = 0;

  Matrix q_proj;                 // [H·d_qk, D]      only without query compression
  Matrix q_a_proj;               // [d_q, D]
  std::vector<float> q_a_norm;   // [d_q]
  Matrix q_b_proj;               // [H·d_qk, d_q]
  Matrix kv_a_proj;              // [d_c + d_r, D]   rows [0,d_c) latent, then the shared rope key
  std::vector<float> kv_a_norm;  // [d_c]
  Matrix kv_b_proj;              // [H·(d_n+d_v), d_c]  per head: d_n rows of W_UK, then d_v rows of W_UV
  Matrix o_proj;                 // [D, H·d_v]
  // Only with attention_bias: q_a_proj (or q_proj), kv_a_proj_with_mqa and o_proj biases.
  std::vector<float> q_bias, kv_a_bias, o_bias;

  // Reads dir/config.json and the tensors of `layer` (single file or index + shards; BF16, F16, F32, or
  // F8_E4M3 with 128x128 weight_scale_inv blocks). Only those tensors' bytes are touched.
  // Refuses NaN/Inf weights and block scales that are not positive and finite, naming the tensor and element.
  static LayerWeights load(const std::filesystem::path& dir, int64_t layer = 0);
  static LayerWeights load(const Checkpoint& checkpoint, const Config& config, int64_t layer);
  // Deterministic random weights of checkpoint-like scale (for `mla demo`, benchmarks and tests).
  static LayerWeights random(const Config& config, uint64_t seed);

  // Throws mla::Error when a tensor's shape disagrees with the config or it holds NaN or Inf (naming the first).
  void validate() const;
};

}  // namespace mla
