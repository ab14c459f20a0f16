// Stand-alone entry point of the CUDA benchmark for the GPU machine (scripts/gpu.sh):
//   mla-bench-cuda [--quick] [--json PATH]
// `mla bench --device cuda` runs the same function.
#include <cstdio>
#include <exception>
#include <string>

namespace mla::tools {
int bench_cuda(const std::string& json_path, bool quick);
}

int main(int argc, char** argv) {
  std::string json;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--json" && i + 1 < argc) json = argv[++i];
    else {
      std::fprintf(stderr, "usage: mla-bench-cuda [--quick] [--json PATH]\n");
      return 2;
    }
  }
  try {
    return mla::tools::bench_cuda(json, quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mla-bench-cuda: %s\n", e.what());
    return 1;
  }
}
