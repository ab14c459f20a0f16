// Multi-GPU benchmark for the GPU machine (issue 12; docs/parallel.md), one process driving N GPUs:
//   mla-bench-parallel [--ranks N] [--quick] [--json PATH]      (bench/cuda/parallel_main.cpp)
//   mla bench --device cuda --tp N [--cp N] [--quick] [--json PATH]
// NCCL_NVLS_ENABLE=0 is set here before the communicators exist.
// In one run: (a) NCCL's own bus bandwidth for all-reduce and all-gather, at round sizes and at the sizes the
// steps below send; (b) the V3 layer (random weights, bf16, page 64) on one GPU and with its heads split over N
// (LayerOptions::communicator): prefill T=16384 (4096 with --quick) and a decode step b=32 ctx 4096, replayed from
// the layer's CUDA graph with the all-reduce inside it; (c) the absorbed decode b=8 ctx 131072, 128 heads, on one
// GPU and context-parallel over N (each rank holding 1/N of the cache's pages), both replayed from CUDA graphs.
// Layer and decode times are wall-clock medians per call (every layer forward synchronises; the decode graphs are
// synchronised after each replay), with the ranks released together by a barrier and each call's time the
// slowest rank's. Cache values are constant (cudaMemset): no kernel's work depends on them.
#include "mla/parallel.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mla/mla.hpp"

namespace mla::tools {
namespace {

#define BENCH_CHECK(call)                                                                               \
  do {                                                                                                  \
    const cudaError_t e_ = (call);                                                                      \
    if (e_ != cudaSuccess) throw Error(std::string("bench: ") + #call + ": " + cudaGetErrorString(e_)); \
  } while (0)

struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { BENCH_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// fn(rank, i) for i in [0, warm + reps) on one thread per rank (device `devices[rank]` current), all ranks released
// together for every i; returns the median over the timed i of the slowest rank's milliseconds.
double time_ranks(int ranks, int warm, int reps, const std::function<void(int)>& setup,
                  const std::function<void(int, int)>& fn) {
  std::barrier sync(ranks);
  std::vector<std::vector<double>> ms(static_cast<size_t>(ranks), std::vector<double>(static_cast<size_t>(reps)));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        BENCH_CHECK(cudaSetDevice(r));
        setup(r);
        for (int i = 0; i < warm + reps; ++i) {
          sync.arrive_and_wait();
          const auto t0 = std::chrono::steady_clock::now();
          fn(r, i);
          const auto t1 = std::chrono::steady_clock::now();
          if (i >= warm)
            ms[r][static_cast<size_t>(i - warm)] = std::chrono::duration<double, std::milli>(t1 - t0).count();
        }
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
        sync.arrive_and_drop();  // a rank that failed must not leave the others at the barrier
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  std::vector<double> slowest(static_cast<size_t>(reps), 0.0);
  for (int r = 0; r < ranks; ++r)
    for (int i = 0; i < reps; ++i) slowest[i] = std::max(slowest[i], ms[r][i]);
  return median(slowest);
}

// ---- (a) NCCL's bus bandwidth ----

// Median microseconds of one collective on every rank (CUDA events on each rank's stream; the slowest rank's).
double collective_us(std::vector<Communicator>& comms, bool all_reduce, int64_t bytes) {
  const int n = static_cast<int>(comms.size());
  std::vector<std::vector<double>> us(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  const int warm = 5, reps = bytes > (int64_t{64} << 20) ? 10 : 50;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        BENCH_CHECK(cudaSetDevice(comms[r].device()));
        Dev buf(static_cast<size_t>(bytes));
        cudaStream_t s = nullptr;
        BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        cudaEvent_t a, b;
        BENCH_CHECK(cudaEventCreate(&a));
        BENCH_CHECK(cudaEventCreate(&b));
        const int64_t count = bytes / 4;
        auto call = [&] {
          if (all_reduce)
            comms[r].all_reduce_sum(buf.p, buf.p, count, DType::F32, s);
          else
            comms[r].all_gather(buf.as<float>() + r * (count / n), buf.p, count / n, DType::F32, s);
        };
        for (int i = 0; i < warm; ++i) call();
        for (int i = 0; i < reps; ++i) {
          BENCH_CHECK(cudaEventRecord(a, s));
          call();
          BENCH_CHECK(cudaEventRecord(b, s));
          BENCH_CHECK(cudaEventSynchronize(b));
          float ms = 0;
          BENCH_CHECK(cudaEventElapsedTime(&ms, a, b));
          us[r].push_back(ms * 1e3);
        }
        cudaEventDestroy(a);
        cudaEventDestroy(b);
        cudaStreamDestroy(s);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  double worst = 0;
  for (int r = 0; r < n; ++r) worst = std::max(worst, median(us[r]));
  return worst;
}

nlohmann::json bench_nccl(std::vector<Communicator>& comms, bool quick) {
  const int n = static_cast<int>(comms.size());
  std::printf("\n(a) NCCL on %d GPUs (fp32; eager calls timed with CUDA events; bus bandwidth as nccl-tests)\n", n);
  std::printf("%-40s %12s %10s %12s\n", "collective", "bytes", "us", "bus GB/s");
  nlohmann::json out = nlohmann::json::array();
  const int64_t b32_decode = 32 * 7168 * 4, prefill = int64_t{quick ? 4096 : 16384} * 7168 * 4;
  const int64_t cp_parts = int64_t{n} * 8 * 128 * (512 * 2 + 4);  // gathered (out, lse) of b=8, 128 heads
  struct Row {
    std::string name;
    bool all_reduce;
    int64_t bytes;
  };
  const std::vector<Row> rows{{"all-reduce 14 KB", true, 14 * 1024},
                              {"all-reduce TP decode step b=32", true, b32_decode},
                              {"all-reduce 16 MB", true, 16 << 20},
                              {"all-reduce TP prefill", true, prefill},
                              {"all-reduce 512 MB", true, int64_t{512} << 20},
                              {"all-gather CP decode b=8 h=128", false, cp_parts}};
  for (const Row& row : rows) {
    if (quick && row.bytes > (int64_t{256} << 20)) continue;
    const double us = collective_us(comms, row.all_reduce, row.bytes);
    const double factor = row.all_reduce ? 2.0 * (n - 1) / n : double(n - 1) / n;
    const double bus = n > 1 ? row.bytes * factor / us / 1e3 : 0.0;
    std::printf("%-40s %12lld %10.1f %12.1f\n", row.name.c_str(), static_cast<long long>(row.bytes), us, bus);
    out.push_back({{"collective", row.name}, {"bytes", row.bytes}, {"us", us}, {"bus_GBps", bus}});
  }
  return out;
}

// ---- (b) the V3 layer: single GPU vs heads split over N ----

struct LayerCase {
  std::string name;
  int64_t batch, new_tokens, context;  // context: tokens already cached before the call
};

// Milliseconds per forward of `c` with `ranks` ranks (comms null: one GPU, no communicator).
double layer_ms(const LayerWeights& w, std::vector<Communicator>* comms, const LayerCase& c, bool quick) {
  const int ranks = comms ? static_cast<int>(comms->size()) : 1;
  const int64_t D = w.config.hidden_size, N = c.batch * c.new_tokens;
  struct Rank {
    std::unique_ptr<Attention> layer;
    std::unique_ptr<LatentCache> cache;
    std::vector<SeqId> ids;
    std::vector<SequenceChunk> chunks;
    std::unique_ptr<Dev> hidden, out;
  };
  std::vector<Rank> rs(static_cast<size_t>(ranks));
  auto setup = [&](int r) {
    Rank& k = rs[static_cast<size_t>(r)];
    LayerOptions o;
    o.device = "cuda";
    if (comms) o.communicator = &(*comms)[static_cast<size_t>(r)];
    k.layer = std::make_unique<Attention>(w, o);
    const int64_t pages = c.batch * ((c.context + c.new_tokens + 63) / 64 + 1);
    k.cache = std::make_unique<LatentCache>(k.layer->make_cache(pages, 64, 9));
    BENCH_CHECK(cudaMemset(k.cache->storage(), 0x3c, static_cast<size_t>(pages * k.cache->page_bytes())));
    for (int64_t b = 0; b < c.batch; ++b) {
      k.ids.push_back(k.cache->add_sequence());
      k.chunks.push_back({k.ids.back(), c.new_tokens, nullptr});
    }
    std::vector<int64_t> extra(static_cast<size_t>(c.batch), c.context + c.new_tokens);
    k.cache->reserve(k.ids, extra);
    for (SeqId id : k.ids) k.cache->commit(id, c.context);
    std::vector<float> h(static_cast<size_t>(N * D));
    std::mt19937 rng(4);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (float& x : h) x = u(rng);
    k.hidden = std::make_unique<Dev>(h.size() * 4);
    k.out = std::make_unique<Dev>(h.size() * 4);
    BENCH_CHECK(cudaMemcpy(k.hidden->p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  };
  auto step = [&](int r, int) {
    Rank& k = rs[static_cast<size_t>(r)];
    for (SeqId id : k.ids) k.cache->truncate(id, c.context);
    k.layer->forward(k.chunks, k.hidden->as<float>(), k.out->as<float>(), *k.cache);
  };
  const bool prefill = c.new_tokens > 1;
  const double ms = time_ranks(ranks, prefill ? 1 : 3, prefill ? (quick ? 3 : 5) : (quick ? 10 : 30), setup, step);
  for (int r = 0; r < ranks; ++r) {  // free on the rank's device
    BENCH_CHECK(cudaSetDevice(r));
    rs[static_cast<size_t>(r)] = Rank{};
  }
  BENCH_CHECK(cudaSetDevice(0));
  return ms;
}

nlohmann::json bench_layer(std::vector<Communicator>& comms, bool quick) {
  const int n = static_cast<int>(comms.size());
  std::printf("\n(b) one V3 attention layer (D 7168, H 128), bf16, random weights: 1 GPU vs TP=%d\n", n);
  std::printf("%-34s %10s %10s %8s\n", "work", "1 GPU ms", "TP ms", "ratio");
  const LayerWeights w = LayerWeights::random(Config::preset("v3"), 1);
  nlohmann::json out = nlohmann::json::array();
  const std::vector<LayerCase> cases{{quick ? "prefill b=1 T=4096" : "prefill b=1 T=16384", 1, quick ? 4096 : 16384, 0},
                                     {"decode step b=32 ctx=4096 (graph)", 32, 1, 4095}};
  for (const LayerCase& c : cases) {
    const double one = layer_ms(w, nullptr, c, quick), tp = layer_ms(w, &comms, c, quick);
    std::printf("%-34s %10.3f %10.3f %8.3f\n", c.name.c_str(), one, tp, tp / one);
    out.push_back({{"work", c.name},
                   {"single_ms", one},
                   {"tp_ms", tp},
                   {"tp", n},
                   {"ratio", tp / one},
                   {"allreduce_bytes", c.batch * c.new_tokens * 7168 * 4}});
  }
  return out;
}

// ---- (c) the absorbed decode: single GPU vs context-parallel over N ----

nlohmann::json bench_context_parallel(std::vector<Communicator>& comms, bool quick) {
  const int n = static_cast<int>(comms.size());
  const int64_t B = 8, ctx = quick ? 32768 : 131072, H = 128, P = 64, d = 576, dv = 512;
  std::printf("\n(c) decode b=%lld ctx=%lld h_q=%lld (bf16, page 64, CUDA graphs): 1 GPU vs CP=%d\n",
              static_cast<long long>(B), static_cast<long long>(ctx), static_cast<long long>(H), n);
  double ms[2] = {0, 0};
  int64_t cache_bytes[2] = {0, 0};
  for (int cp = 0; cp < 2; ++cp) {
    const int ranks = cp ? n : 1;
    struct Rank {
      std::unique_ptr<Dev> q, kv, table, lens, out, lse, ws;
      DecodeParams p;
      ContextParallelPlan plan;
      cudaStream_t stream = nullptr;
      cudaGraphExec_t exec = nullptr;
    };
    std::vector<Rank> rs(static_cast<size_t>(ranks));
    auto setup = [&](int r) {
      Rank& k = rs[static_cast<size_t>(r)];
      const int64_t len = cp ? context_parallel_length(ctx, P, r, ranks) : ctx;
      const int64_t pages = (len + P - 1) / P, num_pages = B * pages;
      std::vector<int32_t> table(static_cast<size_t>(B * pages)),
          lens(static_cast<size_t>(B), static_cast<int32_t>(len));
      std::iota(table.begin(), table.end(), 0);
      k.q = std::make_unique<Dev>(static_cast<size_t>(B * H * d * 2));
      k.kv = std::make_unique<Dev>(static_cast<size_t>(num_pages * P * d * 2));
      BENCH_CHECK(cudaMemset(k.q->p, 0x3c, static_cast<size_t>(B * H * d * 2)));
      BENCH_CHECK(cudaMemset(k.kv->p, 0x3c, static_cast<size_t>(num_pages * P * d * 2)));
      k.table = std::make_unique<Dev>(table.size() * 4);
      k.lens = std::make_unique<Dev>(lens.size() * 4);
      BENCH_CHECK(cudaMemcpy(k.table->p, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
      BENCH_CHECK(cudaMemcpy(k.lens->p, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
      k.out = std::make_unique<Dev>(static_cast<size_t>(B * H * dv * 2));
      k.lse = std::make_unique<Dev>(static_cast<size_t>(B * H * 4));
      DecodeParams& p = k.p;
      p.batch = B, p.s_q = 1, p.h_q = H, p.head_dim = d, p.head_dim_v = dv, p.page_size = P;
      p.num_pages = num_pages, p.max_pages = pages, p.dtype = DType::BF16;
      p.q = k.q->p, p.kv_cache = k.kv->p, p.block_table = k.table->as<int32_t>(),
      p.cache_seqlens = k.lens->as<int32_t>();
      p.softmax_scale = 0.0417f, p.causal = true;
      p.out = k.out->p, p.lse = k.lse->as<float>();
      BENCH_CHECK(cudaStreamCreateWithFlags(&k.stream, cudaStreamNonBlocking));
      int64_t ws_bytes = 0;
      DecodeSchedule single;
      if (cp) {
        k.plan = plan_context_parallel_decode(comms[static_cast<size_t>(r)], p);
        ws_bytes = k.plan.workspace_bytes;
      } else {
        single = plan_decode_attention("cuda", p);
        ws_bytes = single.workspace_bytes;
      }
      k.ws = std::make_unique<Dev>(static_cast<size_t>(ws_bytes));
      if (r == 0) cache_bytes[cp] = num_pages * P * d * 2;
      cudaGraph_t g = nullptr;
      BENCH_CHECK(cudaStreamBeginCapture(k.stream, cudaStreamCaptureModeThreadLocal));
      if (cp)
        context_parallel_decode(comms[static_cast<size_t>(r)], p, k.plan, k.ws->p, k.stream);
      else
        decode_attention("cuda", p, single, k.ws->p, k.stream);
      BENCH_CHECK(cudaStreamEndCapture(k.stream, &g));
      BENCH_CHECK(cudaGraphInstantiate(&k.exec, g, 0));
      cudaGraphDestroy(g);
    };
    auto step = [&](int r, int) {
      Rank& k = rs[static_cast<size_t>(r)];
      BENCH_CHECK(cudaGraphLaunch(k.exec, k.stream));
      BENCH_CHECK(cudaStreamSynchronize(k.stream));
    };
    ms[cp] = time_ranks(ranks, 5, quick ? 10 : 30, setup, step);
    for (int r = 0; r < ranks; ++r) {
      BENCH_CHECK(cudaSetDevice(r));
      cudaGraphExecDestroy(rs[static_cast<size_t>(r)].exec);
      cudaStreamDestroy(rs[static_cast<size_t>(r)].stream);
      rs[static_cast<size_t>(r)] = Rank{};
    }
    BENCH_CHECK(cudaSetDevice(0));
  }
  const int64_t sent = B * H * (dv * 2 + 4);
  std::printf("%-34s %10s %10s %8s %14s %14s %12s\n", "work", "1 GPU ms", "CP ms", "ratio", "cache B/GPU 1",
              "cache B/GPU CP", "sent B/rank");
  std::printf("%-34s %10.3f %10.3f %8.3f %14lld %14lld %12lld\n", "decode step", ms[0], ms[1], ms[1] / ms[0],
              static_cast<long long>(cache_bytes[0]), static_cast<long long>(cache_bytes[1]),
              static_cast<long long>(sent));
  return {{"batch", B},
          {"context", ctx},
          {"h_q", H},
          {"single_ms", ms[0]},
          {"cp_ms", ms[1]},
          {"cp", n},
          {"ratio", ms[1] / ms[0]},
          {"cache_bytes_per_gpu_single", cache_bytes[0]},
          {"cache_bytes_per_gpu_cp", cache_bytes[1]},
          {"bytes_sent_per_rank", sent}};
}

}  // namespace

// ranks 0: every GPU of the machine. Throws Error when fewer than 2 GPUs can take part.
int bench_parallel(int ranks, const std::string& json, bool quick) {
  setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast stays off on the lent machines
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;  // no driver or no GPU
  if (ranks == 0) ranks = count;
  if (ranks < 2 || ranks > count)
    throw InvalidArgument("bench (parallel): needs 2 or more GPUs (" + std::to_string(ranks) +
                          " ranks asked for, this machine has " + std::to_string(count) + ")");
  std::vector<int> devices(static_cast<size_t>(ranks));
  std::iota(devices.begin(), devices.end(), 0);
  std::vector<Communicator> comms = Communicator::local(devices);
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("mla bench (parallel): %d x %s%s, NCCL_NVLS_ENABLE=0\n", ranks, prop.name, quick ? " (quick)" : "");
  nlohmann::json j;
  j["device"] = prop.name;
  j["ranks"] = ranks;
  j["quick"] = quick;
  j["nccl"] = bench_nccl(comms, quick);
  j["layer"] = bench_layer(comms, quick);
  j["context_parallel_decode"] = bench_context_parallel(comms, quick);
  if (!json.empty()) {
    std::ofstream f(json);
    if (!f) throw Error("bench: cannot write " + json);
    f << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace mla::tools
