// `mla bench`: CPU prefill and decode of one layer against ceilings measured in the same run: the best GEMM rate
// of any precision (prefill is GEMM-bound; on a CPU without native bf16 the f32 GEMM is the best path the CPU has)
// and the memory bandwidth of both cores, copying and reading (decode streams weights and cache).
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
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
#ifdef MLA_CLI_HAS_PARALLEL_BENCH
namespace mla::tools {
int bench_parallel(int ranks, const std::string& json, bool quick);
}
#endif

namespace mla::tools {

using Clock = std::chrono::steady_clock;

template <class F>
double best_seconds(int reps, F&& f) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

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

double gemm_rate_gflops(bool bf16, int64_t n, int reps) {
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
  return 2.0 * n * n * n / best_seconds(reps, run) / 1e9;
}

std::string isa_summary() {
  const std::string isa = cpu::kernel_isa();
  if (cpu::native_bf16()) return isa + " (native bf16 dot products)";
  return isa + " (no AVX512-BF16: bf16 weights and cache widened to f32 in the kernels)";
}

namespace {

constexpr size_t kStreamBytes = size_t{256} << 20;  // far beyond any L3 here

// Ceilings are the best of their repetitions (what the machine can do); the work is timed by its median.

// Bytes read + written per second by both cores copying 256 MB.
double copy_gbps(int reps) {
  std::vector<char> src(kStreamBytes, 1), dst(kStreamBytes, 0);
  auto run = [&] {
#pragma omp parallel
    {
      const size_t parts = static_cast<size_t>(omp_get_num_threads()), me = static_cast<size_t>(omp_get_thread_num());
      const size_t lo = kStreamBytes * me / parts, hi = kStreamBytes * (me + 1) / parts;
      std::memcpy(dst.data() + lo, src.data() + lo, hi - lo);
    }
  };
  run();
  return 2.0 * static_cast<double>(kStreamBytes) / best_seconds(reps, run) / 1e9;
}

// Bytes read per second by both cores summing 256 MB (decode only reads). Each thread reads eight interleaved
// streams of its half, as a GEMV does (one stream per thread reaches only about two thirds of this).
double read_gbps(int reps) {
  constexpr size_t kStreams = 8;
  std::vector<uint64_t> src(kStreamBytes / 8);
  for (size_t i = 0; i < src.size(); ++i) src[i] = i * 0x9e3779b97f4a7c15ull;
  uint64_t sink = 0;
  auto run = [&] {
    uint64_t total = 0;
#pragma omp parallel reduction(^ : total)
    {
      const size_t parts = static_cast<size_t>(omp_get_num_threads()), me = static_cast<size_t>(omp_get_thread_num());
      const uint64_t* p = src.data() + src.size() * me / parts;
      const size_t per = src.size() / parts / kStreams;
      uint64_t x[kStreams] = {};
      for (size_t i = 0; i + 4 <= per; i += 4)
        for (size_t k = 0; k < kStreams; ++k) {
          const uint64_t* q = p + k * per + i;
          x[k] ^= q[0] ^ q[1] ^ q[2] ^ q[3];
        }
      for (uint64_t v : x) total ^= v;
    }
    sink ^= total;
  };
  run();
  const double t = best_seconds(reps, run);
  if (sink == 42) std::printf(" ");  // keeps the sum alive
  return static_cast<double>(kStreamBytes) / t / 1e9;
}

size_t l3_bytes() {
  const long l3 = ::sysconf(_SC_LEVEL3_CACHE_SIZE);
  return l3 > 0 ? static_cast<size_t>(l3) : size_t{64} << 20;
}

// Every projection weight is read once per decode step: q (or q_a, q_b), kv_a, kv_b and o. Each weight does
// one multiply-add per token, so the parameter count is half the per-token FLOPs of projections plus absorb.
double weight_bytes(const CostModel& m, int elt) {
  return (m.projection_flops_per_token + m.absorb_flops_per_token) / 2 * elt;
}

}  // namespace

int run_bench(const BenchArgs& a) {
  if (a.tp > 1 || a.cp > 1) {
    if (a.device != "cuda") throw InvalidArgument("bench --tp / --cp: multi-GPU runs need --device cuda");
    // One rank count for both tables: a TP x CP grid of communicators is not built (docs/parallel.md).
    if (a.tp > 1 && a.cp > 1 && a.tp != a.cp)
      throw InvalidArgument("bench --tp " + std::to_string(a.tp) + " --cp " + std::to_string(a.cp) +
                            ": TP and CP are measured over the same GPUs; give one count");
#ifdef MLA_CLI_HAS_PARALLEL_BENCH
    return bench_parallel(static_cast<int>(std::max(a.tp, a.cp)), a.json, a.quick);
#else
    throw InvalidArgument("bench --tp / --cp: this build has no CUDA support (configure with -DMLA_WITH_CUDA=ON)");
#endif
  }
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
  j["native_bf16"] = cpu::native_bf16();

  std::printf("mla bench: %s layer on %s, %d threads\n  kernels: %s\n  GEMM: %s\n", a.preset.c_str(),
              a.device.c_str(), omp_get_max_threads(), isa_summary().c_str(), cpu::gemm_library_name().c_str());
  std::fflush(stdout);

  // The ceilings are measured before and after the work and the higher reading kept: a shared machine can slow
  // one measurement down, and a ceiling read low would make the work look better than it is.
  struct Ceilings {
    double gemm_bf16, gemm_f32, copy, read;
  };
  auto measure_ceilings = [&] {
    return Ceilings{gemm_rate_gflops(true, 2048, reps), gemm_rate_gflops(false, 2048, reps), copy_gbps(reps),
                    read_gbps(reps)};
  };
  const Ceilings before = measure_ceilings();

  struct Row {
    std::string work, dtype, label;
    int64_t size;  // tokens (prefill) or context (decode)
    double ms, flops, bytes;
    int layers;
  };
  std::vector<Row> rows;
  // The FP8 cache beside the bf16 one, same shape and run: the absorbed decode step of the bf16 layer, and its
  // attention alone (decode_attention over the same caches, the step's q̂ rows), with each cache dtype.
  struct Fp8Rows {
    double step_bf16 = 0, step_fp8 = 0, attn_bf16 = 0, attn_fp8 = 0;
    double bytes_bf16 = 0, bytes_fp8 = 0;
    int layers = 0;
  } fp8;
  const size_t l3 = l3_bytes();
  const LayerWeights w = LayerWeights::random(c, 1);
  for (Precision prec : {Precision::BF16, Precision::F32}) {
    const std::string pn(precision_name(prec));
    const int elt = prec == Precision::F32 ? 4 : 2;
    LayerOptions opt;
    opt.device = a.device;
    opt.precision = prec;
    Attention layer(w, opt);
    const int64_t D = c.hidden_size, T = a.prefill_tokens, L = a.context;

    // Prefill: T tokens, one call, fresh sequence each time.
    std::vector<float> x(static_cast<size_t>(std::max(T, L) * D)), out(x.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = round_bf16(static_cast<float>((i * 2654435761u) % 2001) / 1000.f - 1.f);
    const int64_t pages = (std::max(T, L) + 64) / 64 + 2;
    LatentCache cache = layer.make_cache(pages, 64);
    const SeqId s = cache.add_sequence();
    const SequenceChunk pre{s, T, nullptr};
    auto prefill = [&] {
      cache.truncate(s, 0);
      layer.forward({&pre, 1}, x.data(), out.data(), cache);
    };
    prefill();
    const double tp = median_seconds(reps, prefill);
    rows.push_back({"prefill", pn, "prefill " + std::to_string(T) + " tokens, " + pn, T, tp * 1e3,
                    m.prefill_flops(T), 0, 0});

    // Decode: context L-1 cached, one new token; each sequence is truncated back after its step. The context is
    // prefilled once and copied into every layer's cache (same page order, so the same block table). Steps
    // rotate over enough layers (own weights, own cache) that their bytes exceed twice the L3: one layer alone
    // could sit in a large L3 across steps, which a model of many layers never does.
    cache.truncate(s, 0);
    const SequenceChunk ctx{s, L - 1, nullptr};
    layer.forward({&ctx, 1}, x.data(), out.data(), cache);
    const double bytes = weight_bytes(m, elt) + static_cast<double>(L * c.latent_dim() * elt);
    const int layers = a.decode_layers > 0
                           ? static_cast<int>(a.decode_layers)
                           : static_cast<int>(std::max<double>(2, std::ceil(2.0 * static_cast<double>(l3) / bytes)));
    for (Path path : {Path::Absorbed, Path::Expanded}) {
      LayerOptions o2 = opt;
      o2.path = path;
      std::vector<std::unique_ptr<Attention>> dl;
      std::vector<LatentCache> caches;
      for (int r = 0; r < layers; ++r) {
        dl.push_back(std::make_unique<Attention>(w, o2));
        caches.push_back(dl.back()->make_cache(pages, 64));
        const SeqId sr = caches.back().add_sequence();
        const int64_t extra = L - 1;
        caches.back().reserve({&sr, 1}, {&extra, 1});
        std::memcpy(caches.back().storage(), cache.storage(), static_cast<size_t>(pages * cache.page_bytes()));
        caches.back().commit(sr, L - 1);
      }
      int next = 0;
      const SequenceChunk step{s, 1, nullptr};  // every cache's first sequence has the same id
      auto decode = [&] {
        const int r = next++ % layers;
        dl[r]->forward({&step, 1}, x.data(), out.data(), caches[r]);
        caches[r].truncate(s, L - 1);
      };
      for (int r = 0; r < layers; ++r) decode();
      const double td = median_seconds(reps * (path == Path::Absorbed ? 5 : 1) * layers, decode);
      const bool latent = path == Path::Absorbed;
      rows.push_back({latent ? "decode_latent" : "decode_reexpand", pn,
                      std::string("decode ctx ") + std::to_string(L) + ", " + (latent ? "latent" : "re-expand") +
                          ", " + pn,
                      L, td * 1e3, 0, bytes, layers});
      if (prec != Precision::BF16 || !latent) continue;

      // The same step with an FP8 cache: each layer's cache holds the bf16 cache's rows quantised with store_row
      // (the rows the fp8 layer would write differ only in being quantised from f32 instead of bf16 values).
      LayerOptions o8 = o2;
      o8.cache_dtype = CacheDtype::FP8;
      std::vector<std::unique_ptr<Attention>> dl8;
      std::vector<LatentCache> caches8;
      const std::vector<float> ctx_rows = cache.read_rows(s, 0, L - 1);
      for (int r = 0; r < layers; ++r) {
        dl8.push_back(std::make_unique<Attention>(w, o8));
        caches8.push_back(dl8.back()->make_cache(pages, 64));
        LatentCache& c8 = caches8.back();
        const SeqId sr = c8.add_sequence();
        const int64_t extra = L - 1;
        c8.reserve({&sr, 1}, {&extra, 1});
        const RowLayout lay = c8.row_layout();
        for (int64_t t = 0; t < L - 1; ++t)
          store_row(
              lay, &ctx_rows[static_cast<size_t>(t * c.latent_dim())],
              static_cast<std::byte*>(c8.storage()) + (c8.block_table(sr)[t / 64] * 64 + t % 64) * c8.row_bytes());
        c8.commit(sr, L - 1);
      }
      auto decode8 = [&] {
        const int r = next++ % layers;
        dl8[r]->forward({&step, 1}, x.data(), out.data(), caches8[r]);
        caches8[r].truncate(s, L - 1);
      };
      for (int r = 0; r < layers; ++r) decode8();
      // Interleaved halves, so that a slower spell of the shared machine hits both.
      const int n8 = reps * 5 * layers;
      const double a1 = median_seconds(n8 / 2, decode), b1 = median_seconds(n8 / 2, decode8);
      const double a2 = median_seconds(n8 / 2, decode), b2 = median_seconds(n8 / 2, decode8);
      fp8.step_bf16 = std::min(a1, a2), fp8.step_fp8 = std::min(b1, b2), fp8.layers = layers;
      fp8.bytes_bf16 = bytes;
      fp8.bytes_fp8 = weight_bytes(m, elt) + static_cast<double>((L - 1) * caches8[0].row_bytes());

      // Attention alone: the absorbed MQA of one decode step (h_q = heads, s_q = 1, 576/512) as decode_attention
      // over each layer's cache in turn, bf16 and fp8.
      const int64_t Wd = c.latent_dim(), H = c.num_heads;
      std::vector<uint16_t> qb(static_cast<size_t>(H * Wd)), ob(static_cast<size_t>(H * c.kv_lora_rank));
      const std::vector<float> qf = [&] {
        std::vector<float> v(static_cast<size_t>(H * Wd));
        for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i * 2654435761u) % 2001) / 1000.f - 1.f;
        return v;
      }();
      for (size_t i = 0; i < qf.size(); ++i) qb[i] = float_to_bf16(qf[i]);
      const int32_t len = static_cast<int32_t>(L - 1);
      auto op = [&](bool use_fp8) {
        const int r = next++ % layers;
        const LatentCache& cc = use_fp8 ? caches8[r] : caches[r];
        const auto table = cc.block_table(s);
        DecodeParams p;
        p.batch = 1, p.s_q = 1, p.h_q = H, p.head_dim = Wd, p.head_dim_v = c.kv_lora_rank, p.page_size = 64;
        p.num_pages = pages, p.max_pages = static_cast<int64_t>(table.size()), p.dtype = DType::BF16;
        p.fp8_kv_cache = use_fp8, p.q = qb.data(), p.kv_cache = cc.storage(), p.block_table = table.data();
        p.cache_seqlens = &len, p.softmax_scale = 0.07f, p.out = ob.data();
        decode_attention(a.device, p);
      };
      auto op16 = [&] { op(false); };
      auto op8 = [&] { op(true); };
      for (int r = 0; r < layers; ++r) op16(), op8();
      const double c1 = median_seconds(n8 / 2, op16), d1 = median_seconds(n8 / 2, op8);
      const double c2 = median_seconds(n8 / 2, op16), d2 = median_seconds(n8 / 2, op8);
      fp8.attn_bf16 = std::min(c1, c2), fp8.attn_fp8 = std::min(d1, d2);
    }
  }

  const Ceilings after = measure_ceilings();
  const double peak_bf16 = std::max(before.gemm_bf16, after.gemm_bf16);
  const double peak_f32 = std::max(before.gemm_f32, after.gemm_f32);
  const double peak = std::max(peak_bf16, peak_f32), copy = std::max(before.copy, after.copy);
  const double read = std::max(before.read, after.read);
  const char* peak_name = peak_bf16 >= peak_f32 ? "bf16" : "f32";
  j["ceilings"] = {{"gemm_bf16_gflops", peak_bf16}, {"gemm_f32_gflops", peak_f32}, {"gemm_best_gflops", peak},
                   {"gemm_best", peak_name},        {"copy_gbps", copy},           {"read_gbps", read}};
  j["ceiling_samples"] = {
      {"before", {{"gemm_bf16_gflops", before.gemm_bf16}, {"gemm_f32_gflops", before.gemm_f32},
                  {"copy_gbps", before.copy}, {"read_gbps", before.read}}},
      {"after", {{"gemm_bf16_gflops", after.gemm_bf16}, {"gemm_f32_gflops", after.gemm_f32},
                 {"copy_gbps", after.copy}, {"read_gbps", after.read}}}};
  std::printf("ceilings (best of before and after the work): GEMM 2048^3 bf16 %.0f GFLOP/s, f32 %.0f GFLOP/s "
              "(best: %s); memory, 2 x 256 MB: copy %.1f GB/s (read + write), read %.1f GB/s\n",
              peak_bf16, peak_f32, peak_name, copy, read);
  std::printf("  before: GEMM bf16 %.0f, f32 %.0f; copy %.1f, read %.1f   after: GEMM bf16 %.0f, f32 %.0f; copy %.1f, "
              "read %.1f\n",
              before.gemm_bf16, before.gemm_f32, before.copy, before.read, after.gemm_bf16, after.gemm_f32, after.copy,
              after.read);
  if (a.decode_layers > 0)
    std::printf("decode: one step per layer in turn over %lld layers (--decode-layers; L3 %.1f MB)\n\n",
                static_cast<long long>(a.decode_layers), static_cast<double>(l3) / 1e6);
  else
    std::printf("decode: one step per layer in turn over layers whose weights and cache exceed 2 x L3 (%.1f MB)\n\n",
                static_cast<double>(l3) / 1e6);
  std::printf("%-34s %10s %12s   %s\n", "work", "ms", "rate", "of ceiling");
  for (const Row& r : rows) {
    const double sec = r.ms / 1e3;
    if (r.work == "prefill") {
      const double gf = r.flops / sec / 1e9;
      std::printf("%-34s %10.2f %7.0f GF/s   %.0f%% of the best GEMM (%s)\n", r.label.c_str(), r.ms, gf,
                  100 * gf / peak, peak_name);
      j["rows"].push_back({{"work", r.work}, {"dtype", r.dtype}, {"tokens", r.size}, {"ms", r.ms}, {"gflops", gf},
                           {"fraction_of_gemm_peak", gf / peak}});
    } else {
      const double gb = r.bytes / sec / 1e9;
      std::printf("%-34s %10.3f %7.1f GB/s   %.0f%% of copy, %.0f%% of read (%d layers in turn)\n", r.label.c_str(),
                  r.ms, gb, 100 * gb / copy, 100 * gb / read, r.layers);
      j["rows"].push_back({{"work", r.work},
                           {"dtype", r.dtype},
                           {"context", r.size},
                           {"ms", r.ms},
                           {"gbps", gb},
                           {"bytes", r.bytes},
                           {"layers_in_turn", r.layers},
                           {"fraction_of_copy_bandwidth", gb / copy},
                           {"fraction_of_read_bandwidth", gb / read}});
    }
  }
  if (fp8.layers > 0) {
    const int64_t L = a.context;
    std::printf(
        "\nFP8 cache (fp8_ds_mla, %lld B a token) against the bf16 cache (%lld B), decode ctx %lld, bf16 layer, "
        "absorbed, %d layers in turn (best of two interleaved medians each):\n",
        static_cast<long long>(
            RowLayout{.dtype = DType::F8_E4M3, .latent = c.kv_lora_rank, .rope = c.qk_rope_head_dim}.bytes()),
        static_cast<long long>(c.latent_dim() * 2), static_cast<long long>(L), fp8.layers);
    std::printf("  %-32s %10.3f ms  bf16 cache   %10.3f ms  fp8 cache   %.2fx\n", "decode step (whole layer)",
                fp8.step_bf16 * 1e3, fp8.step_fp8 * 1e3, fp8.step_bf16 / fp8.step_fp8);
    std::printf("  %-32s %10.3f ms  bf16 cache   %10.3f ms  fp8 cache   %.2fx\n", "attention alone (decode op)",
                fp8.attn_bf16 * 1e3, fp8.attn_fp8 * 1e3, fp8.attn_bf16 / fp8.attn_fp8);
    std::printf("  bytes a step: %.1f MB (bf16 cache) and %.1f MB (fp8), of which weights %.1f MB\n",
                fp8.bytes_bf16 / 1e6, fp8.bytes_fp8 / 1e6, weight_bytes(m, 2) / 1e6);
    j["fp8_cache"] = {{"context", L},
                      {"layers_in_turn", fp8.layers},
                      {"step_ms_bf16_cache", fp8.step_bf16 * 1e3},
                      {"step_ms_fp8_cache", fp8.step_fp8 * 1e3},
                      {"step_speedup", fp8.step_bf16 / fp8.step_fp8},
                      {"attention_ms_bf16_cache", fp8.attn_bf16 * 1e3},
                      {"attention_ms_fp8_cache", fp8.attn_fp8 * 1e3},
                      {"attention_speedup", fp8.attn_bf16 / fp8.attn_fp8},
                      {"step_bytes_bf16_cache", fp8.bytes_bf16},
                      {"step_bytes_fp8_cache", fp8.bytes_fp8}};
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
