// Multi-GPU MLA (mla/parallel.hpp) on the GPUs of this machine: the communicator and its collectives, tensor-
// parallel layers and context-parallel decode against the single-GPU layer and decode, and the merge kernel
// against the CPU reference. Without a GPU every test skips; tests that need two GPUs skip on one. With one GPU
// the world-size-1 communicator runs, and the ranks' arithmetic is checked with the ranks simulated on one device
// (no NCCL). NCCL_NVLS_ENABLE=0 is set before any communicator exists (NVLink multicast stays off).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mla/parallel.hpp"
#include "mla/safetensors.hpp"
#include "split_cache.hpp"
#include "testing.hpp"

namespace mla {
namespace {

const bool kNvlsOff = [] { return setenv("NCCL_NVLS_ENABLE", "0", 1) == 0; }();

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}
#define SKIP_WITHOUT_GPU() \
  if (gpu_count() < 1) GTEST_SKIP() << "no usable GPU"
#define SKIP_WITHOUT_GPUS(n) \
  if (gpu_count() < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, this machine has " << gpu_count()

void check(cudaError_t e) { ASSERT_EQ(e, cudaSuccess) << cudaGetErrorString(e); }

// A device allocation on the current device.
struct DeviceBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuf(size_t n) : bytes(std::max<size_t>(n, 1)) { check(cudaMalloc(&ptr, bytes)); }
  template <class T>
  explicit DeviceBuf(const std::vector<T>& v) : DeviceBuf(v.size() * sizeof(T)) {
    if (!v.empty()) check(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  DeviceBuf(const void* host, size_t n) : DeviceBuf(n) { check(cudaMemcpy(ptr, host, n, cudaMemcpyHostToDevice)); }
  ~DeviceBuf() { cudaFree(ptr); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
  template <class T>
  T* get() const {
    return static_cast<T*>(ptr);
  }
  void read(void* host, size_t n) const { check(cudaMemcpy(host, ptr, n, cudaMemcpyDeviceToHost)); }
};

std::vector<int> first_devices(int n) {
  std::vector<int> d(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) d[static_cast<size_t>(i)] = i;
  return d;
}

// fn(rank) on one thread per rank with the rank's device current (a collective returns only once every rank has
// issued it, and the layer synchronises inside forward). The first exception is rethrown here.
void on_every_rank(const std::vector<Communicator>& comms, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(comms.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms.size(); ++r)
    threads.emplace_back([&, r] {
      try {
        if (cudaSetDevice(comms[r].device()) != cudaSuccess) throw Error("cudaSetDevice failed");
        fn(static_cast<int>(r));
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

// ---- the communicator ----

TEST(Communicator, LocalRanksAndCollectives) {
  SKIP_WITHOUT_GPU();
  ASSERT_TRUE(kNvlsOff);
  for (int world : {1, std::min(gpu_count(), 8)}) {
    SCOPED_TRACE("world " + std::to_string(world));
    const std::vector<int> devices = first_devices(world);
    std::vector<Communicator> comms = Communicator::local(devices);
    ASSERT_EQ(comms.size(), static_cast<size_t>(world));
    const int64_t n = 1000;
    std::vector<std::unique_ptr<DeviceBuf>> sum, gathered;
    std::vector<cudaStream_t> streams(static_cast<size_t>(world));
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(comms[r].rank(), r);
      EXPECT_EQ(comms[r].world(), world);
      EXPECT_EQ(comms[r].device(), r);
      EXPECT_NE(comms[r].nccl_comm(), nullptr);
      check(cudaSetDevice(r));
      std::vector<float> mine(n);
      for (int64_t i = 0; i < n; ++i) mine[i] = static_cast<float>((r + 1) * 1000 + i);
      sum.push_back(std::make_unique<DeviceBuf>(mine));  // reduced in place
      gathered.push_back(std::make_unique<DeviceBuf>(world * n * sizeof(float)));
      check(cudaMemcpy(gathered.back()->get<float>() + r * n, mine.data(), n * 4, cudaMemcpyHostToDevice));
      check(cudaStreamCreate(&streams[r]));  // each rank's calls on a stream of its own device
    }
    // One thread issues every rank's calls: the group API makes that legal (without it the first call would wait
    // for ranks not yet issued).
    Communicator::group_start();
    for (int r = 0; r < world; ++r) {
      comms[r].all_reduce_sum(sum[r]->ptr, sum[r]->ptr, n, DType::F32, streams[r]);
      comms[r].all_gather(gathered[r]->get<float>() + r * n, gathered[r]->ptr, n, DType::F32, streams[r]);
    }
    Communicator::group_end();
    for (int r = 0; r < world; ++r) {
      check(cudaSetDevice(r));
      check(cudaStreamSynchronize(streams[r]));
      check(cudaStreamDestroy(streams[r]));
    }
    for (int r = 0; r < world; ++r) {
      check(cudaSetDevice(r));
      std::vector<float> s(n), g(world * n);
      sum[r]->read(s.data(), n * 4);
      gathered[r]->read(g.data(), g.size() * 4);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(s[i], static_cast<float>(world * (world + 1) / 2 * 1000 + world * i))
            << "rank " << r << " [" << i << "]";
        for (int q = 0; q < world; ++q) ASSERT_EQ(g[q * n + i], static_cast<float>((q + 1) * 1000 + i));
      }
    }
    check(cudaSetDevice(0));
  }
}

TEST(Communicator, WrapsAnEnginesCommunicator) {
  SKIP_WITHOUT_GPU();
  const int devices[] = {0};
  std::vector<Communicator> owned = Communicator::local(devices);
  {
    Communicator view = Communicator::wrap(owned[0].nccl_comm());
    EXPECT_EQ(view.rank(), 0);
    EXPECT_EQ(view.world(), 1);
    EXPECT_EQ(view.nccl_comm(), owned[0].nccl_comm());
  }  // not owned: the wrapped communicator still works after the view is gone
  DeviceBuf x(std::vector<float>{1.f, 2.f});
  owned[0].all_reduce_sum(x.ptr, x.ptr, 2, DType::F32, nullptr);
  std::vector<float> y(2);
  x.read(y.data(), 8);
  EXPECT_EQ(y, (std::vector<float>{1.f, 2.f}));
}

// One process per GPU (ncclCommInitRank from rank 0's id); with world 1 this process is every rank.
TEST(Communicator, FromUniqueIdWithOneRank) {
  SKIP_WITHOUT_GPU();
  const std::string id = Communicator::unique_id();
  ASSERT_EQ(id.size(), Communicator::kUniqueIdBytes);
  check(cudaSetDevice(0));
  Communicator comm = Communicator::from_unique_id(id, 0, 1, 0);
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.world(), 1);
  EXPECT_EQ(comm.device(), 0);
  EXPECT_NE(comm.nccl_comm(), nullptr);
  const std::vector<float> x = {1.f, -2.5f, 3e30f, 0.f};
  DeviceBuf send(x), recv(x.size() * 4);
  comm.all_reduce_sum(send.ptr, recv.ptr, static_cast<int64_t>(x.size()), DType::F32, nullptr);
  check(cudaDeviceSynchronize());
  std::vector<float> y(x.size());
  recv.read(y.data(), y.size() * 4);
  EXPECT_EQ(y, x) << "a sum over one rank is the identity";
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::from_unique_id(id, 0, 1, gpu_count()); },
                                              {"device " + std::to_string(gpu_count()), "does not exist"});
}

TEST(Communicator, RefusesBadArgumentsByName) {
  SKIP_WITHOUT_GPU();
  const int n = gpu_count();
  testing::expect_throw_with<InvalidArgument>([] { Communicator::local({}); }, {"at least one"});
  const int twice[] = {0, 0};
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::local(twice); }, {"device 0", "listed twice"});
  const int missing[] = {n};
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::local(missing); },
                                              {"device " + std::to_string(n), "does not exist"});
  testing::expect_throw_with<InvalidArgument>([] { Communicator::wrap(nullptr); }, {"must not be null"});
  const int zero[] = {0};
  std::vector<Communicator> comms = Communicator::local(zero);
  testing::expect_throw_with<InvalidArgument>(
      [&] { comms[0].all_reduce_sum(nullptr, nullptr, 1, DType::I64, nullptr); }, {"all_reduce_sum", "I64"});
}

// ---- the merge kernel against the CPU reference ----

void merge_cuda_vs_cpu(DType dt, int64_t parts, int64_t batch, int64_t s_q, int64_t h_q, int64_t dv, uint64_t seed) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " parts " + std::to_string(parts) + " rows " +
               std::to_string(batch * s_q * h_q) + " dv " + std::to_string(dv));
  const int64_t rows = batch * s_q * h_q;
  std::vector<float> lse = testing::random_values(static_cast<size_t>(parts * rows), seed, 30.f);
  std::vector<float> out = testing::random_values(static_cast<size_t>(parts * rows * dv), seed + 1);
  // Some parts saw no key (±inf, their outputs NaN: never read), every part of some rows, a NaN lse in one row.
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t k = 0; k < parts; ++k) {
      const bool empty = row % 7 == 3 || (row + k) % 5 == 0;
      if (!empty) continue;
      lse[k * rows + row] = (row + k) % 2 ? kInf : -kInf;
      for (int64_t j = 0; j < dv; ++j) out[(k * rows + row) * dv + j] = kNaN;
    }
  if (parts > 1 && rows > 10) lse[rows + 10] = kNaN;  // part 1, row 10
  const testing::Typed parts_host(dt, out);
  testing::Typed want(dt, static_cast<size_t>(rows * dv)), got(dt, static_cast<size_t>(rows * dv));
  std::vector<float> want_lse(static_cast<size_t>(rows)), got_lse(static_cast<size_t>(rows));
  MergeParams m;
  m.parts = parts, m.batch = batch, m.s_q = s_q, m.h_q = h_q, m.head_dim_v = dv, m.dtype = dt;
  m.out_parts = parts_host.data(), m.lse_parts = lse.data(), m.out = want.data(), m.lse = want_lse.data();
  merge_attention("cpu", m);

  DeviceBuf d_parts(parts_host.data(), static_cast<size_t>(parts_host.bytes())), d_lse(lse);
  DeviceBuf d_out(static_cast<size_t>(got.bytes())), d_out_lse(got_lse.size() * 4);
  m.out_parts = d_parts.ptr, m.lse_parts = d_lse.get<float>(), m.out = d_out.ptr, m.lse = d_out_lse.get<float>();
  merge_attention("cuda", m);
  check(cudaDeviceSynchronize());
  d_out.read(got.data(), static_cast<size_t>(got.bytes()));
  d_out_lse.read(got_lse.data(), got_lse.size() * 4);

  const std::vector<float> g = got.read(), w = want.read();
  const double ulp = dt == DType::F32 ? 2e-6 : 1.0 / 128;  // expf vs std::exp: a few f32 ulps, one bf16 rounding
  for (size_t i = 0; i < w.size(); ++i) {
    ASSERT_EQ(std::isnan(g[i]), std::isnan(w[i])) << "out[" << i << "]";
    if (!std::isnan(w[i])) ASSERT_NEAR(g[i], w[i], ulp * std::max(1.f, std::fabs(w[i]))) << "out[" << i << "]";
  }
  for (size_t i = 0; i < want_lse.size(); ++i) {
    ASSERT_EQ(std::isnan(got_lse[i]), std::isnan(want_lse[i])) << "lse[" << i << "]";
    if (std::isinf(want_lse[i]))
      ASSERT_EQ(got_lse[i], want_lse[i]) << "lse[" << i << "]";
    else if (!std::isnan(want_lse[i]))
      ASSERT_NEAR(got_lse[i], want_lse[i], 1e-5 * std::max(1.f, std::fabs(want_lse[i])));
  }
}

TEST(CudaMerge, MatchesTheCpuReference) {
  SKIP_WITHOUT_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    merge_cuda_vs_cpu(dt, 2, 8, 1, 128, 512, 1);
    merge_cuda_vs_cpu(dt, 3, 3, 2, 5, 64, 2);
    merge_cuda_vs_cpu(dt, 8, 2, 1, 16, 512, 3);
    merge_cuda_vs_cpu(dt, 1, 4, 1, 7, 130, 4);  // dv not a multiple of the block
  }
  testing::expect_throw_with<InvalidArgument>(
      [] {
        MergeParams m;
        m.parts = 1, m.batch = 1, m.h_q = 1, m.head_dim_v = 4, m.dtype = DType::F16;
        static float buf[16];
        m.out_parts = buf, m.lse_parts = buf, m.out = buf + 8;
        merge_attention("cuda", m);
      },
      {"merge_attention (cuda)", "F16"});
}

// ---- context parallelism ----

// The decode over c's whole cache on the current device: out (as float) and lse.
std::pair<std::vector<float>, std::vector<float>> whole_decode(testing::SplitCache& c) {
  DecodeParams p = c.params();
  DeviceBuf q(c.q.data(), static_cast<size_t>(c.q.bytes())), kv(c.kv.data(), static_cast<size_t>(c.kv.bytes()));
  DeviceBuf table(c.table), lens(c.lens), out(static_cast<size_t>(c.rows() * c.head_dim_v * dtype_size(p.dtype)));
  DeviceBuf lse(static_cast<size_t>(c.rows() * 4));
  p.q = q.ptr, p.kv_cache = kv.ptr, p.block_table = table.get<int32_t>(), p.cache_seqlens = lens.get<int32_t>();
  p.out = out.ptr, p.lse = lse.get<float>();
  decode_attention("cuda", p);
  testing::Typed o(p.dtype, static_cast<size_t>(c.rows() * c.head_dim_v));
  std::vector<float> l(static_cast<size_t>(c.rows()));
  out.read(o.data(), static_cast<size_t>(o.bytes()));
  lse.read(l.data(), l.size() * 4);
  return {o.read(), l};
}

void expect_same_decode(const std::vector<float>& out, const std::vector<float>& lse,
                        const std::vector<float>& want_out, const std::vector<float>& want_lse, double tol) {
  EXPECT_LT(testing::rel_error(out, want_out), tol) << "out";
  ASSERT_EQ(lse.size(), want_lse.size());
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(want_lse[i]))
      ASSERT_EQ(lse[i], want_lse[i]) << "lse[" << i << "]";
    else
      ASSERT_NEAR(lse[i], want_lse[i], 2e-5 * std::max(1.f, std::fabs(want_lse[i]))) << "lse[" << i << "]";
  }
}

// The ranks simulated on one device, no NCCL: each share decoded, the shares merged by the kernel.
TEST(ContextParallel, SharesMergedOnOneDeviceEqualTheWholeDecode) {
  SKIP_WITHOUT_GPU();
  for (DType dt : {DType::BF16, DType::F32})
    for (int64_t world : {2, 4}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " world " + std::to_string(world));
      testing::SplitCache c = testing::make_split_cache(dt, 16, 1, 576, 512, 64, {0, 7, 64, 1000, 4100, 333}, world,
                                                        testing::Split::RoundRobinPages, 5);
      const auto [want_out, want_lse] = whole_decode(c);
      const int64_t rows = c.rows(), part = rows * c.head_dim_v * dtype_size(dt);
      DeviceBuf q(c.q.data(), static_cast<size_t>(c.q.bytes())), kv(c.kv.data(), static_cast<size_t>(c.kv.bytes()));
      DeviceBuf parts(static_cast<size_t>(world * part)), lses(static_cast<size_t>(world * rows * 4));
      std::vector<std::unique_ptr<DeviceBuf>> keep;
      for (int64_t r = 0; r < world; ++r) {
        DecodeParams p = c.params(r);
        keep.push_back(std::make_unique<DeviceBuf>(c.rank_table[r]));
        p.block_table = keep.back()->get<int32_t>();
        keep.push_back(std::make_unique<DeviceBuf>(c.rank_lens[r]));
        p.cache_seqlens = keep.back()->get<int32_t>();
        p.q = q.ptr, p.kv_cache = kv.ptr;
        p.out = parts.get<char>() + r * part, p.lse = lses.get<float>() + r * rows;
        decode_attention("cuda", p);
      }
      DeviceBuf out(static_cast<size_t>(part)), lse(static_cast<size_t>(rows * 4));
      MergeParams m;
      m.parts = world, m.batch = c.batch, m.s_q = 1, m.h_q = c.h_q, m.head_dim_v = c.head_dim_v, m.dtype = dt;
      m.out_parts = parts.ptr, m.lse_parts = lses.get<float>(), m.out = out.ptr, m.lse = lse.get<float>();
      merge_attention("cuda", m);
      testing::Typed o(dt, static_cast<size_t>(rows * c.head_dim_v));
      std::vector<float> l(static_cast<size_t>(rows));
      out.read(o.data(), static_cast<size_t>(o.bytes()));
      lse.read(l.data(), l.size() * 4);
      expect_same_decode(o.read(), l, want_out, want_lse, dt == DType::F32 ? 1e-5 : 1e-2);
    }
}

// context_parallel_decode over NCCL: each rank holds its pages' rows only (the rest of its pool is NaN).
void context_parallel_case(int world, DType dt, int64_t h_q, std::vector<int32_t> lens, bool graph) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " world " + std::to_string(world) + " h_q " + std::to_string(h_q) +
               (graph ? " graph" : ""));
  testing::SplitCache c =
      testing::make_split_cache(dt, h_q, 1, 576, 512, 64, std::move(lens), world, testing::Split::RoundRobinPages, 11);
  check(cudaSetDevice(0));
  const auto [want_out, want_lse] = whole_decode(c);
  std::vector<Communicator> comms = Communicator::local(first_devices(world));
  const int64_t rows = c.rows();
  std::vector<std::vector<float>> outs(static_cast<size_t>(world)), lses(static_cast<size_t>(world));
  on_every_rank(comms, [&](int r) {
    // This rank's pool: only its own pages hold rows.
    testing::Typed pool(dt, std::vector<float>(c.kv.values.size(), kNaN));
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t j = 0; j * c.page_size < c.rank_lens[r][b]; ++j) {
        const int64_t page = c.rank_table[r][b * c.max_pages + j], n = c.page_size * c.head_dim;
        std::copy_n(c.kv.values.begin() + page * n, n, pool.values.begin() + page * n);
      }
    pool = testing::Typed(dt, pool.values);
    DecodeParams p = c.params(r);
    DeviceBuf q(c.q.data(), static_cast<size_t>(c.q.bytes())), kv(pool.data(), static_cast<size_t>(pool.bytes()));
    DeviceBuf table(c.rank_table[r]), lens_d(c.rank_lens[r]);
    DeviceBuf out(static_cast<size_t>(rows * c.head_dim_v * dtype_size(dt))), lse(static_cast<size_t>(rows * 4));
    p.q = q.ptr, p.kv_cache = kv.ptr, p.block_table = table.get<int32_t>(), p.cache_seqlens = lens_d.get<int32_t>();
    p.out = out.ptr, p.lse = lse.get<float>();
    const ContextParallelPlan plan = plan_context_parallel_decode(comms[r], p);
    DeviceBuf ws(static_cast<size_t>(plan.workspace_bytes));
    cudaStream_t stream = nullptr;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    if (graph) {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t exec = nullptr;
      check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      context_parallel_decode(comms[r], p, plan, ws.ptr, stream);
      check(cudaStreamEndCapture(stream, &g));
      check(cudaGraphInstantiate(&exec, g, 0));
      for (int i = 0; i < 2; ++i) check(cudaGraphLaunch(exec, stream));
      check(cudaStreamSynchronize(stream));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(g);
    } else {
      context_parallel_decode(comms[r], p, plan, ws.ptr, stream);
    }
    check(cudaStreamSynchronize(stream));
    cudaStreamDestroy(stream);
    testing::Typed o(dt, static_cast<size_t>(rows * c.head_dim_v));
    lses[r].resize(static_cast<size_t>(rows));
    out.read(o.data(), static_cast<size_t>(o.bytes()));
    lse.read(lses[r].data(), lses[r].size() * 4);
    outs[r] = o.read();
  });
  for (int r = 0; r < world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    expect_same_decode(outs[r], lses[r], want_out, want_lse, dt == DType::F32 ? 1e-5 : 1e-2);
  }
}

TEST(ContextParallel, OneRankEqualsTheDecode) {
  SKIP_WITHOUT_GPU();
  context_parallel_case(1, DType::BF16, 16, {0, 100, 4096}, false);
}

TEST(ContextParallel, TwoRanksEqualOneGpu) {
  SKIP_WITHOUT_GPUS(2);
  context_parallel_case(2, DType::BF16, 128, {4096, 1, 0, 65, 8191, 300, 64, 2000}, false);  // V3's 128 heads
  context_parallel_case(2, DType::BF16, 16, {131072, 5}, false);
  context_parallel_case(2, DType::F32, 16, {1000, 63}, false);
  context_parallel_case(2, DType::BF16, 128, {4096, 1, 0, 65}, true);  // the all-gather inside a CUDA graph
}

TEST(ContextParallel, RefusesCausalMultiTokenSteps) {
  SKIP_WITHOUT_GPU();
  const int zero[] = {0};
  std::vector<Communicator> comms = Communicator::local(zero);
  testing::SplitCache c =
      testing::make_split_cache(DType::BF16, 4, 2, 576, 512, 64, {10}, 1, testing::Split::RoundRobinPages, 1);
  DecodeParams p = c.params(0);
  p.causal = true;
  testing::expect_throw_with<InvalidArgument>([&] { plan_context_parallel_decode(comms[0], p); },
                                              {"context_parallel_decode", "causal", "s_q = 2"});
}

// ---- tensor parallelism ----

RunOptions decode_run(int64_t decode_after) {
  RunOptions run;
  run.page_size = 16;
  run.poison_unused = true;
  run.page_order_seed = 7;
  run.decode_after = decode_after;
  return run;
}

// The layer on every rank of `world` (one thread each) over the same feed, rank r built from weights_of(r) (the
// whole layer's weights, or rank r's slice); every rank's result.
std::vector<RunResult> tensor_parallel_run(const std::function<const LayerWeights&(int)>& weights_of,
                                           LayerOptions o, int world, const float* hidden, const int64_t* positions,
                                           int64_t batch, int64_t tokens, const RunOptions& run) {
  std::vector<Communicator> comms = Communicator::local(first_devices(world));
  std::vector<RunResult> results(static_cast<size_t>(world));
  on_every_rank(comms, [&](int r) {
    LayerOptions ro = o;
    ro.communicator = &comms[static_cast<size_t>(r)];
    Attention layer(weights_of(r), ro);
    results[static_cast<size_t>(r)] = run_sequences(layer, hidden, positions, batch, tokens, run);
  });
  return results;
}

std::vector<RunResult> tensor_parallel_run(const LayerWeights& w, LayerOptions o, int world, const float* hidden,
                                           const int64_t* positions, int64_t batch, int64_t tokens,
                                           const RunOptions& run) {
  return tensor_parallel_run([&](int) -> const LayerWeights& { return w; }, o, world, hidden, positions, batch,
                             tokens, run);
}

RunResult single_gpu_run(const LayerWeights& w, const LayerOptions& o, const float* hidden, const int64_t* positions,
                         int64_t batch, int64_t tokens, const RunOptions& run) {
  check(cudaSetDevice(0));
  Attention layer(w, o);
  return run_sequences(layer, hidden, positions, batch, tokens, run);
}

TEST(TensorParallel, OneRankEqualsTheLayer) {
  SKIP_WITHOUT_GPU();
  const testing::GoldenCase g = testing::load_golden("v3-tiny");
  LayerOptions o;
  o.device = "cuda";
  const RunOptions run = decode_run(g.tokens / 2);
  const RunResult want = single_gpu_run(g.weights, o, g.hidden.data(), g.positions.data(), g.batch, g.tokens, run);
  const std::vector<RunResult> got =
      tensor_parallel_run(g.weights, o, 1, g.hidden.data(), g.positions.data(), g.batch, g.tokens, run);
  EXPECT_EQ(got[0].output, want.output) << "an all-reduce over one rank changes nothing";
  EXPECT_EQ(got[0].latent, want.latent);
}

TEST(TensorParallel, RefusesWhatDoesNotDivideAndTheWrongDevice) {
  SKIP_WITHOUT_GPU();
  const int zero[] = {0};
  std::vector<Communicator> comms = Communicator::local(zero);
  LayerOptions o;
  o.device = "cuda";
  o.communicator = &comms[0];
  check(cudaSetDevice(0));
  Attention layer(LayerWeights::random(testing::small_config(32, 4, 16, 16, 8, 8, 8), 1), o);
  if (gpu_count() >= 2) {  // rank 0 lives on device 0
    check(cudaSetDevice(1));
    std::vector<float> h(32, 0.1f), out(32);
    LatentCache cache = layer.make_cache(4, 16);
    const SeqId id = cache.add_sequence();
    const SequenceChunk chunk[] = {{id, 1, nullptr}};
    testing::expect_throw_with<InvalidArgument>([&] { layer.forward_host(chunk, h.data(), out.data(), cache); },
                                                {"rank 0 runs on device 0", "current device is 1"});
    check(cudaSetDevice(0));
  }
  SKIP_WITHOUT_GPUS(2);
  std::vector<Communicator> two = Communicator::local(first_devices(2));
  o.communicator = &two[0];
  const LayerWeights w = LayerWeights::random(testing::small_config(32, 3, 16, 16, 8, 8, 8), 1);
  testing::expect_throw_with<InvalidArgument>([&] { Attention(w, o); }, {"num_heads 3", "2 ranks"});
}

TEST(TensorParallel, TwoRanksEqualOneGpuOnTheGoldens) {
  SKIP_WITHOUT_GPUS(2);
  for (const std::string& name : testing::golden_cases()) {
    const testing::GoldenCase g = testing::load_golden(name);
    if (g.weights.config.num_heads % 2 != 0) continue;  // refused by name (RefusesWhatDoesNotDivide...)
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (int64_t decode_after : {int64_t{-1}, g.tokens / 2}) {
        SCOPED_TRACE(name + " " + std::string(precision_name(pr)) + (decode_after < 0 ? " one shot" : " decode"));
        LayerOptions o;
        o.device = "cuda";
        o.precision = pr;
        const RunOptions run = decode_run(decode_after);
        const RunResult one = single_gpu_run(g.weights, o, g.hidden.data(), g.positions.data(), g.batch, g.tokens, run);
        const std::vector<RunResult> two =
            tensor_parallel_run(g.weights, o, 2, g.hidden.data(), g.positions.data(), g.batch, g.tokens, run);
        const double tol = pr == Precision::F32 ? 2e-5 : 2e-2;
        for (int r = 0; r < 2; ++r) {
          EXPECT_LT(testing::rel_error(two[r].output, g.output), tol) << "rank " << r << " vs the golden";
          EXPECT_LT(testing::rel_error(two[r].output, one.output), pr == Precision::F32 ? 1e-5 : 1e-2) << "rank " << r;
          EXPECT_EQ(two[r].latent, one.latent) << "rank " << r << ": the cache rows are the single GPU's, bit for bit";
        }
        EXPECT_EQ(two[0].output, two[1].output) << "every rank holds the same output";
      }
  }
}

TEST(TensorParallel, TwoRanksEqualOneGpuOnV3Weights) {
  SKIP_WITHOUT_GPUS(2);
  const Config c = Config::preset("v3");  // 128 heads, hidden 7168, the released shapes
  const LayerWeights w = LayerWeights::random(c, 21);
  const int64_t B = 2, T = 48;
  const std::vector<float> hidden = testing::random_values(static_cast<size_t>(B * T * c.hidden_size), 9);
  std::vector<int64_t> positions(static_cast<size_t>(B * T));
  for (int64_t i = 0; i < B * T; ++i) positions[i] = i % T + 100 * (i / T);
  LayerOptions o;
  o.device = "cuda";
  const RunOptions run = decode_run(T - 6);  // prefill, then 6 decode steps: graphs captured and replayed
  const RunResult one = single_gpu_run(w, o, hidden.data(), positions.data(), B, T, run);
  const std::vector<RunResult> two = tensor_parallel_run(w, o, 2, hidden.data(), positions.data(), B, T, run);
  for (int r = 0; r < 2; ++r) {
    EXPECT_LT(testing::rel_error(two[r].output, one.output), 1e-2) << "rank " << r;
    EXPECT_EQ(two[r].latent, one.latent) << "rank " << r;
  }
}

// A serving loop's decode steps with hidden and out at fixed device addresses, so the layer runs a step's first
// occurrence eagerly, captures the second (the NCCL all-reduce inside the graph) and replays the rest until the
// key changes (the longest sequence crossing a page boundary). Every rank's steps equal the single GPU's within
// bf16 tolerance, and equal bit for bit the same steps run again eagerly (MLA_CUDA_GRAPHS=0), which a replay that
// read anything stale would not (a sum of two fp32 partials is one rounding whatever NCCL's algorithm, so two
// ranks give the same bits eagerly and in a graph). On one GPU it runs with world 1: the all-reduce node in the
// graph all the same.
struct DecodeRank {
  std::unique_ptr<Attention> layer;
  std::unique_ptr<LatentCache> cache;
  std::vector<SeqId> ids;
  std::unique_ptr<DeviceBuf> din, dout;
};

constexpr int64_t kLoopHistory[] = {5, 20, 37};
constexpr int kLoopSteps = 24;

void decode_setup(DecodeRank& k, const LayerWeights& w, const LayerOptions& o) {
  const int64_t D = w.config.hidden_size, B = std::size(kLoopHistory);
  k.layer = std::make_unique<Attention>(w, o);
  k.cache = std::make_unique<LatentCache>(k.layer->make_cache(16, 16, 3));
  for (int64_t b = 0; b < B; ++b) {
    k.ids.push_back(k.cache->add_sequence());
    const std::vector<float> x = testing::random_values(static_cast<size_t>(kLoopHistory[b] * D), 60 + b);
    std::vector<float> y(x.size());
    const SequenceChunk chunk{k.ids.back(), kLoopHistory[b], nullptr};
    k.layer->forward_host({&chunk, 1}, x.data(), y.data(), *k.cache);
  }
  k.din = std::make_unique<DeviceBuf>(static_cast<size_t>(B * D * 4));
  k.dout = std::make_unique<DeviceBuf>(static_cast<size_t>(B * D * 4));
}

std::vector<std::vector<float>> decode_steps(DecodeRank& k, int64_t D) {
  for (size_t b = 0; b < k.ids.size(); ++b) k.cache->truncate(k.ids[b], kLoopHistory[b]);
  std::vector<SequenceChunk> batch;
  for (SeqId id : k.ids) batch.push_back({id, 1, nullptr});
  const size_t n = k.ids.size() * static_cast<size_t>(D);
  std::vector<std::vector<float>> outs;
  for (int step = 0; step < kLoopSteps; ++step) {
    const std::vector<float> x = testing::random_values(n, 1000 + step);
    check(cudaMemcpy(k.din->ptr, x.data(), n * 4, cudaMemcpyHostToDevice));
    k.layer->forward(batch, k.din->get<float>(), k.dout->get<float>(), *k.cache);
    outs.emplace_back(n);
    k.dout->read(outs.back().data(), n * 4);
  }
  return outs;
}

TEST(TensorParallel, GraphReplayedDecodeStepsEqualOneGpu) {
  SKIP_WITHOUT_GPU();
  const int world = std::min(gpu_count(), 2);
  Config c = Config::preset("v3");
  c.hidden_size = 256, c.num_heads = 16, c.q_lora_rank = 96;
  const LayerWeights w = LayerWeights::random(c, 17);
  LayerOptions o;
  o.device = "cuda", o.precision = Precision::BF16, o.path = Path::Absorbed;  // every step graphable
  setenv("MLA_CUDA_GRAPHS", "1", 1);

  check(cudaSetDevice(0));
  DecodeRank single;
  decode_setup(single, w, o);
  const std::vector<std::vector<float>> want = decode_steps(single, c.hidden_size);
  single = DecodeRank{};

  std::vector<Communicator> comms = Communicator::local(first_devices(world));
  std::vector<DecodeRank> ranks(static_cast<size_t>(world));
  std::vector<std::vector<std::vector<float>>> graphed(static_cast<size_t>(world)), eager(graphed.size());
  on_every_rank(comms, [&](int r) {
    LayerOptions ro = o;
    ro.communicator = &comms[static_cast<size_t>(r)];
    decode_setup(ranks[static_cast<size_t>(r)], w, ro);
    graphed[static_cast<size_t>(r)] = decode_steps(ranks[static_cast<size_t>(r)], c.hidden_size);
  });
  setenv("MLA_CUDA_GRAPHS", "0", 1);  // read at every forward; set while no rank runs
  on_every_rank(comms, [&](int r) {
    eager[static_cast<size_t>(r)] = decode_steps(ranks[static_cast<size_t>(r)], c.hidden_size);
  });
  unsetenv("MLA_CUDA_GRAPHS");
  on_every_rank(comms, [&](int r) { ranks[static_cast<size_t>(r)] = DecodeRank{}; });  // freed on its device

  for (int r = 0; r < world; ++r)
    for (int step = 0; step < kLoopSteps; ++step) {
      EXPECT_LT(testing::rel_error(graphed[r][step], want[step]), 1e-2) << "rank " << r << " step " << step;
      EXPECT_EQ(testing::max_abs_diff(graphed[r][step], eager[r][step]), 0.0) << "rank " << r << " step " << step;
    }
}

// Ranks that load their slices from the checkpoint (LayerWeights::load with a HeadShard) run bit for bit what ranks
// slicing the whole layer run: v3-tiny, and an F32 checkpoint with attention_bias (o_proj's bias, which the slice
// of rank 1 holds as zeros, is added once after the all-reduce on every rank: o_bias_layer).
TEST(TensorParallel, RanksLoadingTheirSlicesEqualRanksSlicingTheLayer) {
  SKIP_WITHOUT_GPU();
  {
    const int zero[] = {0};
    std::vector<Communicator> one = Communicator::local(zero);
    LayerOptions o;
    o.device = "cuda";
    o.communicator = &one[0];
    check(cudaSetDevice(0));
    const LayerWeights s = LayerWeights::load(testing::golden_dir("v3-tiny"), 0, HeadShard{1, 2});
    testing::expect_throw_with<InvalidArgument>([&] { Attention(s, o); }, {"rank 1 of 2", "rank 0 of 1"});
  }
  SKIP_WITHOUT_GPUS(2);
  const testing::TempDir tmp("tp_bias");
  {
    Config c = testing::small_config(64, 4, 0, 32, 16, 16, 16, /*yarn=*/false);
    c.attention_bias = true;
    const LayerWeights w = LayerWeights::random(c, 9);
    const std::string p = "model.layers.0.self_attn.";
    auto m = [&](const std::string& name, const Matrix& x) {
      return TensorToWrite{p + name, DType::F32, {x.rows, x.cols}, x.data.data()};
    };
    auto v = [&](const std::string& name, const std::vector<float>& x) {
      return TensorToWrite{p + name, DType::F32, {static_cast<int64_t>(x.size())}, x.data()};
    };
    const std::vector<TensorToWrite> tensors = {
        m("q_proj.weight", w.q_proj),       v("q_proj.bias", w.q_bias),
        m("kv_a_proj_with_mqa.weight", w.kv_a_proj), v("kv_a_proj_with_mqa.bias", w.kv_a_bias),
        v("kv_a_layernorm.weight", w.kv_a_norm),     m("kv_b_proj.weight", w.kv_b_proj),
        m("o_proj.weight", w.o_proj),       v("o_proj.bias", w.o_bias)};
    write_safetensors(tmp.path() / "model.safetensors", tensors);
    std::ofstream(tmp.path() / "config.json")
        << R"({"hidden_size": 64, "num_attention_heads": 4, "q_lora_rank": null, "kv_lora_rank": 32,
              "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "attention_bias": true})";
  }
  for (const std::filesystem::path& dir : {testing::golden_dir("v3-tiny"), tmp.path()}) {
    const LayerWeights whole = LayerWeights::load(dir);
    const std::vector<LayerWeights> slices = {LayerWeights::load(dir, 0, HeadShard{0, 2}),
                                              LayerWeights::load(dir, 0, HeadShard{1, 2})};
    const int64_t B = 2, T = 12;
    const std::vector<float> hidden =
        testing::random_values(static_cast<size_t>(B * T * whole.config.hidden_size), 4);
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      SCOPED_TRACE(dir.string() + " " + std::string(precision_name(pr)));
      LayerOptions o;
      o.device = "cuda";
      o.precision = pr;
      const RunOptions run = decode_run(T / 2);
      const std::vector<RunResult> want = tensor_parallel_run(whole, o, 2, hidden.data(), nullptr, B, T, run);
      const std::vector<RunResult> got = tensor_parallel_run(
          [&](int r) -> const LayerWeights& { return slices[static_cast<size_t>(r)]; }, o, 2, hidden.data(), nullptr,
          B, T, run);
      for (size_t r = 0; r < 2; ++r) {
        EXPECT_EQ(got[r].output, want[r].output) << "rank " << r;
        EXPECT_EQ(got[r].latent, want[r].latent) << "rank " << r;
      }
    }
  }
}

// The ranks simulated on one device, no NCCL: the shards' outputs summed equal the layer's.
TEST(TensorParallel, ShardsOnOneDeviceSumToTheLayer) {
  SKIP_WITHOUT_GPU();
  check(cudaSetDevice(0));
  Config c = Config::preset("v3");
  c.hidden_size = 256, c.num_heads = 8, c.q_lora_rank = 96;
  const LayerWeights w = LayerWeights::random(c, 5);
  const int64_t B = 2, T = 40;
  const std::vector<float> hidden = testing::random_values(static_cast<size_t>(B * T * c.hidden_size), 3);
  LayerOptions o;
  o.device = "cuda";
  const RunOptions run = decode_run(T - 4);
  for (Precision pr : {Precision::F32, Precision::BF16}) {
    o.precision = pr;
    Attention whole(w, o);
    const RunResult want = run_sequences(whole, hidden.data(), nullptr, B, T, run);
    for (int64_t world : {2, 4}) {
      std::vector<float> sum(want.output.size(), 0.f);
      for (int64_t r = 0; r < world; ++r) {
        Attention shard(w.shard_heads(r, world), o);
        const RunResult part = run_sequences(shard, hidden.data(), nullptr, B, T, run);
        for (size_t i = 0; i < sum.size(); ++i) sum[i] += part.output[i];
        EXPECT_EQ(part.latent, want.latent);
      }
      EXPECT_LT(testing::rel_error(sum, want.output), pr == Precision::F32 ? 1e-5 : 2e-2)
          << precision_name(pr) << " world " << world;
    }
  }
}

}  // namespace
}  // namespace mla
