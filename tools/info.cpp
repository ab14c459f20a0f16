// `mla info`: what one layer costs: cache bytes per token, FLOPs per token per path, derived constants.
#include <cstdio>

#include "commands.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "mla/mla.hpp"

namespace mla::tools {

int run_info(const InfoArgs& a) {
  const Config c = a.model.empty() ? Config::preset(a.preset) : Config::from_file(std::filesystem::path(a.model) / "config.json");
  const DerivedConstants k = DerivedConstants::compute(c);
  const CostModel m = CostModel::of(c);
  const double L = static_cast<double>(a.context);

  std::printf("config            %s\n", c.name.c_str());
  std::printf("shape             D=%lld H=%lld d_q=%lld d_c=%lld d_n=%lld d_r=%lld d_v=%lld layers=%lld\n",
              (long long)c.hidden_size, (long long)c.num_heads, (long long)c.q_lora_rank, (long long)c.kv_lora_rank,
              (long long)c.qk_nope_head_dim, (long long)c.qk_rope_head_dim, (long long)c.v_head_dim,
              (long long)c.num_layers);
  std::printf("\nderived constants\n");
  std::printf("  softmax scale tau   %.10f\n", k.softmax_scale);
  std::printf("  rope magnitude A    %.7f\n", k.rope_magnitude);
  if (c.rope.type == RopeType::Yarn)
    std::printf("  yarn ramp           lo=%g hi=%g (factor %g, L0 %g)\n", k.yarn_low, k.yarn_high, c.rope.factor,
                c.rope.original_max_position);
  else
    std::printf("  rope                plain (theta %g)\n", c.rope.theta);
  std::printf("  omega               ");
  for (size_t i = 0; i < k.inv_freq.size(); ++i) std::printf("%.6g%s", k.inv_freq[i], i + 1 < k.inv_freq.size() ? " " : "\n");

  const auto per_layer = [&](int64_t values, int bytes) { return static_cast<double>(values) * bytes; };
  std::printf("\ncache per token          per layer     per model (%lld layers)\n", (long long)c.num_layers);
  const struct { const char* name; int64_t values; } rows[] = {
      {"latent (MLA)", m.cache_values_per_token},
      {"expanded K,V", m.expanded_cache_values_per_token},
      {"plain MHA", m.mha_cache_values_per_token},
  };
  for (const auto& r : rows)
    for (int bytes : {2, 4})
      std::printf("  %-14s %-4s %9.0f B   %12.1f KB\n", r.name, bytes == 2 ? "bf16" : "f32", per_layer(r.values, bytes),
                  per_layer(r.values, bytes) * static_cast<double>(c.num_layers) / 1000.0);
  const bool fp8 = a.cache_dtype == "fp8";
  const RowLayout bf16_row{.dtype = DType::BF16, .latent = c.kv_lora_rank, .rope = c.qk_rope_head_dim};
  const RowLayout fp8_row{.dtype = DType::F8_E4M3, .latent = c.kv_lora_rank, .rope = c.qk_rope_head_dim};
  if (fp8)
    std::printf("  %-14s %-4s %9lld B   %12.1f KB\n", "latent (MLA)", "fp8", (long long)fp8_row.bytes(),
                static_cast<double>(fp8_row.bytes()) * static_cast<double>(c.num_layers) / 1000.0);
  std::printf("  latent is %.1fx smaller than the expanded cache, %.1fx smaller than MHA\n",
              static_cast<double>(m.expanded_cache_values_per_token) / m.cache_values_per_token,
              static_cast<double>(m.mha_cache_values_per_token) / m.cache_values_per_token);

  // The latent cache a context of L tokens needs, in the rows --cache-dtype selects, beside the other kind.
  const RowLayout& row = fp8 ? fp8_row : bf16_row;
  const RowLayout& other = fp8 ? bf16_row : fp8_row;
  const double layers = static_cast<double>(c.num_layers);
  std::printf("\nlatent cache at context %lld (--cache-dtype %s: %s)\n", (long long)a.context, a.cache_dtype.c_str(),
              fp8 ? "fp8_ds_mla rows of a bf16 layer" : "bf16 rows; an f32 layer stores twice that");
  if (fp8)
    std::printf("  row layout     %lld e4m3 @0 | %lld fp32 scales @%lld | %lld bf16 rope @%lld | zero pad to %lld B\n",
                (long long)fp8_row.latent, (long long)fp8_row.groups(), (long long)fp8_row.scale_offset(),
                (long long)fp8_row.rope, (long long)fp8_row.rope_offset(), (long long)fp8_row.bytes());
  std::printf("                 %-29s per model (%lld layers)\n", "per layer", (long long)c.num_layers);
  const auto human = [](double bytes) {
    char buf[48];
    if (bytes < 1e4) std::snprintf(buf, sizeof buf, "%.0f B", bytes);
    else if (bytes < 1e6) std::snprintf(buf, sizeof buf, "%.1f KB", bytes / 1e3);
    else if (bytes < 1e9) std::snprintf(buf, sizeof buf, "%.2f MB", bytes / 1e6);
    else std::snprintf(buf, sizeof buf, "%.2f GB", bytes / 1e9);
    return std::string(buf);
  };
  const auto line = [&](const std::string& what, const RowLayout& r, double tokens) {
    const double bytes = static_cast<double>(r.bytes()) * tokens;
    char per_layer[64];
    if (bytes < 1e4) std::snprintf(per_layer, sizeof per_layer, "%.0f B", bytes);
    else std::snprintf(per_layer, sizeof per_layer, "%.0f B (%s)", bytes, human(bytes).c_str());
    std::printf("  %-14s %-29s %s\n", what.c_str(), per_layer, human(bytes * layers).c_str());
  };
  line("one token", row, 1);
  line(std::to_string(a.context) + " tokens", row, L);
  line(std::string("same in ") + (fp8 ? "bf16" : "fp8"), other, L);
  std::printf("  %s is %.2fx smaller\n", fp8 ? "fp8 (this cache)" : "fp8 (--cache-dtype fp8)",
              static_cast<double>(bf16_row.bytes()) / static_cast<double>(fp8_row.bytes()));

  std::printf("\nFLOPs per token (one layer)\n");
  std::printf("  projections (q, kv_a, o)              %10.2f MFLOP\n", m.projection_flops_per_token / 1e6);
  std::printf("  absorb + un-absorb (absorbed path)    %10.2f MFLOP\n", m.absorb_flops_per_token / 1e6);
  std::printf("  expansion of one cached row (kv_b)    %10.2f MFLOP\n", m.expand_flops_per_key / 1e6);
  std::printf("  attention per key, expanded           %10.0f FLOP\n", m.expanded_attention_flops_per_pair);
  std::printf("  attention per key, absorbed           %10.0f FLOP\n", m.absorbed_attention_flops_per_pair);
  std::printf("\none decode token at context %lld\n", (long long)a.context);
  const double absorbed = m.projection_flops_per_token + m.absorb_flops_per_token + m.absorbed_attention_flops_per_pair * L;
  const double reexpand = m.projection_flops_per_token + m.expand_flops_per_key * L + m.expanded_attention_flops_per_pair * L;
  std::printf("  absorbed (latent cache)               %10.2f MFLOP\n", absorbed / 1e6);
  std::printf("  re-expanding the cache                %10.2f MFLOP (%.1fx)\n", reexpand / 1e6, reexpand / absorbed);
  std::printf("  auto path chooses                     %s\n", std::string(path_name(choose_path(c, 1, a.context))).c_str());
  std::printf("prefill of %lld tokens: auto path chooses %s\n", (long long)a.context,
              std::string(path_name(choose_path(c, a.context, a.context))).c_str());

  std::string runs;
  for (cpu::Isa v : cpu::supported_isas()) runs += (runs.empty() ? "" : ", ") + std::string(cpu::isa_name(v));
  std::printf("\nthis machine (device cpu)\n");
  std::printf("  kernels   %s\n", isa_summary().c_str());
  std::printf("            this CPU runs: %s (MLA_CPU_ISA forces one)\n", runs.c_str());
  std::printf("  GEMM      %s\n", cpu::gemm_library_name().c_str());
  return 0;
}

}  // namespace mla::tools
