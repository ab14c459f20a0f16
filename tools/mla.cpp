// `mla`: one program, subcommands forward / info / demo / bench.
#include <CLI/CLI.hpp>

#include <exception>
#include <filesystem>
#include <iostream>
#include <new>

#include "commands.hpp"
#include "mla/error.hpp"

namespace {

// Bounds on the numeric options (docs/mla.md, "Input limits"): far above any real use, low enough that sizes
// derived from them (pages, buffers, token counts) cannot overflow int64.
constexpr int64_t kMaxTokens = int64_t{1} << 20;      // demo and bench token counts
constexpr int64_t kMaxContext = int64_t{1} << 30;     // info --context
constexpr int64_t kMaxPageSize = 256;                 // the cache's own limit

}  // namespace

int main(int argc, char** argv) {
  using namespace mla::tools;
  const auto tokens = CLI::Range(int64_t{1}, kMaxTokens);
  const auto page_size = CLI::Range(int64_t{1}, kMaxPageSize);
  // --cache-dtype of forward, info and demo: how the latent cache stores rows (docs/mla.md, "FP8 cache").
  const auto cache_dtype = CLI::IsMember({"auto", "fp8"});
  const char* cache_dtype_help =
      "Latent cache rows: auto (the --dtype's element type) or fp8 (fp8_ds_mla: e4m3 latent with one fp32 scale per "
      "128 values, bf16 rope; 656 B a token for V3 instead of 1152; needs bf16)";
  CLI::App app{"mla: DeepSeek Multi-head Latent Attention (one layer), exactly as real checkpoints expect"};
  app.require_subcommand(1);

  ForwardArgs fwd;
  auto* f = app.add_subcommand("forward", "Run one attention layer of a checkpoint over hidden states from a file");
  f->add_option("--model", fwd.model, "Checkpoint folder (config.json + safetensors)")->required();
  f->add_option("--input", fwd.input, "safetensors with hidden_states F32 [B,T,D] and optional position_ids I64 [B,T]")->required();
  f->add_option("--output", fwd.output, "safetensors to write: output F32 [B,T,D], latent F32 [B,T,d_c+d_r]")->required();
  f->add_option("--dtype", fwd.dtype, "Compute precision")->check(CLI::IsMember({"f32", "bf16"}))->capture_default_str();
  f->add_option("--layer", fwd.layer, "Layer index")->capture_default_str();
  f->add_option("--chunk", fwd.chunk, "Feed the tokens in chunks of N (0: all at once)")->check(CLI::NonNegativeNumber);
  f->add_option("--decode-after", fwd.decode_after, "Prefill K tokens, then decode the rest one token per call");
  f->add_option("--path", fwd.path, "Attention form")->check(CLI::IsMember({"auto", "expanded", "absorbed"}))->capture_default_str();
  f->add_option("--page-size", fwd.page_size, "Cache page size (power of two, 1..256)")->check(page_size)->capture_default_str();
  f->add_option("--device", fwd.device, "Backend: cpu, cpu-reference, cuda")->capture_default_str();
  f->add_option("--cache-dtype", fwd.cache_dtype, cache_dtype_help)->check(cache_dtype)->capture_default_str();

  InfoArgs info;
  auto* i = app.add_subcommand("info", "Cache bytes, FLOPs per token and derived constants of a preset or checkpoint");
  auto* ip = i->add_option("--preset", info.preset, "v2-lite, v2, v3");
  auto* im = i->add_option("--model", info.model, "Checkpoint folder");
  ip->excludes(im);
  i->add_option("--context", info.context, "Context length for the per-token attention FLOPs and the cache bytes")
      ->check(CLI::Range(int64_t{1}, kMaxContext))
      ->capture_default_str();
  i->add_option("--cache-dtype", info.cache_dtype, cache_dtype_help)->check(cache_dtype)->capture_default_str();

  DemoArgs demo;
  auto* d = app.add_subcommand("demo", "Prefill, check chunked == one-shot, generate with the latent cache vs re-expanding it");
  d->add_option("--device", demo.device)->capture_default_str();
  d->add_option("--dtype", demo.dtype)->check(CLI::IsMember({"f32", "bf16"}))->capture_default_str();
  d->add_option("--prompt", demo.prompt, "Prompt tokens")->check(tokens)->capture_default_str();
  d->add_option("--generate", demo.generate, "Tokens to generate")->check(tokens)->capture_default_str();
  d->add_option("--chunk", demo.chunk, "Chunk size for the chunked prefill")->check(tokens)->capture_default_str();
  d->add_option("--page-size", demo.page_size)->check(page_size)->capture_default_str();
  d->add_option("--seed", demo.seed)->capture_default_str();
  d->add_option("--cache-dtype", demo.cache_dtype,
                "auto, or fp8: the demo's layer keeps an fp8 cache, and a last step generates with a bf16 cache and "
                "prints how far the outputs move")
      ->check(cache_dtype)
      ->capture_default_str();

  BenchArgs bench;
  auto* b = app.add_subcommand("bench", "Benchmark prefill and decode against this machine's GEMM and copy ceilings");
  b->add_option("--device", bench.device)->capture_default_str();
  b->add_option("--preset", bench.preset)->capture_default_str();
  b->add_option("--json", bench.json, "Also write the results to this JSON file");
  b->add_option("--prefill-tokens", bench.prefill_tokens)->check(tokens)->capture_default_str();
  b->add_option("--context", bench.context, "Decode context length")->check(tokens)->capture_default_str();
  b->add_option("--repeats", bench.repeats, "Timed repetitions (0: automatic)")->check(CLI::Range(int64_t{0}, int64_t{1000000}));
  b->add_option("--decode-layers", bench.decode_layers,
                "Layers (own weights and cache) that decode steps rotate over (0: enough to exceed 2 x L3; 1: one "
                "layer, which a large L3 may hold)")
      ->check(CLI::Range(int64_t{0}, int64_t{4096}));
  b->add_option("--tp", bench.tp, "cuda: heads split over this many GPUs (NCCL), beside one GPU in the same run")
      ->check(CLI::Range(int64_t{1}, int64_t{64}))
      ->capture_default_str();
  b->add_option("--cp", bench.cp, "cuda: decode over a cache spread over this many GPUs (NCCL), beside one GPU")
      ->check(CLI::Range(int64_t{1}, int64_t{64}))
      ->capture_default_str();
  b->add_flag("--quick", bench.quick, "Fewer repetitions");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    // Usage errors as every other error: one line, exit status 1.
    std::cerr << "mla: error: " << e.what() << " (see mla --help)\n";
    return 1;
  }
  const std::string name = app.get_subcommands().front()->get_name();
  try {
    if (name == "forward") return run_forward(fwd);
    if (name == "info") {
      if (info.preset.empty() && info.model.empty()) info.preset = "v3";
      return run_info(info);
    }
    if (name == "demo") return run_demo(demo);
    return run_bench(bench);
  } catch (const std::bad_alloc&) {
    // The library names the tensor where it can; this is the last resort, never "std::bad_alloc".
    std::cerr << "mla " << name << ": error: out of memory\n";
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    std::cerr << "mla " << name << ": error: " << e.path1().string() << ": " << e.code().message() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mla " << name << ": error: " << e.what() << "\n";
    return 1;
  }
}
