// `mla demo`: a V2-Lite-shaped layer with random weights, no files needed. Prefills a prompt, checks chunked
// prefill against one-shot, then generates tokens twice: with the latent cache (absorbed form) and by
// re-expanding the whole cache every step (what the PyTorch reference does), and compares the two. With
// --cache-dtype fp8 the layer keeps an fp8 cache (docs/mla.md, "FP8 cache") and a fifth step generates the same
// tokens with a bf16 cache to show how far quantising the cache moves the outputs.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <unistd.h>

#include "commands.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "mla/mla.hpp"

namespace mla::tools {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d, den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

std::vector<float> random_hidden(int64_t rows, int64_t width, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(rows * width));
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 7;
  for (float& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = round_bf16(static_cast<float>(s >> 40) / 8388608.0f - 1.0f);
  }
  return v;
}

// The next "token" of a layer-only model: the last output, RMS-normalised and rounded like an embedding.
std::vector<float> next_input(const float* out, int64_t D) {
  double ss = 0;
  for (int64_t j = 0; j < D; ++j) ss += static_cast<double>(out[j]) * out[j];
  const auto inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + 1e-6));
  std::vector<float> x(static_cast<size_t>(D));
  for (int64_t j = 0; j < D; ++j) x[j] = round_bf16(out[j] * inv * 0.5f);
  return x;
}

struct Generation {
  std::vector<float> outputs;  // [generate, D]
  double seconds = 0;
};

// Prefills `prompt` into a fresh cache with `prefill_layer`, then generates with `decode_layer`.
Generation generate(Attention& prefill_layer, Attention& decode_layer, const std::vector<float>& prompt,
                    int64_t prompt_len, int64_t steps, int64_t page_size, const char* label) {
  const int64_t D = decode_layer.config().hidden_size;
  LatentCache cache = decode_layer.make_cache((prompt_len + steps + page_size - 1) / page_size + 1, page_size);
  const SeqId seq = cache.add_sequence();
  std::vector<float> out(static_cast<size_t>(prompt_len * D));
  const SequenceChunk pre{seq, prompt_len, nullptr};
  prefill_layer.forward_host({&pre, 1}, prompt.data(), out.data(), cache);
  Generation g;
  g.outputs.resize(static_cast<size_t>(steps * D));
  std::vector<float> x = next_input(out.data() + (prompt_len - 1) * D, D);
  const auto t0 = Clock::now();
  auto last_report = t0;
  const bool tty = isatty(fileno(stdout));
  for (int64_t i = 0; i < steps; ++i) {
    const SequenceChunk step{seq, 1, nullptr};
    decode_layer.forward_host({&step, 1}, x.data(), g.outputs.data() + i * D, cache);
    x = next_input(g.outputs.data() + i * D, D);
    if (std::chrono::duration<double>(Clock::now() - last_report).count() > 1.0) {
      last_report = Clock::now();
      std::printf(tty ? "\r  %-28s %lld/%lld tokens" : "  %-28s %lld/%lld tokens\n", label, (long long)i + 1, (long long)steps);
      std::fflush(stdout);
    }
  }
  g.seconds = seconds_since(t0);
  if (tty) std::printf("\r%60s\r", "");
  return g;
}

}  // namespace

int run_demo(const DemoArgs& a) {
  const auto start = Clock::now();
  const Config config = Config::preset("v2-lite");
  const int64_t D = config.hidden_size, W = config.latent_dim();
  LayerOptions opt;  // checked before anything is printed
  opt.device = a.device;
  opt.precision = parse_precision(a.dtype);
  opt.cache_dtype = parse_cache_dtype(a.cache_dtype, opt.precision);
  std::printf("mla demo: one DeepSeek-V2-Lite attention layer (D=%lld, %lld heads, latent %lld+%lld), random weights,"
              " %s on %s%s\n", (long long)D, (long long)config.num_heads, (long long)config.kv_lora_rank,
              (long long)config.qk_rope_head_dim, a.dtype.c_str(), a.device.c_str(),
              a.cache_dtype == "fp8" ? ", fp8 cache" : "");
  if (a.device == "cpu") {
    std::printf("  kernels: %s\n  GEMM: %s\n", isa_summary().c_str(), cpu::gemm_library_name().c_str());
    std::fflush(stdout);
  }
  const LayerWeights weights = LayerWeights::random(config, a.seed);
  const bool fp8 = opt.cache_dtype == CacheDtype::FP8;
  const int steps = fp8 ? 5 : 4;
  Attention layer(weights, opt);
  const std::vector<float> prompt = random_hidden(a.prompt, D, a.seed + 1);

  // 1. One-shot prefill.
  std::printf("[1/%d] prefill %lld tokens in one call ...\n", steps, (long long)a.prompt);
  std::fflush(stdout);
  const int64_t pages = (a.prompt + a.generate + a.page_size - 1) / a.page_size + 1;
  LatentCache one = layer.make_cache(pages, a.page_size);
  const SeqId s1 = one.add_sequence();
  std::vector<float> out1(static_cast<size_t>(a.prompt * D));
  const SequenceChunk all{s1, a.prompt, nullptr};
  layer.forward_host({&all, 1}, prompt.data(), out1.data(), one);  // warm-up: weight conversion, GEMM plans
  one.truncate(s1, 0);
  auto t0 = Clock::now();
  layer.forward_host({&all, 1}, prompt.data(), out1.data(), one);
  const double prefill_s = seconds_since(t0);
  const double prefill_flops = CostModel::of(config).prefill_flops(a.prompt);
  std::printf("      %.1f ms, %.0f tokens/s, %.1f GFLOP/s (path: %s)\n", prefill_s * 1e3, a.prompt / prefill_s,
              prefill_flops / prefill_s / 1e9, std::string(path_name(layer.last_paths().at(0))).c_str());
  if (a.device == "cpu") {  // a quick ceiling: is this machine slow, or the layer?
    const double gemm = gemm_rate_gflops(opt.precision == Precision::BF16, 1024, 3);
    std::printf("      this CPU's %s GEMM (1024^3, %s kernels): %.0f GFLOP/s; the prefill reached %.0f%% of it\n",
                a.dtype.c_str(), cpu::kernel_isa().c_str(), gemm, 100 * prefill_flops / prefill_s / 1e9 / gemm);
  }

  // 2. Chunked prefill must equal one-shot, outputs and cache rows.
  std::printf("[2/%d] prefill again in chunks of %lld and compare ...\n", steps, (long long)a.chunk);
  LatentCache chunked = layer.make_cache(pages, a.page_size, /*page_order_seed=*/7);
  const SeqId s2 = chunked.add_sequence();
  std::vector<float> out2(out1.size());
  for (int64_t done = 0; done < a.prompt; done += a.chunk) {
    const int64_t n = std::min(a.chunk, a.prompt - done);
    const SequenceChunk c{s2, n, nullptr};
    layer.forward_host({&c, 1}, prompt.data() + done * D, out2.data() + done * D, chunked);
  }
  const double out_err = rel_error(out2, out1);
  const double cache_err = rel_error(chunked.read_rows(s2, 0, a.prompt), one.read_rows(s1, 0, a.prompt));
  const double tol = opt.precision == Precision::F32 ? 1e-5 : 1e-2;
  std::printf("      output rel. error %.2e, cache rows rel. error %.2e (permuted pages): %s\n", out_err, cache_err,
              out_err < tol && cache_err < tol ? "match" : "MISMATCH");

  // 3./4. Generation with the latent cache vs re-expanding it.
  LayerOptions expanded_opt = opt;
  expanded_opt.path = Path::Expanded;
  Attention reexpand(weights, expanded_opt);
  std::printf("[3/%d] generate %lld tokens with the latent cache (absorbed form) ...\n", steps, (long long)a.generate);
  std::fflush(stdout);
  const Generation latent = generate(layer, layer, prompt, a.prompt, a.generate, a.page_size, "latent cache");
  std::printf("      %.2f ms/token, %.1f tokens/s\n", latent.seconds * 1e3 / a.generate, a.generate / latent.seconds);
  std::printf("[4/%d] generate the same tokens re-expanding the cache every step ...\n", steps);
  std::fflush(stdout);
  const Generation slow = generate(layer, reexpand, prompt, a.prompt, a.generate, a.page_size, "re-expanding");
  std::printf("      %.2f ms/token, %.1f tokens/s\n", slow.seconds * 1e3 / a.generate, a.generate / slow.seconds);
  const double gen_err = rel_error(latent.outputs, slow.outputs);
  const double gen_tol = opt.precision == Precision::F32 ? 1e-4 : 5e-2;

  // 5. (fp8) The same generation over a bf16 cache: what quantising the cache costs in accuracy. The first token
  // sees the prompt's rows only; later ones also feed their own outputs back, so differences grow.
  // e4m3 keeps 3 mantissa bits: rows move by about 3% (relative), outputs by a few 1e-2. A bound well above that
  // catches a broken quantiser or a kernel that reads the rows wrongly, not the rounding itself.
  constexpr double fp8_tol = 1e-1;
  double fp8_first = 0, fp8_all = 0;
  if (fp8) {
    LayerOptions bf16_opt = opt;
    bf16_opt.cache_dtype = CacheDtype::Auto;
    Attention bf16_layer(weights, bf16_opt);
    std::printf("[5/5] generate the same tokens with a bf16 cache and compare ...\n");
    std::fflush(stdout);
    const Generation bf16 = generate(bf16_layer, bf16_layer, prompt, a.prompt, a.generate, a.page_size, "bf16 cache");
    const std::vector<float> first_fp8(latent.outputs.begin(), latent.outputs.begin() + D);
    const std::vector<float> first_bf16(bf16.outputs.begin(), bf16.outputs.begin() + D);
    fp8_first = rel_error(first_fp8, first_bf16);
    fp8_all = rel_error(latent.outputs, bf16.outputs);
    std::printf("      %.2f ms/token with the bf16 cache; fp8 vs bf16 cache outputs: rel. difference %.2e at the "
                "first token, %.2e over all %lld\n", bf16.seconds * 1e3 / a.generate, fp8_first, fp8_all,
                (long long)a.generate);
  }

  const CostModel m = CostModel::of(config);
  const int elt = opt.precision == Precision::F32 ? 4 : 2;
  const RowLayout fp8_row{.dtype = DType::F8_E4M3, .latent = config.kv_lora_rank, .rope = config.qk_rope_head_dim};
  const int64_t row_bytes = fp8 ? fp8_row.bytes() : W * elt;  // of the cache this demo's layer kept
  std::printf("\nsummary\n");
  if (a.device == "cpu") std::printf("  CPU kernels             %s\n", isa_summary().c_str());
  std::printf("  prefill                 %8.0f tokens/s, %.1f GFLOP/s\n", a.prompt / prefill_s,
              prefill_flops / prefill_s / 1e9);
  std::printf("  generate, latent cache  %8.1f tokens/s\n", a.generate / latent.seconds);
  std::printf("  generate, re-expanding  %8.1f tokens/s\n", a.generate / slow.seconds);
  std::printf("  speedup                 %8.1fx  (outputs agree to %.1e: %s)\n", slow.seconds / latent.seconds, gen_err,
              gen_err < gen_tol ? "match" : "MISMATCH");
  if (fp8)
    std::printf("  fp8 cache vs bf16 cache %8.1e  rel. difference of the first generated token (%.1e over all; "
                "e4m3 rounding, a few 1e-2 expected): %s\n", fp8_first, fp8_all, fp8_first < fp8_tol ? "ok" : "MISMATCH");
  std::printf("  cache bytes per token per layer: latent %lld B (%s), expanded K/V %lld B (%.1fx), plain MHA %lld B (%.1fx)\n",
              (long long)row_bytes, fp8 ? "fp8" : a.dtype.c_str(), (long long)(m.expanded_cache_values_per_token * elt),
              static_cast<double>(m.expanded_cache_values_per_token * elt) / row_bytes,
              (long long)(m.mha_cache_values_per_token * elt),
              static_cast<double>(m.mha_cache_values_per_token * elt) / row_bytes);
  std::printf("  latent cache in fp8 (--cache-dtype fp8) %lld B vs bf16 %lld B per token per layer: %.2fx smaller\n",
              (long long)fp8_row.bytes(), (long long)(W * 2), static_cast<double>(W * 2) / fp8_row.bytes());
  const int64_t other_bytes = fp8 ? W * 2 : fp8_row.bytes();
  std::printf("  whole model (%lld layers) at %lld tokens: latent %.1f MB (%s; %.1f MB in %s), expanded %.1f MB\n",
              (long long)config.num_layers, (long long)(a.prompt + a.generate),
              static_cast<double>(row_bytes * config.num_layers * (a.prompt + a.generate)) / 1e6,
              fp8 ? "fp8" : a.dtype.c_str(),
              static_cast<double>(other_bytes * config.num_layers * (a.prompt + a.generate)) / 1e6, fp8 ? "bf16" : "fp8",
              static_cast<double>(m.expanded_cache_values_per_token * elt * config.num_layers * (a.prompt + a.generate)) / 1e6);
  std::printf("  total time %.1f s\n", seconds_since(start));
  const bool ok = out_err < tol && cache_err < tol && gen_err < gen_tol && fp8_first < fp8_tol;
  if (!ok) std::printf("demo FAILED: a comparison did not match\n");
  return ok ? 0 : 2;
}

}  // namespace mla::tools
