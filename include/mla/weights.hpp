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

// Tensor parallelism over heads: rank `rank` of `world` holds heads [H·rank/world, H·(rank+1)/world).
// {0, 1} is the whole layer.
struct HeadShard {
  int64_t rank = 0, world = 1;
};

struct LayerWeights {
  Config config;               // of the heads held: num_heads is H/W for a shard
  int64_t layer = 0;
  HeadShard heads;             // which heads of the layer these are (shard_heads, load with a HeadShard)

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
  // A shard of a layer with attention_bias (heads.world > 1): the layer's o_proj bias, which o_bias holds on rank
  // 0 only. A tensor-parallel Attention adds it on every rank, once, after its all-reduce. Empty otherwise.
  std::vector<float> o_bias_layer;

  // Reads dir/config.json and the tensors of `layer` (single file or index + shards; BF16, F16, F32, or
  // F8_E4M3 with 128x128 weight_scale_inv blocks). Only those tensors' bytes are touched.
  // Refuses NaN/Inf weights and block scales that are not positive and finite, naming the tensor and element.
  static LayerWeights load(const std::filesystem::path& dir, int64_t layer = 0);
  static LayerWeights load(const Checkpoint& checkpoint, const Config& config, int64_t layer);
  // Rank shard.rank's share of the layer, read straight from the files: equal bit for bit to
  // load(dir, layer).shard_heads(shard.rank, shard.world), but of q_b_proj (or q_proj and its bias) and kv_b_proj
  // only the rank's rows and of o_proj only the rank's columns are read (a contiguous H·d_v/W of each row; for
  // FP8 only the 128x128 scale blocks those elements fall in, a block the slice boundary cuts included). The
  // replicated tensors (q_a_proj, kv_a_proj_with_mqa, the norms) and the biases are read whole by every rank.
  // Values are checked where they are read: a NaN in another rank's slice is that rank's error, not this one's.
  // Throws mla::InvalidArgument when W does not divide H or the rank is outside [0, W), as shard_heads does.
  static LayerWeights load(const std::filesystem::path& dir, int64_t layer, HeadShard shard);
  static LayerWeights load(const Checkpoint& checkpoint, const Config& config, int64_t layer, HeadShard shard);
  // Deterministic random weights of checkpoint-like scale (for `mla demo`, benchmarks and tests).
  static LayerWeights random(const Config& config, uint64_t seed);

  // Throws mla::Error when a tensor's shape disagrees with the config or it holds NaN or Inf (naming the first).
  void validate() const;

  // Tensor parallelism over heads: the weights rank `rank` of `world` holds. Heads [H·r/W, H·(r+1)/W) of q_b_proj
  // (or q_proj and its bias), kv_b_proj and o_proj (its columns); q_a_proj, kv_a_proj_with_mqa and both norms
  // replicated; o_proj's bias on rank 0 only (zeros elsewhere), so that the ranks' outputs sum to the layer's.
  // config.num_heads becomes H/W (the softmax scale does not depend on it). Every rank computes the same latent
  // cache rows. Throws mla::InvalidArgument when W does not divide H, rank is outside [0, W), or these weights
  // are a shard already. Loading with a HeadShard gives the same weights without reading the rest of the layer.
  LayerWeights shard_heads(int64_t rank, int64_t world) const;
};

}  // namespace mla
