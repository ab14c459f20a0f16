// The shape of one MLA layer as a Hugging Face DeepSeek config.json describes it, and the constants derived
// from it once (softmax scale, YaRN frequencies and magnitude). ../docs/spec-notes.md cites the formulas.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace mla {

enum class RopeType { Default, Yarn };

struct RopeParams {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  // YaRN only.
  double factor = 1.0;
  double original_max_position = 4096.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  double attention_factor = 0.0;  // 0: derived from mscale / mscale_all_dim
};

struct Config {
  int64_t hidden_size = 0;        // D
  int64_t num_heads = 0;          // H
  int64_t q_lora_rank = 0;        // d_q; 0 = no query compression (q_proj)
  int64_t kv_lora_rank = 0;       // d_c
  int64_t qk_nope_head_dim = 0;   // d_n
  int64_t qk_rope_head_dim = 0;   // d_r (even)
  int64_t v_head_dim = 0;         // d_v
  int64_t num_layers = 1;
  double rms_norm_eps = 1e-6;     // NOT used by the latent norms (they always use kLatentNormEps)
  bool attention_bias = false;
  RopeParams rope;
  std::string name;               // preset name or the config's path, for messages

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int64_t latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }  // one cache row
  bool has_q_lora() const { return q_lora_rank > 0; }

  // Throws mla::Error naming the key for a missing, mistyped, non-integral, out-of-range or inconsistent value.
  static Config from_json(std::string_view json_text, std::string_view source = "config.json");
  // A regular file of at most 64 MiB (symlinks followed); anything else is refused naming the path.
  static Config from_file(const std::filesystem::path& path);
  // "v2-lite", "v2", "v3" (r1 is an alias of v3).
  static Config preset(std::string_view name);
  static std::vector<std::string> preset_names();

  // Throws mla::Error naming the key when a value is outside the bounds below or inconsistent.
  void validate() const;
};

// Bounds Config::validate() enforces (docs/mla.md, "Input limits"). Each is far above every released DeepSeek
// model (V3: D 7168, H 128, d_q 1536, d_c 512, d_n 128, d_r 64, d_v 128, 61 layers, YaRN factor 40 over 4096
// positions), and small enough that every size derived from them (H·(d_n+d_v)·d_c, H·d_qk·D, ...) fits in int64
// and that a hostile config.json cannot make the library allocate or print gigabytes before a tensor is read.
inline constexpr int64_t kMaxHiddenSize = int64_t{1} << 18;  // 262144
inline constexpr int64_t kMaxHeads = int64_t{1} << 14;       // 16384
inline constexpr int64_t kMaxLoraRank = int64_t{1} << 16;    // q_lora_rank, kv_lora_rank: 65536
inline constexpr int64_t kMaxHeadDim = int64_t{1} << 12;     // qk_nope_head_dim, qk_rope_head_dim, v_head_dim: 4096
inline constexpr int64_t kMaxLayers = int64_t{1} << 16;      // num_hidden_layers
inline constexpr double kMaxPositions = 1073741824.0;        // 2^30, original_max_position_embeddings
inline constexpr double kMaxRopeTheta = 1e12;                // rope_theta in (1, 1e12]
inline constexpr double kMaxYarnFactor = 1e6;                // YaRN factor in [1, 1e6]
inline constexpr double kMaxYarnBeta = 1e6;                  // 0 < beta_slow < beta_fast <= 1e6
inline constexpr double kMaxYarnMscale = 100.0;              // mscale, mscale_all_dim, attention_factor in [0, 100]

// RMSNorm epsilon of q_a_layernorm and kv_a_layernorm in every released checkpoint, whatever rms_norm_eps says.
inline constexpr float kLatentNormEps = 1e-6f;

// Constants computed once per config, in fp32 as the reference implementation computes them.
struct DerivedConstants {
  float softmax_scale = 0.f;        // τ
  float rope_magnitude = 1.f;       // A, multiplies cos and sin
  float yarn_low = 0.f, yarn_high = 0.f;  // ramp ends (YaRN only)
  std::vector<float> inv_freq;      // ω_i, d_r/2 values

  static DerivedConstants compute(const Config& config);
};

// YaRN magnitude helper m(s, x) = 1 if s <= 1 else 0.1·x·ln(s) + 1.
double yarn_mscale(double scale, double mscale);

// FLOP and byte counts used by `mla info`, `mla bench` and the docs.
struct CostModel {
  double projection_flops_per_token;      // q (+q_a), kv_a, o
  double absorb_flops_per_token;          // q̂ = W_UKᵀ qn and o = W_UV ô, all heads
  double expand_flops_per_key;            // kv_b applied to one cached row (expanded path)
  double expanded_attention_flops_per_pair;  // one (query, key) pair, all heads
  double absorbed_attention_flops_per_pair;
  int64_t cache_values_per_token;         // d_c + d_r
  int64_t expanded_cache_values_per_token;  // H·(d_qk + d_v)
  int64_t mha_cache_values_per_token;     // 2·H·d_n: plain MHA with H heads of size d_n (DeepSeek-V2 paper)

  static CostModel of(const Config& config);

  // One causal prefill of `tokens` new tokens on an empty cache, expanded form: projections, expansion of every
  // key, and attention over the T(T+1)/2 causal pairs.
  double prefill_flops(int64_t tokens) const {
    const auto T = static_cast<double>(tokens);
    return (projection_flops_per_token + expand_flops_per_key) * T + expanded_attention_flops_per_pair * T * (T + 1) / 2;
  }
};

}  // namespace mla
