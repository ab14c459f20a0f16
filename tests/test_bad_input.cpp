// Damaged checkpoints through LayerWeights::load, and bad calls to Attention::forward. Each case asserts the
// exception type and the words its message must hold, and that a failed forward() stored nothing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "testing.hpp"

namespace mla {
namespace {

using testing::expect_throw_with;

namespace fs = std::filesystem;
using nlohmann::json;
using testing::TempDir;


// A writable copy of a golden folder.
fs::path copy_golden(const TempDir& tmp, const std::string& name) {
  const fs::path dst = tmp.path() / name;
  fs::copy(testing::golden_dir(name), dst, fs::copy_options::recursive);
  return dst;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// A safetensors file as header JSON + data bytes.
struct Raw {
  json header;
  std::string data;
};

Raw read_raw(const fs::path& p) {
  const std::string bytes = read_text(p);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return {json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

void write_raw(const fs::path& p, const Raw& r) {
  const std::string h = r.header.dump();
  const uint64_t n = h.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  write_text(p, bytes + h + r.data);
}

const std::string kPrefix = "model.layers.0.self_attn.";

// ---------------------------------------------------------------------------------------------------------
// Checkpoints

TEST(BadCheckpoint, CopiesLoad) {  // the undamaged copies load, so every failure below is the damage's
  const TempDir tmp("ok");
  for (const char* name : {"v3-tiny", "fp8-sharded"}) EXPECT_NO_THROW(LayerWeights::load(copy_golden(tmp, name)));
}

TEST(BadCheckpoint, MissingFolder) {
  const TempDir tmp("missing");
  expect_throw_with<Error>([&] { LayerWeights::load(tmp.path() / "nope"); }, {"nope", "does not exist"});
}

TEST(BadCheckpoint, MissingConfig) {
  const TempDir tmp("noconfig");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  fs::remove(d / "config.json");
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"config.json", "cannot open"});
}

TEST(BadCheckpoint, MissingWeightsFile) {
  const TempDir tmp("noweights");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  fs::remove(d / "model.safetensors");
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors", "found neither"});
}

TEST(BadCheckpoint, TruncatedShard) {
  const TempDir tmp("trunc");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path f = d / "model.safetensors";
  const std::string bytes = read_text(f);
  write_text(f, bytes.substr(0, bytes.size() / 2));
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors", "beyond", "truncated"});
  write_text(f, bytes.substr(0, 5));
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors", "too short"});
  write_text(f, "");
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors", "empty"});
}

TEST(BadCheckpoint, TruncatedShardOfShardedCheckpoint) {
  const TempDir tmp("trunc2");
  const fs::path d = copy_golden(tmp, "fp8-sharded");
  const fs::path f = d / "model-00002-of-00002.safetensors";
  const std::string bytes = read_text(f);
  write_text(f, bytes.substr(0, bytes.size() - 100));
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model-00002-of-00002.safetensors", "beyond"});
}

TEST(BadCheckpoint, HeaderLengthBeyondFile) {
  const TempDir tmp("hlen");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path f = d / "model.safetensors";
  std::string bytes = read_text(f);
  const uint64_t huge = bytes.size();  // 8 + huge > size
  std::memcpy(bytes.data(), &huge, 8);
  write_text(f, bytes);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors", "header length", "exceeds"});
  const uint64_t giant = ~uint64_t{0};
  std::memcpy(bytes.data(), &giant, 8);
  write_text(f, bytes);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"header length", "exceeds"});
}

TEST(BadCheckpoint, OffsetsBeyondFile) {
  const TempDir tmp("offsets");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path f = d / "model.safetensors";
  Raw r = read_raw(f);
  const std::string name = kPrefix + "kv_b_proj.weight";
  auto& off = r.header[name]["data_offsets"];
  const uint64_t len = off[1].get<uint64_t>() - off[0].get<uint64_t>();
  off[0] = r.data.size() - len / 2;
  off[1] = r.data.size() - len / 2 + len;
  write_raw(f, r);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"kv_b_proj.weight", "beyond"});
  // Offsets whose span disagrees with dtype and shape.
  r = read_raw(testing::golden_dir("v3-tiny") / "model.safetensors");
  r.header[name]["data_offsets"][1] = r.header[name]["data_offsets"][1].get<uint64_t>() - 2;
  write_raw(f, r);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"kv_b_proj.weight", "bytes"});
}

TEST(BadCheckpoint, HeaderNotJson) {
  const TempDir tmp("hjson");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path f = d / "model.safetensors";
  std::string bytes = read_text(f);
  bytes[8] = '[';
  bytes[9] = '{';
  bytes[10] = '!';
  write_text(f, bytes);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors", "not valid JSON"});
}

TEST(BadCheckpoint, ConfigNotJson) {
  const TempDir tmp("cjson");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  std::string text = read_text(d / "config.json");
  write_text(d / "config.json", text.substr(0, text.size() / 2));
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"config.json", "JSON"});
}

TEST(BadCheckpoint, ConfigDisagreesWithShapes) {
  const TempDir tmp("shapes");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const json orig = json::parse(read_text(d / "config.json"));
  struct Edit {
    const char* key;
    int64_t value;
    const char* tensor;   // the first tensor whose shape no longer fits
  };
  for (const Edit& e : {Edit{"hidden_size", 255, "q_a_proj.weight"}, Edit{"kv_lora_rank", 64, "kv_a_proj_with_mqa.weight"},
                        Edit{"num_attention_heads", 3, "q_b_proj.weight"}, Edit{"v_head_dim", 48, "kv_b_proj.weight"},
                        Edit{"q_lora_rank", 90, "q_a_proj.weight"}}) {
    SCOPED_TRACE(e.key);
    json j = orig;
    j[e.key] = e.value;
    write_text(d / "config.json", j.dump());
    expect_throw_with<Error>([&] { LayerWeights::load(d); }, {e.tensor, "shape", "config"});
  }
  // q_lora_rank null: the loader then wants q_proj, which this checkpoint does not have.
  json j = orig;
  j["q_lora_rank"] = nullptr;
  write_text(d / "config.json", j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"q_proj.weight", "no tensor"});
}

TEST(BadCheckpoint, MissingTensorSingleFile) {
  const TempDir tmp("missing_t");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  Raw r = read_raw(d / "model.safetensors");
  // Renamed, not erased: its bytes must still belong to a tensor (the format allows no holes).
  r.header[kPrefix + "kv_a_layernorm.renamed"] = r.header[kPrefix + "kv_a_layernorm.weight"];
  r.header.erase(kPrefix + "kv_a_layernorm.weight");
  write_raw(d / "model.safetensors", r);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"kv_a_layernorm.weight", "no tensor"});
}

TEST(BadCheckpoint, ShardedIndexDamage) {
  const TempDir tmp("index");
  const fs::path d = copy_golden(tmp, "fp8-sharded");
  const fs::path idx = d / "model.safetensors.index.json";
  const json orig = json::parse(read_text(idx));
  const std::string kvb = kPrefix + "kv_b_proj.weight";
  ASSERT_EQ(orig["weight_map"][kvb], "model-00002-of-00002.safetensors");

  // A tensor left out of the index.
  json j = orig;
  j["weight_map"].erase(kvb);
  write_text(idx, j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"kv_b_proj.weight", "not listed", "index"});

  // A tensor pointed at the wrong shard.
  j = orig;
  j["weight_map"][kvb] = "model-00001-of-00002.safetensors";
  write_text(idx, j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); },
                           {"kv_b_proj.weight", "model-00001-of-00002.safetensors", "lists it there"});

  // A tensor pointed at a shard that does not exist.
  j = orig;
  j["weight_map"][kvb] = "model-00003-of-00002.safetensors";
  write_text(idx, j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"kv_b_proj.weight", "model-00003-of-00002", "missing"});

  // An FP8 weight without its block scales.
  j = orig;
  j["weight_map"].erase(kvb + "_scale_inv");
  write_text(idx, j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"kv_b_proj.weight_scale_inv"});

  // The index itself broken.
  write_text(idx, "{\"weight_map\": ");
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"model.safetensors.index.json", "JSON"});
  write_text(idx, "{\"metadata\": {}}");
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"weight_map"});
}

TEST(BadCheckpoint, ScaleShapeWrong) {
  const TempDir tmp("scale");
  const fs::path d = copy_golden(tmp, "fp8-sharded");
  const json idx = json::parse(read_text(d / "model.safetensors.index.json"));
  const std::string name = kPrefix + "o_proj.weight_scale_inv";
  const fs::path shard = d / idx["weight_map"][name].get<std::string>();
  Raw r = read_raw(shard);
  auto& e = r.header[name];
  const auto shape = e["shape"].get<std::vector<int64_t>>();
  ASSERT_EQ(shape.size(), 2u);
  ASSERT_GT(shape[0] * shape[1], 1);
  // Same bytes, a flat shape.
  e["shape"] = std::vector<int64_t>{shape[0] * shape[1]};
  write_raw(shard, r);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"o_proj.weight_scale_inv", "shape"});
}

TEST(BadCheckpoint, LayerOutOfRange) {
  const fs::path d = testing::golden_dir("v3-tiny");
  expect_throw_with<InvalidArgument>([&] { LayerWeights::load(d, 1); }, {"layer 1", "out of range", "num_hidden_layers"});
  expect_throw_with<InvalidArgument>([&] { LayerWeights::load(d, -1); }, {"out of range"});
  // A config that claims more layers than the file holds: layer 3 has no tensors.
  const TempDir tmp("layers");
  const fs::path c = copy_golden(tmp, "v3-tiny");
  json j = json::parse(read_text(c / "config.json"));
  j["num_hidden_layers"] = 4;
  write_text(c / "config.json", j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(c, 3); }, {"model.layers.3.self_attn", "no tensor"});
}

// ---------------------------------------------------------------------------------------------------------
// forward()

struct SmallLayer {
  Config cfg = testing::small_config(32, 3, 24, 16, 8, 8, 8);
  LayerWeights w = LayerWeights::random(cfg, 41);
  int64_t D = cfg.hidden_size;
};

// A layer with one sequence of 5 stored tokens; `check` confirms a failed call changed nothing.
struct Fixture {
  Attention layer;
  LatentCache cache;
  SeqId a, b;
  std::vector<float> rows;
  int64_t free_pages;

  Fixture(const LayerWeights& w, const char* dev, Precision pr)
      : layer(w, [&] {
          LayerOptions o;
          o.device = dev;
          o.precision = pr;
          return o;
        }()),
        cache(layer.make_cache(6, 4, 3)) {
    a = cache.add_sequence();
    b = cache.add_sequence();
    const auto h = testing::random_values(static_cast<size_t>(5 * w.config.hidden_size), 4);
    std::vector<float> out(h.size());
    const SequenceChunk c[] = {{a, 5, nullptr}};
    layer.forward(c, h.data(), out.data(), cache);
    rows = cache.read_rows(a, 0, 5);
    free_pages = cache.pages_free();
  }

  void check_unchanged() const {
    EXPECT_EQ(cache.length(a), 5);
    EXPECT_EQ(cache.length(b), 0);
    EXPECT_EQ(cache.pages_free(), free_pages);
    EXPECT_EQ(cache.capacity(a), 8);
    EXPECT_EQ(cache.capacity(b), 0);
    EXPECT_EQ(cache.read_rows(a, 0, 5), rows);
  }
};

TEST(BadForward, NonFiniteHidden) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity()}) {
        SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr) << " " << bad);
        Fixture f(s.w, dev, pr);
        auto h = testing::random_values(static_cast<size_t>(7 * s.D), 5);
        h[5 * s.D + 3] = bad;  // in the second chunk: the first chunk must not be stored either
        std::vector<float> out(h.size());
        const SequenceChunk c[] = {{f.a, 2, nullptr}, {f.b, 5, nullptr}};
        expect_throw_with<InvalidArgument>([&] { f.layer.forward(c, h.data(), out.data(), f.cache); },
                                           {"not finite", "nothing was stored"});
        f.check_unchanged();
        // The layer and cache are still usable.
        h[5 * s.D + 3] = 0.f;
        f.layer.forward(c, h.data(), out.data(), f.cache);
        EXPECT_EQ(f.cache.length(f.a), 7);
        EXPECT_EQ(f.cache.length(f.b), 5);
      }
}

TEST(BadForward, FailedCallKeepsPagesReservedBeforehand) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"}) {
    SCOPED_TRACE(dev);
    Fixture f(s.w, dev, Precision::F32);
    const SeqId ids[] = {f.b};
    const int64_t extra[] = {4};
    f.cache.reserve(ids, extra);  // one page held by the caller for b
    const int64_t free_pages = f.cache.pages_free();
    auto h = testing::random_values(static_cast<size_t>(6 * s.D), 6);
    h[3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> out(h.size());
    const SequenceChunk c[] = {{f.b, 6, nullptr}};  // needs a second page, then fails on the NaN
    EXPECT_THROW(f.layer.forward(c, h.data(), out.data(), f.cache), InvalidArgument);
    EXPECT_EQ(f.cache.length(f.b), 0);
    EXPECT_EQ(f.cache.capacity(f.b), 4);
    EXPECT_EQ(f.cache.pages_free(), free_pages);
  }
}

TEST(BadForward, RunSequencesEdges) {
  const SmallLayer s;
  Attention layer(s.w, {.device = "cpu", .precision = Precision::F32});
  const auto h = testing::random_values(static_cast<size_t>(2 * 3 * s.D), 7);
  // No tokens: one call of empty chunks, empty results, nothing read from `hidden`.
  const RunResult empty = run_sequences(layer, nullptr, nullptr, 2, 0);
  EXPECT_TRUE(empty.output.empty());
  EXPECT_TRUE(empty.latent.empty());
  EXPECT_EQ(empty.calls, 1);
  RunOptions o;
  o.page_size = 0;
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, h.data(), nullptr, 2, 3, o); }, {"page_size", "0"});
  o = {};
  o.decode_after = -2;
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, h.data(), nullptr, 2, 3, o); }, {"decode_after", "-2"});
  o = {};
  o.decode_after = 0;  // decode every token
  EXPECT_EQ(run_sequences(layer, h.data(), nullptr, 2, 3, o).calls, 3);
}

TEST(BadForward, BadChunks) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"}) {
    SCOPED_TRACE(dev);
    Fixture f(s.w, dev, Precision::F32);
    const auto h = testing::random_values(static_cast<size_t>(8 * s.D), 6);
    std::vector<float> out(h.size());
    auto call = [&](std::vector<SequenceChunk> c, const float* in = nullptr, float* o = nullptr) {
      return [&, c, in, o] { f.layer.forward(c, in ? in : h.data(), o ? o : out.data(), f.cache); };
    };
    // Unknown sequence id.
    expect_throw_with<InvalidArgument>(call({{f.a, 1, nullptr}, {424242, 1, nullptr}}), {"424242", "no sequence"});
    f.check_unchanged();
    // A freed sequence is unknown too.
    const SeqId gone = f.cache.add_sequence();
    f.cache.free_sequence(gone);
    expect_throw_with<InvalidArgument>(call({{gone, 1, nullptr}}), {std::to_string(gone)});
    // Duplicate sequence in one batch.
    expect_throw_with<InvalidArgument>(call({{f.a, 1, nullptr}, {f.b, 1, nullptr}, {f.a, 1, nullptr}}),
                                       {std::to_string(f.a), "twice"});
    f.check_unchanged();
    // Negative positions.
    const int64_t pos[] = {7, -1, 9};
    expect_throw_with<InvalidArgument>(call({{f.b, 2, nullptr}, {f.a, 3, pos}}), {"negative position", "-1"});
    f.check_unchanged();
    // Negative token count.
    expect_throw_with<InvalidArgument>(call({{f.a, -2, nullptr}}), {"negative"});
    f.check_unchanged();
    // Null buffers with tokens to process.
    expect_throw_with<InvalidArgument>([&] {
      const SequenceChunk c[] = {{f.a, 1, nullptr}};
      f.layer.forward(c, nullptr, out.data(), f.cache);
    }, {"null"});
    expect_throw_with<InvalidArgument>([&] {
      const SequenceChunk c[] = {{f.a, 1, nullptr}};
      f.layer.forward(c, h.data(), nullptr, f.cache);
    }, {"null"});
    f.check_unchanged();
  }
}

TEST(BadForward, WrongCache) {
  const SmallLayer s;
  const auto h = testing::random_values(static_cast<size_t>(2 * s.D), 7);
  std::vector<float> out(h.size());
  LayerOptions o;
  o.device = "cpu";
  o.precision = Precision::F32;
  Attention layer(s.w, o);
  auto try_cache = [&](const CacheOptions& co, std::initializer_list<std::string> words) {
    LatentCache c(co);
    const SeqId id = c.add_sequence();
    const SequenceChunk chunk[] = {{id, 2, nullptr}};
    expect_throw_with<InvalidArgument>([&] { layer.forward(chunk, h.data(), out.data(), c); }, words);
    EXPECT_EQ(c.length(id), 0);
    EXPECT_EQ(c.pages_free(), co.num_pages);
  };
  CacheOptions good;
  good.num_pages = 2;
  good.page_size = 16;
  good.row_width = s.cfg.latent_dim();
  good.dtype = DType::F32;
  good.device = "cpu";
  {
    LatentCache c(good);  // the good one works
    const SeqId id = c.add_sequence();
    const SequenceChunk chunk[] = {{id, 2, nullptr}};
    layer.forward(chunk, h.data(), out.data(), c);
    EXPECT_EQ(c.length(id), 2);
  }
  CacheOptions bad = good;
  bad.dtype = DType::BF16;
  try_cache(bad, {"f32", "BF16", "cache"});
  bad = good;
  bad.row_width = good.row_width + 8;
  try_cache(bad, {"wide", std::to_string(good.row_width)});
  bad = good;
  bad.device = "cpu-reference";
  try_cache(bad, {"cpu-reference", "cpu"});
  // A bf16 layer given an f32 cache.
  o.precision = Precision::BF16;
  Attention bf(s.w, o);
  LatentCache c(good);
  const SeqId id = c.add_sequence();
  const SequenceChunk chunk[] = {{id, 2, nullptr}};
  expect_throw_with<InvalidArgument>([&] { bf.forward(chunk, h.data(), out.data(), c); }, {"bf16", "F32"});
  EXPECT_EQ(c.length(id), 0);
}

TEST(BadForward, UnknownDevice) {
  const SmallLayer s;
  const auto devices = available_devices();
  EXPECT_NE(std::find(devices.begin(), devices.end(), "cpu"), devices.end());
  EXPECT_NE(std::find(devices.begin(), devices.end(), "cpu-reference"), devices.end());
  LayerOptions o;
  o.device = "tpu";
  expect_throw_with<InvalidArgument>([&] { Attention(s.w, o); }, {"unknown device 'tpu'", "cpu", "cpu-reference"});
  CacheOptions co;
  co.num_pages = 1;
  co.device = "gpu0";
  expect_throw_with<InvalidArgument>([&] { LatentCache{co}; }, {"gpu0"});
  if (std::find(devices.begin(), devices.end(), "cuda") == devices.end()) {
    o.device = "cuda";
    // A CPU-only build (or a machine without a GPU) must say why, not just "unknown".
    expect_throw_with<InvalidArgument>([&] { Attention(s.w, o); }, {"cuda", "CUDA"});
  }
}

TEST(BadForward, WeightsThatDisagreeWithTheirConfig) {
  const SmallLayer s;
  LayerWeights w = s.w;
  w.kv_b_proj.rows -= 1;
  w.kv_b_proj.data.resize(static_cast<size_t>(w.kv_b_proj.rows * w.kv_b_proj.cols));
  expect_throw_with<Error>([&] { Attention(w, {}); }, {"kv_b_proj"});
  w = s.w;
  w.kv_a_norm.pop_back();
  expect_throw_with<Error>([&] { Attention(w, {}); }, {"kv_a_layernorm"});
}

}  // namespace
}  // namespace mla
