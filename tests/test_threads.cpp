// One Attention shared by several threads, each with its own cache: the contract in mla/attention.hpp. Every
// thread's outputs, cache rows and paths must equal, bit for bit, those of the same calls made serially. Small
// shapes so that the test stays fast under ThreadSanitizer; contexts stay below one key block (256) so that the
// fast backend's split-KV merge order, and with it every bit, does not depend on thread timing.
#include <gtest/gtest.h>

#include <cstring>
#include <latch>
#include <thread>
#include <vector>

#include "testing.hpp"

namespace mla {
namespace {

constexpr int kThreads = 4;

struct Calls {
  std::vector<float> out;   // every call's output, concatenated
  std::vector<float> rows;  // the cache rows of both sequences at the end
  std::vector<std::vector<Path>> paths;
};

// Per call: tokens for sequences a and b. A prefill, decode steps (absorbed) and a chunk with an empty chunk.
constexpr int64_t kRounds[][2] = {{6, 3}, {1, 1}, {1, 1}, {4, 0}, {1, 2}};

// The calls of thread `who`, in a cache of its own, on inputs of its own.
Calls run_calls(Attention& layer, int who) {
  const int64_t D = layer.config().hidden_size;
  LatentCache cache = layer.make_cache(8, 4, 11 + who);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  const auto hidden = testing::random_values(64 * static_cast<size_t>(D), 700 + who);
  Calls c;
  int64_t used = 0;
  for (const auto& r : kRounds) {
    const SequenceChunk batch[] = {{a, r[0], nullptr}, {b, r[1], nullptr}};
    std::vector<float> out(static_cast<size_t>((r[0] + r[1]) * D));
    c.paths.push_back(layer.forward(batch, hidden.data() + used * D, out.data(), cache));
    c.out.insert(c.out.end(), out.begin(), out.end());
    used += r[0] + r[1];
  }
  for (SeqId s : {a, b}) {
    const auto rows = cache.read_rows(s, 0, cache.length(s));
    c.rows.insert(c.rows.end(), rows.begin(), rows.end());
  }
  return c;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

TEST(Threads, OneLayerManyCachesMatchesSerial) {
  const LayerWeights w = LayerWeights::random(testing::small_config(32, 2, 16, 16, 8, 8, 8), 29);
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr));
      Attention layer(w, {.device = dev, .precision = pr});
      std::vector<Calls> serial;
      for (int t = 0; t < kThreads; ++t) serial.push_back(run_calls(layer, t));
      ASSERT_FALSE(same_bits(serial[0].out, serial[1].out));  // the threads' work differs
      for (int rep = 0; rep < 2; ++rep) {
        std::vector<Calls> got(kThreads);
        std::latch start(kThreads);  // all threads enter forward() together
        std::vector<std::thread> pool;
        for (int t = 0; t < kThreads; ++t)
          pool.emplace_back([&, t] {
            start.arrive_and_wait();
            got[t] = run_calls(layer, t);
          });
        for (std::thread& th : pool) th.join();
        for (int t = 0; t < kThreads; ++t) {
          SCOPED_TRACE(::testing::Message() << "thread " << t << ", repetition " << rep);
          EXPECT_TRUE(same_bits(got[t].out, serial[t].out));
          EXPECT_TRUE(same_bits(got[t].rows, serial[t].rows));
          EXPECT_EQ(got[t].paths, serial[t].paths);
        }
      }
      // last_paths() is one whole call's (every thread's last call has the same paths).
      EXPECT_EQ(layer.last_paths(), serial[0].paths.back());
    }
}

// The paths a call returns are its own even while other threads' calls, with other paths, run on the layer.
TEST(Threads, ReturnedPathsAreEachCallsOwn) {
  const LayerWeights w = LayerWeights::random(testing::small_config(32, 2, 16, 16, 8, 8, 8), 31);
  Attention layer(w, {.device = "cpu", .precision = Precision::F32});
  const int64_t D = layer.config().hidden_size;
  std::vector<int> mismatches(kThreads, 0);
  std::latch start(kThreads);
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      // Even threads prefill 40 tokens per call in a fresh cache (expanded); odd ones decode one token per call
      // after an 8-token prompt (absorbed).
      const bool prefill = t % 2 == 0;
      const int64_t n = prefill ? 40 : 1;
      const auto hidden = testing::random_values(static_cast<size_t>(40 * D), 900 + t);
      std::vector<float> out(hidden.size());
      LatentCache cache = layer.make_cache(16, 4);
      const SeqId seq = cache.add_sequence();
      if (!prefill) {
        const SequenceChunk prompt[] = {{seq, 8, nullptr}};
        layer.forward(prompt, hidden.data(), out.data(), cache);
      }
      start.arrive_and_wait();
      for (int i = 0; i < 10; ++i) {
        if (prefill) cache.truncate(seq, 0);
        const Path want = choose_path(layer.config(), n, cache.length(seq) + n);
        const SequenceChunk batch[] = {{seq, n, nullptr}};
        const std::vector<Path> paths = layer.forward(batch, hidden.data(), out.data(), cache);
        mismatches[t] += paths != std::vector<Path>{want};
      }
    });
  for (std::thread& th : pool) th.join();
  // The test means something: the two kinds of thread take different paths.
  EXPECT_EQ(choose_path(layer.config(), 40, 40), Path::Expanded);
  EXPECT_EQ(choose_path(layer.config(), 1, 9), Path::Absorbed);
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

}  // namespace
}  // namespace mla
