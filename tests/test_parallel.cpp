// Tensor parallelism over heads without a transport (LayerWeights::shard_heads): the per-rank layers' outputs
// summed equal the whole layer's, on prefill and on decode steps after it, every rank's cache rows are the whole
// layer's bit for bit, and head counts that do not divide are refused by name. The NCCL all-reduce that would sum
// the outputs across GPUs is not built yet (issue 12); this is the arithmetic it relies on.
#include <gtest/gtest.h>

#include <string>

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

}  // namespace
}  // namespace mla
