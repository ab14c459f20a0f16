// Stand-alone entry point of the multi-GPU benchmark for the GPU machine (scripts/gpu.sh nccl):
//   mla-bench-parallel [--ranks N] [--quick] [--json PATH]
// `mla bench --device cuda --tp N` runs the same function (bench/cuda/parallel.cpp).
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

namespace mla::tools {
int bench_parallel(int ranks, const std::string& json, bool quick);
}

int main(int argc, char** argv) {
  int ranks = 0;
  bool quick = false;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick")
      quick = true;
    else if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else if (a == "--ranks" && i + 1 < argc)
      ranks = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: mla-bench-parallel [--ranks N] [--quick] [--json PATH]\n");
      return 2;
    }
  }
  try {
    return mla::tools::bench_parallel(ranks, json, quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mla-bench-parallel: %s\n", e.what());
    return 1;
  }
}
