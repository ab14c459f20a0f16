// `mla bench --device cuda`: (a) the decode-kernel table of shared/PERFORMANCE.md through mla::decode_attention,
// (b) one V3 attention layer (prefill and decode steps), (c) the expanded prefill kernel alone. CUDA events,
// median of timed calls after warm-up, input sets rotated so that they exceed the L2, outputs poisoned with NaN
// before the calls and checked to be fully written after.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mla/mla.hpp"
#include "mla/ops.hpp"
#include "cuda/sm90/launch.hpp"

namespace mla::tools {
namespace {

#define BENCH_CHECK(call)                                                                           \
  do {                                                                                              \
    const cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess) throw Error(std::string("bench: ") + #call + ": " + cudaGetErrorString(e_)); \
  } while (0)

__global__ void fill_random_bf16(__nv_bfloat16* x, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t s = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
    s ^= s >> 31, s *= 0xbf58476d1ce4e5b9ull, s ^= s >> 29;
    x[i] = __float2bfloat16(scale * (static_cast<float>(s >> 40) / 8388608.0f - 1.0f));
  }
}

__global__ void count_nan_bf16(const __nv_bfloat16* x, int64_t n, unsigned long long* count) {
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    c += __hisnan(x[i]) ? 1 : 0;
  if (c) atomicAdd(count, c);
}

struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { BENCH_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  template <class T> T* as() const { return static_cast<T*>(p); }
};

void random_bf16(void* p, int64_t n, uint64_t seed, float scale = 1.f) {
  fill_random_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), n, seed, scale);
  BENCH_CHECK(cudaGetLastError());
}

int64_t nan_count(const void* p, int64_t n) {
  Dev c(8);
  BENCH_CHECK(cudaMemset(c.p, 0, 8));
  count_nan_bf16<<<1024, 256>>>(static_cast<const __nv_bfloat16*>(p), n, c.as<unsigned long long>());
  unsigned long long h = 0;
  BENCH_CHECK(cudaMemcpy(&h, c.p, 8, cudaMemcpyDeviceToHost));
  return static_cast<int64_t>(h);
}

// Median milliseconds of `reps` timed calls of each variant fn(i) after `warm` untimed ones. Variants are timed
// in alternation (a, b, a, b, ...): timed one block after the other, the second came out 3-25% slower on long
// decode rows although it did less work (clock drift under sustained load).
template <class... F>
std::array<double, sizeof...(F)> medians_ms(int warm, int reps, F&&... fns) {
  constexpr size_t n = sizeof...(F);
  for (int i = 0; i < warm; ++i) (fns(i), ...);
  std::vector<cudaEvent_t> ev(static_cast<size_t>(reps) * (n + 1));
  for (auto& e : ev) BENCH_CHECK(cudaEventCreate(&e));
  auto record = [](cudaEvent_t e) { BENCH_CHECK(cudaEventRecord(e)); };
  for (int i = 0; i < reps; ++i) {
    size_t k = static_cast<size_t>(i) * (n + 1);
    record(ev[k]);
    ((fns(warm + i), record(ev[++k])), ...);
  }
  BENCH_CHECK(cudaEventSynchronize(ev.back()));
  std::array<double, n> medians{};
  for (size_t v = 0; v < n; ++v) {
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
      const size_t k = static_cast<size_t>(i) * (n + 1) + v;
      float t = 0;
      BENCH_CHECK(cudaEventElapsedTime(&t, ev[k], ev[k + 1]));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    medians[v] = ms[ms.size() / 2];
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return medians;
}

template <class F>
double median_ms(int warm, int reps, F&& fn) {
  return medians_ms(warm, reps, std::forward<F>(fn))[0];
}

// MLA_BENCH_ONLY (a profiling aid): only the rows of every table whose name contains it.
bool selected(const std::string& name) {
  const char* only = std::getenv("MLA_BENCH_ONLY");
  return !only || name.find(only) != std::string::npos;
}

struct DecodeRow {
  std::string name;
  int64_t s_q, h_q;
  std::vector<int32_t> lengths;
};

std::vector<DecodeRow> decode_rows(bool quick) {
  auto fixed = [](int64_t b, int64_t s_q, int64_t s_k, int64_t h) {
    return DecodeRow{"b" + std::to_string(b) + " s_q" + std::to_string(s_q) + " s_k" + std::to_string(s_k) + " h" +
                         std::to_string(h),
                     s_q, h, std::vector<int32_t>(static_cast<size_t>(b), static_cast<int32_t>(s_k))};
  };
  std::vector<DecodeRow> rows{fixed(128, 1, 4096, 128),  fixed(128, 1, 8192, 128), fixed(128, 1, 16384, 128),
                              fixed(128, 1, 32768, 128), fixed(128, 2, 8192, 128), fixed(128, 1, 8192, 16),
                              fixed(128, 1, 32768, 16),  fixed(64, 1, 8192, 64),   fixed(1, 1, 65536, 128),
                              fixed(8, 1, 4096, 16)};
  if (quick) rows = {rows[0], rows[5], rows[8], rows[9]};
  std::vector<int32_t> imb{65536};
  imb.insert(imb.end(), 63, 1024);
  rows.push_back({"imbalanced 65536+63x1024", 1, 128, imb});
  if (!quick) {
    std::vector<int32_t> pairs;
    for (int i = 0; i < 32; ++i) pairs.push_back(256), pairs.push_back(16384);
    rows.push_back({"imbalanced 32x(256,16384)", 1, 16, pairs});
    rows.push_back({"long 2x131072", 1, 128, std::vector<int32_t>(2, 131072)});
    rows.push_back({"moderate 32x4096", 1, 128, std::vector<int32_t>(32, 4096)});
    rows.push_back({"long 4x32768", 1, 16, std::vector<int32_t>(4, 32768)});
  }
  return rows;
}

nlohmann::json bench_decode(bool quick) {
  nlohmann::json out = nlohmann::json::array();
  std::printf("\n(a) decode kernel: absorbed, bf16, page 64, 576/512, causal, permuted block tables\n");
  const bool sm90 = cuda::sm90::usable();
  std::printf("64-row blocks run the %s kernel; 'sm80 ms' forces the portable mma.sync kernel\n",
              sm90 ? "sm90 wgmma" : "sm80 mma.sync");
  std::printf("ms: split + combine kernels with the work list computed once (split_decode_attention), as FlashMLA's\n"
              "benchmark times flash_mla_with_kvcache after one get_mla_metadata; call ms: the whole convenience call\n");
  std::printf("'pad64 ms' (h_q·s_q <= 16): forced to the sm90 kernel on 64-row blocks (MLA_CUDA_DECODE_SM90_SMALL=1;\n"
              "the default takes it from 64 sequences up)\n");
  std::printf("%-28s %9s %9s %9s %9s %9s %9s\n", "case", "ms", "TFLOP/s", "GB/s", "call ms", "sm80 ms", "pad64 ms");
  constexpr int64_t kPage = 64, kD = 576, kDV = 512;
  for (const DecodeRow& r : decode_rows(quick)) {
    if (!selected(r.name)) continue;
    const auto b = static_cast<int64_t>(r.lengths.size());
    int64_t max_pages = 0, total_keys = 0;
    for (int32_t L : r.lengths) max_pages = std::max<int64_t>(max_pages, (L + kPage - 1) / kPage), total_keys += L;
    const int64_t pages = b * max_pages;
    const double set_bytes = static_cast<double>(pages * kPage * kD * 2);
    const int sets = static_cast<int>(std::clamp(std::ceil(240e6 / set_bytes), 1.0, 8.0));
    const int64_t q_n = b * r.s_q * r.h_q * kD, o_n = b * r.s_q * r.h_q * kDV;
    std::vector<std::unique_ptr<Dev>> kv, q, o, lse;
    std::mt19937 rng(42);
    std::vector<int32_t> perm(static_cast<size_t>(pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    Dev table(perm.size() * 4), seqlens(r.lengths.size() * 4);
    BENCH_CHECK(cudaMemcpy(table.p, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaMemcpy(seqlens.p, r.lengths.data(), r.lengths.size() * 4, cudaMemcpyHostToDevice));
    for (int s = 0; s < sets; ++s) {
      kv.push_back(std::make_unique<Dev>(static_cast<size_t>(pages * kPage * kD * 2)));
      q.push_back(std::make_unique<Dev>(static_cast<size_t>(q_n * 2)));
      o.push_back(std::make_unique<Dev>(static_cast<size_t>(o_n * 2)));
      lse.push_back(std::make_unique<Dev>(static_cast<size_t>(b * r.s_q * r.h_q * 4)));
      random_bf16(kv.back()->p, pages * kPage * kD, 100 + s);
      random_bf16(q.back()->p, q_n, 200 + s);
      BENCH_CHECK(cudaMemset(o.back()->p, 0xff, static_cast<size_t>(o_n * 2)));  // NaN poison
    }
    DecodeParams p;
    p.batch = b, p.s_q = r.s_q, p.h_q = r.h_q, p.head_dim = kD, p.head_dim_v = kDV, p.page_size = kPage;
    p.num_pages = pages, p.max_pages = max_pages, p.dtype = DType::BF16;
    p.block_table = table.as<int32_t>(), p.cache_seqlens = seqlens.as<int32_t>();
    p.softmax_scale = 0.1352337789f, p.causal = true;
    auto call = [&](int i) {
      const int s = i % sets;
      p.q = q[s]->p, p.kv_cache = kv[s]->p, p.out = o[s]->p, p.lse = lse[s]->as<float>();
      decode_attention("cuda", p);
    };
    call(0);
    BENCH_CHECK(cudaDeviceSynchronize());
    int64_t unwritten = 0;
    for (int s = 0; s < sets; ++s) {
      call(s);
      BENCH_CHECK(cudaDeviceSynchronize());
      unwritten += nan_count(o[s]->p, o_n);
    }
    // The planned run with its work list computed once for these lengths (what an engine does once per step),
    // timed in alternation with the whole convenience call.
    const DecodeSchedule plan = plan_decode_attention("cuda", p);
    Dev workspace(static_cast<size_t>(plan.workspace_bytes));
    split_decode_attention("cuda", p, plan, workspace.p);
    auto reused = [&](int i) {
      const int s = i % sets;
      p.q = q[s]->p, p.kv_cache = kv[s]->p, p.out = o[s]->p, p.lse = lse[s]->as<float>();
      decode_attention("cuda", p, plan, workspace.p, nullptr, true);
    };
    const auto [ms, call_ms] = medians_ms(3, quick ? 10 : 30, reused, call);
    double ms_sm80 = call_ms;
    if (sm90) {
      setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
      ms_sm80 = median_ms(3, quick ? 10 : 30, call);
      unsetenv("MLA_CUDA_DISABLE_SM90");
    }
    double ms_pad64 = 0;
    if (sm90 && r.s_q * r.h_q <= 16) {
      setenv("MLA_CUDA_DECODE_SM90_SMALL", "1", 1);
      ms_pad64 = median_ms(3, quick ? 10 : 30, call);
      unsetenv("MLA_CUDA_DECODE_SM90_SMALL");
    }
    const double flops = 2.0 * r.h_q * r.s_q * static_cast<double>(total_keys) * (kD + kDV);
    const double bytes = 2.0 * (static_cast<double>(total_keys) * kD + static_cast<double>(b * r.s_q * r.h_q) * (kD + kDV));
    const double tflops = flops / ms / 1e9, gbs = bytes / ms / 1e6;
    std::printf("%-28s %9.3f %9.1f %9.0f %9.3f %9.3f %9.3f%s\n", r.name.c_str(), ms, tflops, gbs, call_ms, ms_sm80,
                ms_pad64, unwritten ? "  UNWRITTEN OUTPUT" : "");
    out.push_back({{"case", r.name}, {"batch", b}, {"s_q", r.s_q}, {"h_q", r.h_q}, {"total_keys", total_keys},
                   {"ms", ms}, {"call_ms", call_ms}, {"tflops", tflops}, {"gbps", gbs}, {"sm80_ms", ms_sm80},
                   {"pad64_ms", ms_pad64}, {"input_sets", sets}, {"unwritten_outputs", unwritten}});
  }
  return out;
}

nlohmann::json bench_prefill_kernel(bool quick) {
  nlohmann::json out = nlohmann::json::array();
  std::printf("\n(c) expanded prefill kernel alone: bf16, q.k 192, v 128, causal (%s kernel; 'sm80 ms' = portable)\n",
              cuda::sm90::usable() ? "sm90 wgmma" : "sm80 mma.sync");
  const bool sm90 = cuda::sm90::usable();
  std::printf("%-24s %9s %9s %9s\n", "case", "ms", "TFLOP/s", "sm80 ms");
  struct Row { int64_t b, H, T; };
  std::vector<Row> rows{{1, 128, 4096}, {1, 128, 16384}, {4, 16, 8192}, {1, 16, 32768}, {8, 128, 1024}};
  if (quick) rows.resize(1);
  for (const Row& r : rows) {
    const std::string name = "b" + std::to_string(r.b) + " H" + std::to_string(r.H) + " T" + std::to_string(r.T);
    if (!selected(name)) continue;
    const int64_t tq = r.b * r.T;
    Dev q(static_cast<size_t>(tq * r.H * 192 * 2)), k(static_cast<size_t>(tq * r.H * 192 * 2)),
        v(static_cast<size_t>(tq * r.H * 128 * 2)), o(static_cast<size_t>(tq * r.H * 128 * 2));
    random_bf16(q.p, tq * r.H * 192, 1), random_bf16(k.p, tq * r.H * 192, 2), random_bf16(v.p, tq * r.H * 128, 3);
    BENCH_CHECK(cudaMemset(o.p, 0xff, static_cast<size_t>(tq * r.H * 128 * 2)));
    std::vector<int32_t> cu;
    for (int64_t i = 0; i <= r.b; ++i) cu.push_back(static_cast<int32_t>(i * r.T));
    PrefillParams p;
    p.batch = r.b, p.num_heads = r.H, p.total_q = tq, p.total_k = tq, p.dtype = DType::BF16;
    p.cu_seqlens_q = cu.data(), p.cu_seqlens_k = cu.data();
    p.q = q.p, p.k = k.p, p.v = v.p, p.out = o.p;
    p.softmax_scale = 0.0721687836f, p.causal = true;
    prefill_attention("cuda", p);
    BENCH_CHECK(cudaDeviceSynchronize());
    const int64_t unwritten = nan_count(o.p, tq * r.H * 128);
    const double ms = median_ms(2, quick ? 5 : 10, [&](int) { prefill_attention("cuda", p); });
    double ms_sm80 = ms;
    if (sm90) {
      setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
      ms_sm80 = median_ms(1, quick ? 3 : 5, [&](int) { prefill_attention("cuda", p); });
      unsetenv("MLA_CUDA_DISABLE_SM90");
    }
    const double flops = 2.0 * r.b * r.H * (static_cast<double>(r.T) * r.T / 2) * (192 + 128);
    std::printf("%-24s %9.3f %9.1f %9.3f%s\n", name.c_str(), ms, flops / ms / 1e9, ms_sm80,
                unwritten ? "  UNWRITTEN OUTPUT" : "");
    out.push_back({{"case", name}, {"ms", ms}, {"tflops", flops / ms / 1e9}, {"sm80_ms", ms_sm80},
                   {"unwritten_outputs", unwritten}});
  }
  return out;
}

nlohmann::json bench_layer(bool quick) {
  nlohmann::json out = nlohmann::json::array();
  std::printf("\n(b) one V3 attention layer (D 7168, H 128, d_q 1536), bf16, page 64, random weights\n");
  std::printf("%-34s %9s %12s %9s\n", "work", "ms", "tokens/s", "eager ms");
  const Config c = Config::preset("v3");
  const LayerWeights w = LayerWeights::random(c, 1);
  LayerOptions opt;
  opt.device = "cuda";
  opt.precision = Precision::BF16;
  Attention layer(w, opt);
  const int64_t D = c.hidden_size;

  auto prefill = [&](int64_t T) {
    if (!selected("prefill b=1 T=" + std::to_string(T))) return;
    LatentCache cache = layer.make_cache((T + 63) / 64 + 1, 64, 7);
    const SeqId id = cache.add_sequence();
    Dev hidden(static_cast<size_t>(T * D * 4)), outd(static_cast<size_t>(T * D * 4));
    std::vector<float> h(static_cast<size_t>(T * D));
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (float& x : h) x = u(rng);
    BENCH_CHECK(cudaMemcpy(hidden.p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    const SequenceChunk chunk{id, T, nullptr};
    const double ms = median_ms(1, quick ? 3 : 5, [&](int) {
      cache.truncate(id, 0);
      layer.forward({&chunk, 1}, hidden.as<float>(), outd.as<float>(), cache);
    });
    const std::string name = "prefill b=1 T=" + std::to_string(T);
    std::printf("%-34s %9.3f %12.0f\n", name.c_str(), ms, T / ms * 1e3);
    out.push_back({{"work", name}, {"ms", ms}, {"tokens_per_s", T / ms * 1e3},
                   {"path", std::string(path_name(layer.last_paths().at(0)))}});
  };
  auto decode = [&](int64_t B, int64_t context) {
    if (!selected("decode step b=" + std::to_string(B) + " ctx=" + std::to_string(context))) return;
    const int64_t pages_per = (context + 63) / 64 + 1;
    LatentCache cache = layer.make_cache(B * pages_per, 64, 9);
    std::vector<SeqId> ids;
    for (int64_t b = 0; b < B; ++b) ids.push_back(cache.add_sequence());
    std::vector<int64_t> extra(static_cast<size_t>(B), context - 1);
    cache.reserve(ids, extra);
    random_bf16(cache.storage(), cache.pages_total() * 64 * c.latent_dim(), 5, 0.5f);
    for (SeqId id : ids) cache.commit(id, context - 1);
    Dev hidden(static_cast<size_t>(B * D * 4)), outd(static_cast<size_t>(B * D * 4));
    std::vector<float> h(static_cast<size_t>(B * D));
    std::mt19937 rng(4);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (float& x : h) x = u(rng);
    BENCH_CHECK(cudaMemcpy(hidden.p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    std::vector<SequenceChunk> chunks;
    for (SeqId id : ids) chunks.push_back({id, 1, nullptr});
    auto step = [&](int) {
      for (SeqId id : ids) cache.truncate(id, context - 1);
      layer.forward(chunks, hidden.as<float>(), outd.as<float>(), cache);
    };
    const double ms = median_ms(3, quick ? 5 : 20, step);  // the layer replays repeated steps from a CUDA graph
    setenv("MLA_CUDA_GRAPHS", "0", 1);
    const double eager_ms = median_ms(2, quick ? 5 : 20, step);
    unsetenv("MLA_CUDA_GRAPHS");
    const std::string name = "decode step b=" + std::to_string(B) + " ctx=" + std::to_string(context);
    std::printf("%-34s %9.3f %12.0f %9.3f\n", name.c_str(), ms, B / ms * 1e3, eager_ms);
    out.push_back({{"work", name}, {"ms", ms}, {"eager_ms", eager_ms}, {"tokens_per_s", B / ms * 1e3},
                   {"path", std::string(path_name(layer.last_paths().at(0)))}});
  };
  prefill(4096);
  if (!quick) prefill(16384);
  decode(1, 4096);
  decode(32, 4096);
  return out;
}

}  // namespace

int bench_cuda(const std::string& json_path, bool quick) {
  const std::vector<std::string> devices = available_devices();
  if (std::find(devices.begin(), devices.end(), "cuda") == devices.end())
    throw InvalidArgument("bench --device cuda: no usable GPU on this machine");
  int device = 0;
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDevice(&device));
  BENCH_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("mla bench --device cuda: %s, %d SMs, %.0f MB L2%s\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, quick ? " (quick)" : "");
  std::printf("mla alone; the same-run comparison with FlashMLA, FA3 and cuDNN is bench/cuda/vs_anchors.py.\n");
  nlohmann::json j;
  j["device"] = prop.name;
  j["sms"] = prop.multiProcessorCount;
  j["quick"] = quick;
  j["decode_kernel"] = bench_decode(quick);
  j["prefill_kernel"] = bench_prefill_kernel(quick);
  j["layer"] = bench_layer(quick);
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    if (!f) throw Error("bench: cannot write " + json_path);
    f << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace mla::tools
