// Multi-GPU arithmetic that needs no GPU (tests/test_nccl.cpp runs it over NCCL):
// - tensor parallelism over heads without a transport (LayerWeights::shard_heads): the per-rank layers' outputs
//   summed equal the whole layer's, on prefill and on decode steps after it, every rank's cache rows are the
//   whole layer's bit for bit, and head counts that do not divide are refused by name;
// - each rank's slice loaded straight from the checkpoint (LayerWeights::load with a HeadShard) equals
//   load().shard_heads() bit for bit (BF16, F16, F32, FP8 with slice edges inside 128-blocks; q_lora or q_proj,
//   with and without biases), and reads no byte outside the slice;
// - context parallelism: merge_attention of the decodes over each rank's pages equals the decode over the whole
//   cache (round-robin and contiguous pages, 2 to 4 ranks, empty shares and empty sequences), its handling of
//   parts that saw no key and of NaN, and its validation;
// - a build without CUDA says so when asked for a communicator.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

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

// ---- tensor parallelism: each rank loads its slice from the checkpoint files ----

namespace fs = std::filesystem;
using nlohmann::json;

// One tensor of a checkpoint being written: its dtype, shape and little-endian bytes.
struct RawTensor {
  DType dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
using RawCheckpoint = std::map<std::string, RawTensor>;

// f16 bits by truncation; values below f16's normal range flush to zero (the test compares two loads of the same
// file, so only finiteness matters).
uint16_t f16_bits(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 127 + 15;
  if (e <= 0) return sign;
  return static_cast<uint16_t>(sign | (e << 10) | ((u >> 13) & 0x3ffu));
}

template <typename T>
void append(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

std::string encode(const std::vector<float>& v, DType dt) {
  std::string out;
  for (float x : v) {
    if (dt == DType::F32) append(out, x);
    if (dt == DType::BF16) append(out, float_to_bf16(x));
    if (dt == DType::F16) append(out, f16_bits(x));
  }
  return out;
}

// The layer's tensors as a checkpoint stores them: matrices in `dt`, vectors in bf16 when dt is FP8 (as in
// DeepSeek's FP8 checkpoints). FP8 matrices get one f32 scale per 128x128 block (its largest |value| / 448).
RawCheckpoint checkpoint_tensors(const LayerWeights& w, DType dt, int64_t layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
  RawCheckpoint out;
  auto matrix = [&](const std::string& name, const Matrix& m) {
    if (m.empty()) return;
    if (dt != DType::F8_E4M3) {
      out[p + name] = {dt, {m.rows, m.cols}, encode(m.data, dt)};
      return;
    }
    const int64_t br = (m.rows + 127) / 128, bc = (m.cols + 127) / 128;
    std::vector<float> scale(static_cast<size_t>(br * bc), 0.f);
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t c = 0; c < m.cols; ++c) {
        float& s = scale[(r / 128) * bc + c / 128];
        s = std::max(s, std::fabs(m.data[r * m.cols + c]) / 448.f);
      }
    for (float& s : scale) s = s > 0.f ? s : 1.f;
    std::string q;
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t c = 0; c < m.cols; ++c)
        q.push_back(static_cast<char>(float_to_fp8_e4m3(m.data[r * m.cols + c] / scale[(r / 128) * bc + c / 128])));
    out[p + name] = {DType::F8_E4M3, {m.rows, m.cols}, q};
    out[p + name + "_scale_inv"] = {DType::F32, {br, bc}, encode(scale, DType::F32)};
  };
  const DType vdt = dt == DType::F8_E4M3 ? DType::BF16 : dt;
  auto vector = [&](const std::string& name, const std::vector<float>& v) {
    if (!v.empty()) out[p + name] = {vdt, {static_cast<int64_t>(v.size())}, encode(v, vdt)};
  };
  matrix("q_proj.weight", w.q_proj);
  matrix("q_a_proj.weight", w.q_a_proj);
  vector("q_a_layernorm.weight", w.q_a_norm);
  matrix("q_b_proj.weight", w.q_b_proj);
  matrix("kv_a_proj_with_mqa.weight", w.kv_a_proj);
  vector("kv_a_layernorm.weight", w.kv_a_norm);
  matrix("kv_b_proj.weight", w.kv_b_proj);
  matrix("o_proj.weight", w.o_proj);
  vector(w.config.has_q_lora() ? "q_a_proj.bias" : "q_proj.bias", w.q_bias);
  vector("kv_a_proj_with_mqa.bias", w.kv_a_bias);
  vector("o_proj.bias", w.o_bias);
  return out;
}

void write_checkpoint(const fs::path& dir, const Config& c, const RawCheckpoint& tensors) {
  fs::create_directories(dir);
  const json config = {{"hidden_size", c.hidden_size},         {"num_attention_heads", c.num_heads},
                       {"q_lora_rank", c.q_lora_rank ? json(c.q_lora_rank) : json(nullptr)},
                       {"kv_lora_rank", c.kv_lora_rank},       {"qk_nope_head_dim", c.qk_nope_head_dim},
                       {"qk_rope_head_dim", c.qk_rope_head_dim}, {"v_head_dim", c.v_head_dim},
                       {"num_hidden_layers", c.num_layers},    {"attention_bias", c.attention_bias},
                       {"rope_scaling", nullptr}};
  std::ofstream(dir / "config.json") << config.dump();
  json header = json::object();
  std::string data;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", dtype_name(t.dtype)},
                    {"shape", t.shape},
                    {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  const std::string h = header.dump();
  std::string file;
  append(file, static_cast<uint64_t>(h.size()));
  std::ofstream(dir / "model.safetensors", std::ios::binary) << file + h + data;
}

// Bit for bit, every field a rank's weights have.
void expect_identical(const LayerWeights& got, const LayerWeights& want) {
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  };
  auto same_matrix = [&](const Matrix& a, const Matrix& b) {
    return a.rows == b.rows && a.cols == b.cols && same(a.data, b.data);
  };
  EXPECT_EQ(got.config.num_heads, want.config.num_heads);
  EXPECT_EQ(got.config.hidden_size, want.config.hidden_size);
  EXPECT_EQ(got.layer, want.layer);
  EXPECT_EQ(got.heads.rank, want.heads.rank);
  EXPECT_EQ(got.heads.world, want.heads.world);
  EXPECT_TRUE(same_matrix(got.q_proj, want.q_proj)) << "q_proj";
  EXPECT_TRUE(same_matrix(got.q_a_proj, want.q_a_proj)) << "q_a_proj";
  EXPECT_TRUE(same(got.q_a_norm, want.q_a_norm)) << "q_a_norm";
  EXPECT_TRUE(same_matrix(got.q_b_proj, want.q_b_proj)) << "q_b_proj";
  EXPECT_TRUE(same_matrix(got.kv_a_proj, want.kv_a_proj)) << "kv_a_proj";
  EXPECT_TRUE(same(got.kv_a_norm, want.kv_a_norm)) << "kv_a_norm";
  EXPECT_TRUE(same_matrix(got.kv_b_proj, want.kv_b_proj)) << "kv_b_proj";
  EXPECT_TRUE(same_matrix(got.o_proj, want.o_proj)) << "o_proj";
  EXPECT_TRUE(same(got.q_bias, want.q_bias)) << "q_bias";
  EXPECT_TRUE(same(got.kv_a_bias, want.kv_a_bias)) << "kv_a_bias";
  EXPECT_TRUE(same(got.o_bias, want.o_bias)) << "o_bias";
  EXPECT_TRUE(same(got.o_bias_layer, want.o_bias_layer)) << "o_bias_layer";
}

// Every rank of W in {1, 2, 4} (those dividing H) loads what load().shard_heads() gives.
void expect_slices_equal_shards(const fs::path& dir, int64_t layer) {
  const LayerWeights whole = LayerWeights::load(dir, layer);
  for (int64_t world : {1, 2, 4}) {
    if (whole.config.num_heads % world != 0) continue;
    for (int64_t rank = 0; rank < world; ++rank) {
      SCOPED_TRACE("rank " + std::to_string(rank) + " of " + std::to_string(world));
      expect_identical(LayerWeights::load(dir, layer, HeadShard{rank, world}), whole.shard_heads(rank, world));
    }
  }
}

// Four heads of shapes that put the slice edges inside 128-blocks: q_b_proj [192, 144] (4 x 48 rows), kv_b_proj
// [304, 136] (4 x 76 rows), o_proj [160, 144] (4 x 36 columns; 2 x 72), all with partial edge blocks.
Config sliced_config(bool q_lora, bool bias) {
  Config c = testing::small_config(160, 4, q_lora ? 144 : 0, 136, 40, 8, 36, /*yarn=*/false);
  c.attention_bias = bias;
  c.num_layers = 2;
  return c;
}

constexpr DType kCheckpointDtypes[] = {DType::BF16, DType::F16, DType::F32, DType::F8_E4M3};

TEST(TensorParallelLoad, SlicesEqualTheShardsOfTheWholeLayer) {
  const testing::TempDir tmp("tp_load");
  for (bool q_lora : {true, false})
    for (bool bias : {false, true})
      for (DType dt : kCheckpointDtypes) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + (q_lora ? " q_lora" : " q_proj") + (bias ? " bias" : ""));
        const Config c = sliced_config(q_lora, bias);
        const fs::path dir = tmp.path() / (std::string(dtype_name(dt)) + (q_lora ? "_q" : "_p") + (bias ? "_b" : ""));
        write_checkpoint(dir, c, checkpoint_tensors(LayerWeights::random(c, 11), dt, 1));
        expect_slices_equal_shards(dir, 1);
      }
}

TEST(TensorParallelLoad, GoldenCheckpoints) {  // BF16 single files and the sharded FP8 one (index + 2 files)
  for (const std::string& name : testing::golden_cases()) {
    SCOPED_TRACE(name);
    expect_slices_equal_shards(testing::golden_dir(name), 0);
  }
}

TEST(TensorParallelLoad, Fp8SliceEdgesCutScaleBlocks) {
  // Scales chosen so that the wrong block's scale gives a wrong value: every block a different power of two.
  const Config c = sliced_config(true, false);
  LayerWeights w = LayerWeights::random(c, 5);
  RawCheckpoint t = checkpoint_tensors(w, DType::F8_E4M3, 1);
  for (auto& [name, raw] : t)
    if (name.ends_with("_scale_inv")) {
      std::vector<float> s(raw.bytes.size() / 4);
      for (size_t i = 0; i < s.size(); ++i) s[i] = std::ldexp(1.f, static_cast<int>(i) - 3);
      raw.bytes = encode(s, DType::F32);
    }
  const testing::TempDir tmp("tp_fp8");
  write_checkpoint(tmp.path(), c, t);
  expect_slices_equal_shards(tmp.path(), 1);
  // Rank 2 of 4 holds q_b_proj rows [96, 144), across the row-block edge at 128: its rows 0-31 take the scale
  // of block row 0, rows 32-47 that of block row 1.
  const LayerWeights s = LayerWeights::load(tmp.path(), 1, HeadShard{2, 4});
  const std::string& q8 = t.at("model.layers.1.self_attn.q_b_proj.weight").bytes;
  const int64_t cols = c.q_lora_rank, bc = 2;
  for (int64_t r : {0, 31, 32, 47})
    for (int64_t col : {0, 127, 128, 143}) {
      const int64_t R = 96 + r;
      const float want = fp8_e4m3_to_float(static_cast<uint8_t>(q8[R * cols + col])) *
                         std::ldexp(1.f, static_cast<int>((R / 128) * bc + col / 128) - 3);
      EXPECT_EQ(s.q_b_proj.data[r * cols + col], want) << "[" << R << ", " << col << "]";
    }
}

// The bytes outside a rank's slice are never read: with every one of them NaN (and the FP8 scale blocks the slice
// does not touch NaN too), the whole layer is refused but each rank loads what it loads from the clean file.
TEST(TensorParallelLoad, ReadsNothingOutsideTheSlice) {
  const testing::TempDir tmp("tp_poison");
  for (bool q_lora : {true, false})
    for (DType dt : kCheckpointDtypes) {
      const Config c = sliced_config(q_lora, /*bias=*/true);
      const RawCheckpoint clean = checkpoint_tensors(LayerWeights::random(c, 23), dt, 0);
      const fs::path clean_dir = tmp.path() / "clean";
      fs::remove_all(clean_dir);
      write_checkpoint(clean_dir, c, clean);
      for (int64_t world : {2, 4})
        for (int64_t rank = 0; rank < world; ++rank) {
          SCOPED_TRACE(std::string(dtype_name(dt)) + (q_lora ? " q_lora" : " q_proj") + " rank " +
                       std::to_string(rank) + " of " + std::to_string(world));
          const int64_t heads = c.num_heads / world, h0 = rank * heads;
          RawCheckpoint t = clean;
          // Row r, column col of tensor `name` is NaN unless keep(r, col); its scale block likewise unless
          // keep holds for some element of the block.
          auto poison = [&](const std::string& name, auto keep) {
            RawTensor& m = t.at("model.layers.0.self_attn." + name);
            const int64_t rows = m.shape.size() == 2 ? m.shape[0] : 1, cols = m.shape.back();
            const auto size = static_cast<size_t>(dtype_size(m.dtype));
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t col = 0; col < cols; ++col)
                if (!keep(r, col)) m.bytes.replace(static_cast<size_t>(r * cols + col) * size, size, size, '\xff');
            const auto it = t.find("model.layers.0.self_attn." + name + "_scale_inv");
            if (it == t.end()) return;
            const int64_t bc = it->second.shape[1];
            for (int64_t br = 0; br < it->second.shape[0]; ++br)
              for (int64_t b = 0; b < bc; ++b) {
                bool used = false;
                for (int64_t r = br * 128; r < std::min(rows, br * 128 + 128); ++r)
                  for (int64_t col = b * 128; col < std::min(cols, b * 128 + 128); ++col) used = used || keep(r, col);
                if (!used) it->second.bytes.replace(static_cast<size_t>(br * bc + b) * 4, 4, 4, '\xff');
              }
          };
          auto rows_of_heads = [&](int64_t per_head) {
            return [=](int64_t r, int64_t) { return r >= h0 * per_head && r < (h0 + heads) * per_head; };
          };
          const int64_t dqk = c.qk_head_dim(), dkv = c.qk_nope_head_dim + c.v_head_dim, dv = c.v_head_dim;
          if (q_lora) {
            poison("q_b_proj.weight", rows_of_heads(dqk));
          } else {
            poison("q_proj.weight", rows_of_heads(dqk));
            poison("q_proj.bias", [&](int64_t, int64_t col) { return col >= h0 * dqk && col < (h0 + heads) * dqk; });
          }
          poison("kv_b_proj.weight", rows_of_heads(dkv));
          poison("o_proj.weight", [&](int64_t, int64_t col) { return col >= h0 * dv && col < (h0 + heads) * dv; });
          const fs::path dir = tmp.path() / "poisoned";
          fs::remove_all(dir);
          write_checkpoint(dir, c, t);
          EXPECT_THROW(LayerWeights::load(dir, 0), Error);
          expect_identical(LayerWeights::load(dir, 0, HeadShard{rank, world}),
                           LayerWeights::load(clean_dir, 0, HeadShard{rank, world}));
        }
    }
}

TEST(TensorParallelLoad, NamesWhatIsWrong) {
  const fs::path dir = testing::golden_dir("v3-tiny");  // 4 heads
  testing::expect_throw_with<InvalidArgument>([&] { LayerWeights::load(dir, 0, HeadShard{2, 2}); },
                                              {"LayerWeights::load", "rank 2", "[0, 2)"});
  testing::expect_throw_with<InvalidArgument>([&] { LayerWeights::load(dir, 0, HeadShard{-1, 2}); }, {"rank -1"});
  testing::expect_throw_with<InvalidArgument>([&] { LayerWeights::load(dir, 0, HeadShard{0, 0}); },
                                              {"world size", "0"});
  testing::expect_throw_with<InvalidArgument>([&] { LayerWeights::load(dir, 0, HeadShard{0, 3}); },
                                              {"num_heads 4", "3 ranks"});
  testing::expect_throw_with<InvalidArgument>([&] { LayerWeights::load(dir, 1, HeadShard{0, 2}); }, {"layer 1"});
  testing::expect_throw_with<InvalidArgument>(
      [&] { LayerWeights::load(dir, 0, HeadShard{1, 2}).shard_heads(0, 2); }, {"rank 1 of 2 already"});

  // A NaN is named at its place in the checkpoint tensor, by the rank whose slice holds it.
  const testing::TempDir tmp("tp_nan");
  const Config c = sliced_config(true, false);
  RawCheckpoint t = checkpoint_tensors(LayerWeights::random(c, 2), DType::BF16, 0);
  const int64_t dv = c.v_head_dim;
  t.at("model.layers.0.self_attn.o_proj.weight").bytes.replace(static_cast<size_t>(7 * (4 * dv) + 3 * dv + 5) * 2, 2,
                                                               std::string("\xc0\x7f", 2));  // bf16 NaN at [7, 113]
  t.at("model.layers.0.self_attn.kv_b_proj.weight").bytes.replace(static_cast<size_t>(80 * 136 + 2) * 2, 2,
                                                                  std::string("\x80\x7f", 2));  // +inf at [80, 2]
  write_checkpoint(tmp.path(), c, t);
  testing::expect_throw_with<Error>([&] { LayerWeights::load(tmp.path(), 0, HeadShard{3, 4}); },
                                    {"o_proj.weight", "nan", "[7, 113]"});
  testing::expect_throw_with<Error>([&] { LayerWeights::load(tmp.path(), 0, HeadShard{1, 4}); },
                                    {"kv_b_proj.weight", "inf", "[80, 2]"});
  EXPECT_NO_THROW(LayerWeights::load(tmp.path(), 0, HeadShard{0, 4}));  // neither is in rank 0's slice
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
  testing::expect_throw_with<Error>([] { Communicator::unique_id(); }, {"unique_id", "no CUDA support"});
  const std::string id(Communicator::kUniqueIdBytes, '\0');
  testing::expect_throw_with<Error>([&] { Communicator::from_unique_id(id, 0, 1, 0); },
                                    {"from_unique_id", "no CUDA support"});
}
#endif

// Checked before NCCL is reached, so in every build and without a GPU.
TEST(Communicator, FromUniqueIdNamesABadArgument) {
  const std::string id(Communicator::kUniqueIdBytes, '\0');
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::from_unique_id(id, 0, 0, 0); },
                                              {"world must be >= 1", "got 0"});
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::from_unique_id(id, 2, 2, 0); },
                                              {"rank 2", "[0, 2)"});
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::from_unique_id(id, -1, 2, 0); },
                                              {"rank -1", "[0, 2)"});
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::from_unique_id(id.substr(1), 0, 1, 0); },
                                              {"id must be the 128 bytes", "got 127"});
  testing::expect_throw_with<InvalidArgument>([&] { Communicator::from_unique_id(id, 0, 1, -1); },
                                              {"device must be >= 0", "got -1"});
}

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
