// The subcommands of the `mla` program. Each returns the process exit code; errors reach main() as exceptions.
#pragma once

#include <cstdint>
#include <string>

#include "mla/attention.hpp"

namespace mla::tools {

struct ForwardArgs {
  std::string model, input, output;
  std::string dtype = "f32", path = "auto", device = "cpu", cache_dtype = "auto";
  int64_t layer = 0, chunk = 0, decode_after = -1, page_size = 64;
};

struct InfoArgs {
  std::string preset, model, cache_dtype = "auto";
  int64_t context = 4096;
};

struct DemoArgs {
  std::string device = "cpu", dtype = "bf16", cache_dtype = "auto";
  int64_t prompt = 1024, generate = 64, chunk = 128, page_size = 64;
  uint64_t seed = 1;
};

struct BenchArgs {
  std::string device = "cpu", json;
  std::string preset = "v2-lite";
  bool quick = false;
  int64_t prefill_tokens = 1024, context = 4096, repeats = 0;
  int64_t decode_layers = 0;  // 0: enough that weights and caches exceed 2 x L3
  int64_t tp = 1, cp = 1;     // > 1 (cuda): the multi-GPU benchmark over that many GPUs (bench/cuda/parallel.cpp)
};

int run_forward(const ForwardArgs& args);
int run_info(const InfoArgs& args);
int run_demo(const DemoArgs& args);
int run_bench(const BenchArgs& args);

// The CPU kernel variant in use and why it matters, e.g. "avx512 (no AVX512-BF16: ...)" (bench.cpp).
std::string isa_summary();
// The rate of one n x n x n GEMM through the CPU backend's GEMM (bf16 or f32 operands), median of reps.
double gemm_rate_gflops(bool bf16, int64_t n, int reps);

// Parsing helpers shared by the subcommands; throw mla::InvalidArgument naming the flag.
Precision parse_precision(const std::string& s);
Path parse_path(const std::string& s);
// "auto" or "fp8" (--cache-dtype); fp8 with a non-bf16 --dtype throws naming both options.
CacheDtype parse_cache_dtype(const std::string& s, Precision precision);

}  // namespace mla::tools
