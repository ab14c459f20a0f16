// `mla bench`: CPU prefill and decode of one layer against ceilings measured in the same run: the GEMM
// library's own bf16 peak (prefill is GEMM-bound) and a two-core copy bandwidth (decode streams weights and cache).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "mla/mla.hpp"

#ifdef MLA_CLI_HAS_CUDA_BENCH
namespace mla::tools {
int bench_cuda(const std::string& json_path, bool quick);
}
#endif

namespace mla::tools {
namespace {

using Clock = std::chrono::steady_clock;

template <class F>
double median_seconds(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double gemm_peak_gflops(bool bf16, int reps) {
  const int64_t n = 2048;
  std::vector<float> a(n * n), b(n * n), c(n * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 7919) % 1000) / 1000.f - 0.5f, b[i] = a[(i * 31) % a.size()];
  std::vector<uint16_t> ab(n * n), bb(n * n);
  cpu::to_bf16(a.data(), ab.data(), n * n);
  cpu::to_bf16(b.data(), bb.data(), n * n);
  auto run = [&] {
    if (bf16) cpu::gemm_nt(n, n, n, ab.data(), n, bb.data(), n, c.data(), n);
    else cpu::gemm_nt(n, n, n, a.data(), n, b.data(), n, c.data(), n);
  };
  run();
  return 2.0 * n * n * n / median_seconds(reps, run) / 1e9;
}

// Bytes read + written per second by both cores copying 2 x 256 MB.
double copy_gbps(int reps) {
  const size_t bytes = size_t{256} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  auto run = [&] {
#pragma omp parallel
    {
      const size_t parts = static_cast<size_t>(omp_get_num_threads()), me = static_cast<size_t>(omp_get_thread_num());
      const size_t lo = bytes * me / parts, hi = bytes * (me + 1) / parts;
      std::memcpy(dst.data() + lo, src.data() + lo, hi - lo);
    }
  };
  run();
  return 2.0 * static_cast<double>(bytes) / median_seconds(reps, run) / 1e9;
}

// Every projection weight is read once per decode step: q (or q_a, q_b), kv_a, kv_b and o. Each weight does
// one multiply-add per token, so the parameter count is half the per-token FLOPs of projections plus absorb.
double weight_bytes(const CostModel& m, int elt) {
  return (m.projection_flops_per_token + m.absorb_flops_per_token) / 2 * elt;
}

}  // namespace

int run_bench(const BenchArgs& a) {
  if (a.device == "cuda") {
#ifdef MLA_CLI_HAS_CUDA_BENCH
    return bench_cuda(a.json, a.quick);
#else
    throw InvalidArgument("bench --device cuda: this build has no CUDA support (configure with -DMLA_WITH_CUDA=ON)");
#endif
  }
  const int reps = a.repeats > 0 ? static_cast<int>(a.repeats) : (a.quick ? 3 : 11);
  const Config c = Config::preset(a.preset);
  const CostModel m = CostModel::of(c);
  nlohmann::json j;
  j["device"] = a.device;
  j["preset"] = a.preset;
  j["threads"] = omp_get_max_threads();
  j["gemm_library"] = cpu::gemm_library_name();
  j["kernel_isa"] = cpu::kernel_isa();

  std::printf("mla bench: %s layer on %s, %d threads, GEMM: %s, kernels: %s\n", a.preset.c_str(), a.device.c_str(),
              omp_get_max_threads(), cpu::gemm_library_name().c_str(), cpu::kernel_isa().c_str());
  std::fflush(stdout);
  const double peak_bf16 = gemm_peak_gflops(true, reps), peak_f32 = gemm_peak_gflops(false, reps);
  const double copy = copy_gbps(reps);
  j["ceilings"] = {{"gemm_bf16_gflops", peak_bf16}, {"gemm_f32_gflops", peak_f32}, {"copy_gbps", copy}};
  std::printf("ceilings: GEMM 2048^3 bf16 %.0f GFLOP/s, f32 %.0f GFLOP/s; copy %.1f GB/s (read + write)\n\n", peak_bf16,
              peak_f32, copy);
  std::printf("%-34s %10s %12s %10s\n", "work", "ms", "rate", "of ceiling");

  const LayerWeights w = LayerWeights::random(c, 1);
  for (Precision prec : {Precision::BF16, Precision::F32}) {
    const std::string pn(precision_name(prec));
    const int elt = prec == Precision::F32 ? 4 : 2;
    const double peak = prec == Precision::F32 ? peak_f32 : peak_bf16;
    LayerOptions opt;
    opt.device = a.device;
    opt.precision = prec;
    Attention layer(w, opt);
    const int64_t D = c.hidden_size, T = a.prefill_tokens, L = a.context;

    // Prefill: T tokens, one call, fresh sequence each time.
    std::vector<float> x(static_cast<size_t>(std::max(T, L) * D)), out(x.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = round_bf16(static_cast<float>((i * 2654435761u) % 2001) / 1000.f - 1.f);
    LatentCache cache = layer.make_cache((std::max(T, L) + 64) / 64 + 2, 64);
    const SeqId s = cache.add_sequence();
    const SequenceChunk pre{s, T, nullptr};
    auto prefill = [&] {
      cache.truncate(s, 0);
      layer.forward({&pre, 1}, x.data(), out.data(), cache);
    };
    prefill();
    const double tp = median_seconds(reps, prefill);
    const double pf = m.prefill_flops(T);
    std::printf("%-34s %10.2f %8.0f GF/s %9.0f%%\n", ("prefill " + std::to_string(T) + " tokens, " + pn).c_str(), tp * 1e3,
                pf / tp / 1e9, 100 * pf / tp / 1e9 / peak);
    j["rows"].push_back({{"work", "prefill"}, {"dtype", pn}, {"tokens", T}, {"ms", tp * 1e3}, {"gflops", pf / tp / 1e9},
                         {"fraction_of_gemm_peak", pf / tp / 1e9 / peak}});

    // Decode: context L-1 cached, one new token; the sequence is truncated back after every step.
    cache.truncate(s, 0);
    const SequenceChunk ctx{s, L - 1, nullptr};
    layer.forward({&ctx, 1}, x.data(), out.data(), cache);
    for (Path path : {Path::Absorbed, Path::Expanded}) {
      LayerOptions o2 = opt;
      o2.path = path;
      Attention dl(w, o2);
      const SequenceChunk step{s, 1, nullptr};
      auto decode = [&] {
        dl.forward({&step, 1}, x.data(), out.data(), cache);
        cache.truncate(s, L - 1);
      };
      decode();
      const double td = median_seconds(reps * (path == Path::Absorbed ? 5 : 1), decode);
      const double bytes = weight_bytes(m, elt) + static_cast<double>(L * c.latent_dim() * elt);
      const std::string label = std::string("decode ctx ") + std::to_string(L) + ", " +
                                (path == Path::Absorbed ? "latent" : "re-expand") + ", " + pn;
      std::printf("%-34s %10.3f %8.1f GB/s %9.0f%%\n", label.c_str(), td * 1e3, bytes / td / 1e9, 100 * bytes / td / 1e9 / copy);
      j["rows"].push_back({{"work", path == Path::Absorbed ? "decode_latent" : "decode_reexpand"}, {"dtype", pn},
                           {"context", L}, {"ms", td * 1e3}, {"gbps", bytes / td / 1e9},
                           {"fraction_of_copy_bandwidth", bytes / td / 1e9 / copy}});
    }
  }
  if (!a.json.empty()) {  // written whole or not at all
    const std::string tmp = a.json + ".tmp";
    {
      std::ofstream f(tmp);
      f << j.dump(2) << "\n";
      if (!f.flush()) throw Error("bench: cannot write " + tmp);
    }
    std::filesystem::rename(tmp, a.json);
  }
  return 0;
}

}  // namespace mla::tools
