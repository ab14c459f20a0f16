// Multi-GPU arithmetic that needs no GPU (tests/test_nccl.cpp runs it over NCCL):
// - tensor parallelism over heads without a transport (LayerWeights::shard_heads): the per-rank layers' outputs
//   summed equal the whole layer's, on prefill and on decode steps after it, every rank's cache rows are the
//   whole layer's bit for bit, and head counts that do not divide are refused by name;
// - context parallelism: merge_attention of the decodes over each rank's pages equals the decode over the whole
//   cache (round-robin and contiguous pages, 2 to 4 ranks, empty shares and empty sequences), its handling of
//   parts that saw no key and of NaN, and its validation;
// - a build without CUDA says so when asked for a communicator.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mla/parallel.hpp"
#include "split_cache.hpp"
#include "testing.hpp"

namespace mla {
namespace {

using testing::rel_error;

std::vector<float> run(Attention& layer, LatentCache& cache, SeqId id, const float* hidden, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n * layer.config().hidden_size));
  const SequenceChunk chunk[] = {{id, n, nullptr}};
  layer.forward(chunk, hidden, out.data(), cache);
  return out;
}

void check_ranks_sum_to_layer(const Config& config, const char* device, Precision precision, int64_t world) {
  SCOPED_TRACE(std::string(device) + " " + std::string(precision_name(precision)) + " world " + std::to_string(world));
  const LayerWeights w = LayerWeights::random(config, 17);
  LayerOptions o;
  o.device = device, o.precision = precision;
  Attention whole(w, o);
  std::vector<Attention> ranks;
  for (int64_t r = 0; r < world; ++r) ranks.emplace_back(w.shard_heads(r, world), o);
  LatentCache whole_cache = whole.make_cache(16, 16);
  std::vector<LatentCache> rank_caches;
  for (Attention& a : ranks) rank_caches.push_back(a.make_cache(16, 16));
  const SeqId id = whole_cache.add_sequence();
  for (LatentCache& c : rank_caches) ASSERT_EQ(c.add_sequence(), id);

  const int64_t D = config.hidden_size, prefill = 37;
  const std::vector<float> hidden = testing::random_values(static_cast<size_t>((prefill + 3) * D), 5);
  for (int64_t begin = 0, n = prefill; begin < prefill + 3; begin += n, n = 1) {  // prefill, then 3 decode steps
    const std::vector<float> want = run(whole, whole_cache, id, hidden.data() + begin * D, n);
    std::vector<float> sum(want.size(), 0.f);
    for (int64_t r = 0; r < world; ++r) {
      const std::vector<float> part =
          run(ranks[static_cast<size_t>(r)], rank_caches[static_cast<size_t>(r)], id, hidden.data() + begin * D, n);
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    EXPECT_LT(rel_error(sum, want), precision == Precision::F32 ? 1e-5 : 2e-2) << "tokens from " << begin;
  }
  const std::vector<float> rows = whole_cache.read_rows(id, 0, prefill + 3);
  for (const LatentCache& c : rank_caches) EXPECT_TRUE(c.read_rows(id, 0, prefill + 3) == rows) << "cache rows differ";
}

TEST(TensorParallel, RankOutputsSumToTheLayer) {
  Config c = testing::small_config(48, 6, 24, 16, 8, 8, 12);
  for (int64_t world : {2, 3, 6}) check_ranks_sum_to_layer(c, "cpu-reference", Precision::F32, world);
  check_ranks_sum_to_layer(c, "cpu", Precision::F32, 2);
  check_ranks_sum_to_layer(c, "cpu", Precision::BF16, 3);
  c = testing::small_config(40, 4, 0, 16, 8, 8, 12, /*yarn=*/false);  // q_proj, biases (o_proj's once)
  c.attention_bias = true;
  check_ranks_sum_to_layer(c, "cpu-reference", Precision::F32, 4);
  check_ranks_sum_to_layer(c, "cpu", Precision::F32, 2);
}

TEST(TensorParallel, ShardsAreSlicesOfTheCheckpointTensors) {
  Config c = testing::small_config(32, 4, 0, 16, 8, 8, 12, /*yarn=*/false);
  c.attention_bias = true;
  const LayerWeights w = LayerWeights::random(c, 3);
  const LayerWeights s = w.shard_heads(1, 2);  // heads 2 and 3
  const int64_t dqk = 16, dkv = 20, dv = 12;
  EXPECT_EQ(s.config.num_heads, 2);
  EXPECT_EQ(s.q_proj.data[0], w.q_proj.data[2 * dqk * w.q_proj.cols]);
  EXPECT_EQ(s.q_bias[0], w.q_bias[2 * dqk]);
  EXPECT_EQ(s.kv_b_proj.data[0], w.kv_b_proj.data[2 * dkv * w.kv_b_proj.cols]);
  EXPECT_EQ(s.o_proj.cols, 2 * dv);
  EXPECT_EQ(s.o_proj.data[5 * s.o_proj.cols + 1], w.o_proj.data[5 * w.o_proj.cols + 2 * dv + 1]);
  EXPECT_EQ(s.kv_a_proj.data, w.kv_a_proj.data);
  EXPECT_EQ(s.o_bias, std::vector<float>(w.o_bias.size(), 0.f)) << "o_proj's bias belongs to rank 0";
  EXPECT_EQ(w.shard_heads(0, 2).o_bias, w.o_bias);
}

TEST(TensorParallel, RefusesWhatDoesNotDivideByName) {
  const LayerWeights w = LayerWeights::random(testing::small_config(32, 6, 16, 16, 8, 8, 8), 1);
  testing::expect_throw_with<InvalidArgument>([&] { w.shard_heads(0, 4); }, {"num_heads 6", "4 ranks"});
  testing::expect_throw_with<InvalidArgument>([&] { w.shard_heads(2, 2); }, {"rank 2", "[0, 2)"});
  testing::expect_throw_with<InvalidArgument>([&] { w.shard_heads(0, 0); }, {"world size"});
}

// ---- context parallelism: the merge ----

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Decodes every rank's share of c on `device`, merges the shares, and compares with the decode of the whole cache.
void merge_equals_whole(const std::string& device, testing::SplitCache& c) {
  const int64_t rows = c.rows(), dv = c.head_dim_v;
  const DType dt = c.q.dtype;
  testing::Typed whole(dt, static_cast<size_t>(rows * dv));
  std::vector<float> whole_lse(static_cast<size_t>(rows));
  DecodeParams p = c.params();
  p.out = whole.data(), p.lse = whole_lse.data();
  decode_attention(device, p);

  testing::Typed parts(dt, static_cast<size_t>(c.world * rows * dv));
  std::vector<float> part_lse(static_cast<size_t>(c.world * rows));
  for (int64_t r = 0; r < c.world; ++r) {
    DecodeParams pr = c.params(r);
    pr.out = static_cast<char*>(parts.data()) + r * rows * dv * dtype_size(dt);
    pr.lse = part_lse.data() + r * rows;
    decode_attention(device, pr);
  }
  testing::Typed merged(dt, static_cast<size_t>(rows * dv));
  std::vector<float> merged_lse(static_cast<size_t>(rows));
  MergeParams m;
  m.parts = c.world, m.batch = c.batch, m.s_q = c.s_q, m.h_q = c.h_q, m.head_dim_v = dv, m.dtype = dt;
  m.out_parts = parts.data(), m.lse_parts = part_lse.data(), m.out = merged.data(), m.lse = merged_lse.data();
  merge_attention(device, m);

  // bf16: every share's output is rounded before the merge rounds again (about one bf16 ulp more).
  EXPECT_LT(rel_error(merged.read(), whole.read()), dt == DType::F32 ? 2e-6 : 1e-2);
  for (size_t i = 0; i < whole_lse.size(); ++i) {
    if (std::isinf(whole_lse[i]))
      EXPECT_EQ(merged_lse[i], kInf) << "lse[" << i << "]";  // an empty sequence
    else
      EXPECT_NEAR(merged_lse[i], whole_lse[i], 2e-5 * std::max(1.f, std::fabs(whole_lse[i]))) << "lse[" << i << "]";
  }
  const std::vector<float> out = merged.read();
  for (int64_t b = 0; b < c.batch; ++b)
    if (c.lens[b] == 0)
      for (int64_t j = 0; j < c.s_q * c.h_q * dv; ++j)
        ASSERT_EQ(out[b * c.s_q * c.h_q * dv + j], 0.f) << "sequence " << b;
}

TEST(MergeAttention, SharesOfACacheMergeToTheWholeDecode) {
  // Lengths: empty, shorter than a page (one rank holds all of it), page multiples, ragged tails.
  const std::vector<int32_t> lens{0, 5, 16, 33, 100, 64, 47};
  for (const std::string device : {"cpu", "cpu-reference"})
    for (DType dt : {DType::F32, DType::BF16})
      for (testing::Split split : {testing::Split::RoundRobinPages, testing::Split::ContiguousPages})
        for (int64_t world : {2, 3, 4})
          for (int64_t s_q : {1, 2}) {
            SCOPED_TRACE(device + " " + std::string(dtype_name(dt)) +
                         (split == testing::Split::RoundRobinPages ? " round-robin" : " contiguous") + " world " +
                         std::to_string(world) + " s_q " + std::to_string(s_q));
            testing::SplitCache c = testing::make_split_cache(dt, 5, s_q, 72, 64, 16, lens, world, split, 7 + world);
            if (split == testing::Split::RoundRobinPages)  // the fixture's shares are the library's
              for (int64_t r = 0; r < world; ++r)
                for (int64_t b = 0; b < c.batch; ++b)
                  ASSERT_EQ(c.rank_lens[r][b], context_parallel_length(c.lens[b], 16, r, world));
            merge_equals_whole(device, c);
          }
}

TEST(MergeAttention, V3HeadDims) {
  testing::SplitCache c = testing::make_split_cache(DType::BF16, 16, 1, 576, 512, 64, {300, 1, 129, 0}, 2,
                                                    testing::Split::RoundRobinPages, 3);
  merge_equals_whole("cpu", c);
}

TEST(MergeAttention, PartsThatSawNoKeyAreNotRead) {
  // Three parts, four rows, head_dim_v 2. Part outputs of parts with an infinite lse hold NaN: never read.
  const int64_t rows = 4, dv = 2;
  const std::vector<float> lse{
      1.f,  -kInf, kInf, kNaN,  // part 0
      kInf, -kInf, 2.f,  0.f,   // part 1
      0.5f, kInf,  kInf, 0.f,   // part 2
  };
  const std::vector<float> out{
      1,    2,    kNaN, kNaN, kNaN, kNaN, 3, 3,  // part 0
      kNaN, kNaN, kNaN, kNaN, 4,    -4,   5, 5,  // part 1
      -1,   0,    kNaN, kNaN, kNaN, kNaN, 6, 6,  // part 2
  };
  std::vector<float> got(rows * dv, -7.f), got_lse(rows, -7.f);
  MergeParams m;
  m.parts = 3, m.batch = rows, m.h_q = 1, m.head_dim_v = dv, m.dtype = DType::F32;
  m.out_parts = out.data(), m.lse_parts = lse.data(), m.out = got.data(), m.lse = got_lse.data();
  for (const std::string device : {"cpu", "cpu-reference"}) {
    merge_attention(device, m);
    // row 0: parts 0 and 2
    const double w0 = 1 / (1 + std::exp(-0.5)), w2 = 1 - w0;
    EXPECT_NEAR(got[0], w0 * 1 + w2 * -1, 1e-6);
    EXPECT_NEAR(got[1], w0 * 2, 1e-6);
    EXPECT_NEAR(got_lse[0], 1 + std::log(1 + std::exp(-0.5)), 1e-6);
    // row 1: no part saw a key (−inf and +inf mixed): zeros and decode_attention's +inf
    EXPECT_EQ(got[2], 0.f);
    EXPECT_EQ(got[3], 0.f);
    EXPECT_EQ(got_lse[1], kInf);
    // row 2: one part: its output and lse as they were
    EXPECT_EQ(got[4], 4.f);
    EXPECT_EQ(got[5], -4.f);
    EXPECT_EQ(got_lse[2], 2.f);
    // row 3: a NaN lse is not hidden
    EXPECT_TRUE(std::isnan(got[6]) && std::isnan(got[7]) && std::isnan(got_lse[3]));
  }
}

TEST(MergeAttention, RejectsBadParametersByName) {
  std::vector<float> parts(2 * 3 * 4), lse(2 * 3), out(3 * 4);
  MergeParams m;
  m.parts = 2, m.batch = 3, m.h_q = 1, m.head_dim_v = 4, m.dtype = DType::F32;
  m.out_parts = parts.data(), m.lse_parts = lse.data(), m.out = out.data();
  merge_attention("cpu", m);  // the valid fixture runs
  auto expect = [&](MergeParams bad, std::initializer_list<std::string> words) {
    testing::expect_throw_with<InvalidArgument>([&] { merge_attention("cpu", bad); }, words);
  };
  MergeParams b = m;
  b.parts = 0;
  expect(b, {"merge_attention", "parts"});
  b = m, b.head_dim_v = 0;
  expect(b, {"head_dim_v"});
  b = m, b.dtype = DType::I32;
  expect(b, {"dtype"});
  b = m, b.lse_parts = nullptr;
  expect(b, {"lse_parts", "null"});
  b = m, b.out = parts.data() + 4;
  expect(b, {"out must not overlap out_parts"});
}

TEST(ContextParallel, RoundRobinPagesShareEveryToken) {
  for (int64_t page : {1, 16, 64})
    for (int64_t world : {1, 2, 3, 8})
      for (int64_t L : {0, 1, 15, 16, 17, 64, 129, 1000, 4096}) {
        int64_t sum = 0;
        for (int64_t r = 0; r < world; ++r) {
          int64_t owned = 0;  // brute force: the tokens of the pages j with j % world == r
          for (int64_t t = 0; t < L; ++t) owned += (t / page) % world == r;
          EXPECT_EQ(context_parallel_length(L, page, r, world), owned) << L << " " << page << " " << r << "/" << world;
          sum += owned;
        }
        EXPECT_EQ(sum, L);
      }
  testing::expect_throw_with<InvalidArgument>([] { context_parallel_length(5, 16, 2, 2); }, {"rank 2", "[0, 2)"});
  testing::expect_throw_with<InvalidArgument>([] { context_parallel_length(5, 16, 0, 0); }, {"world size"});
}

#ifdef MLA_TEST_WITH_CUDA
TEST(Communicator, NoGpuSaysSo) {
  const std::vector<std::string> devices = available_devices();
  if (std::find(devices.begin(), devices.end(), "cuda") != devices.end()) GTEST_SKIP() << "this machine has a GPU";
  const int zero[] = {0};
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::local(zero); },
                                              {"device 0 does not exist", "0 usable GPUs"});
}
#else
TEST(Communicator, ABuildWithoutCudaSaysSo) {
  const int devices[] = {0};
  testing::expect_throw_with<Error>([&] { Communicator::local(devices); },
                                    {"no CUDA support", "NCCL", "MLA_WITH_CUDA"});
  testing::expect_throw_with<Error>([&] { Communicator::wrap(nullptr); }, {"no CUDA support"});
  testing::expect_throw_with<Error>([&] { Communicator::group_start(); }, {"no CUDA support"});
}
#endif

TEST(TensorParallel, LayerWithACommunicatorNeedsCuda) {
  // No communicator can exist without CUDA, but the layer's check comes first: a reference to any address will do.
  const LayerWeights w = LayerWeights::random(testing::small_config(32, 4, 16, 16, 8, 8, 8), 1);
  LayerOptions o;
  o.device = "cpu";
  o.communicator = reinterpret_cast<const Communicator*>(&w);
  testing::expect_throw_with<InvalidArgument>([&] { Attention(w, o); }, {"tensor parallelism", "cuda", "cpu"});
}

}  // namespace
}  // namespace mla
