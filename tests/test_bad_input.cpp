// Damaged checkpoints through LayerWeights::load, and bad calls to Attention::forward. Each case asserts the
// exception type and the words its message must hold, and that a failed forward() stored nothing.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <tuple>

#include <sys/stat.h>

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
// Hostile checkpoints: numbers, special files, paths outside the folder, shifted offsets, non-finite weights.
// None of these may allocate much: the config bounds and file checks refuse them before any tensor is read.

// Overwrites `bytes.size()` bytes of tensor `name` at byte `at` of its data, in a single-file or sharded folder.
void patch_tensor(const fs::path& shard, const std::string& name, size_t at, const std::string& bytes) {
  Raw r = read_raw(shard);
  const uint64_t begin = r.header.at(name).at("data_offsets")[0].get<uint64_t>();
  r.data.replace(begin + at, bytes.size(), bytes);
  write_raw(shard, r);
}

std::string shard_of(const fs::path& d, const std::string& name) {
  return json::parse(read_text(d / "model.safetensors.index.json"))["weight_map"][name].get<std::string>();
}

std::string f32_bytes(float v) {
  std::string b(4, '\0');
  std::memcpy(b.data(), &v, 4);
  return b;
}

TEST(HostileCheckpoint, ConfigNumbersOutOfRange) {
  const TempDir tmp("numbers");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const std::string orig = read_text(d / "config.json");
  // Raw text: 1e28 and 2^63 must reach the parser as written.
  for (const auto& [key, value, words] : std::vector<std::tuple<std::string, std::string, std::vector<std::string>>>{
           {"hidden_size", "1e28", {"'hidden_size'", "out of range", "1e+28"}},
           {"hidden_size", "9223372036854775808", {"'hidden_size'", "out of range"}},
           {"hidden_size", "4611686018427387904", {"'hidden_size'", "must be in [1, 262144]"}},
           {"qk_rope_head_dim", "268435456", {"'qk_rope_head_dim'", "must be in [1, 4096]"}},
           {"num_attention_heads", "4611686018427387904", {"'num_attention_heads'", "16384"}},
           {"kv_lora_rank", "4611686018427387904", {"'kv_lora_rank'", "65536"}},
           {"q_lora_rank", "4611686018427387904", {"'q_lora_rank'", "65536"}},
           {"qk_nope_head_dim", "4611686018427387904", {"'qk_nope_head_dim'", "4096"}},
           {"v_head_dim", "1e5", {"'v_head_dim'", "4096"}},
           {"num_hidden_layers", "1099511627776", {"'num_hidden_layers'", "65536"}},
           {"rms_norm_eps", "1e999", {"config.json", "JSON", "1e999"}},
       }) {
    SCOPED_TRACE(key + " = " + value);
    json j = json::parse(orig);
    j[key] = "@";
    std::string text = j.dump();
    text.replace(text.find("\"@\""), 3, value);
    write_text(d / "config.json", text);
    std::vector<std::string> w = words;
    w.push_back((d / "config.json").string());
    try {
      LayerWeights::load(d);
      ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
      for (const std::string& word : w) EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  }
}

TEST(HostileCheckpoint, YarnParametersOutOfRange) {
  const TempDir tmp("yarn");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const json orig = json::parse(read_text(d / "config.json"));
  struct Edit {
    const char* key;
    double value;
    const char* word;
  };
  for (const Edit& e : {Edit{"factor", 1e-300, "'factor'"}, Edit{"factor", 0.5, "'factor'"},
                        Edit{"factor", 1e300, "'factor'"}, Edit{"beta_fast", 0, "'beta_fast'"},
                        Edit{"beta_slow", -1, "'beta_slow'"}, Edit{"beta_fast", 0.5, "greater than 'beta_slow'"},
                        Edit{"attention_factor", 1e300, "'attention_factor'"},
                        Edit{"attention_factor", -1, "'attention_factor'"}, Edit{"mscale", -3, "'mscale'"},
                        Edit{"mscale_all_dim", 1e300, "'mscale_all_dim'"},
                        Edit{"original_max_position_embeddings", 0, "'original_max_position_embeddings'"},
                        Edit{"original_max_position_embeddings", 1e300, "'original_max_position_embeddings'"}}) {
    SCOPED_TRACE(std::string(e.key) + " = " + std::to_string(e.value));
    json j = orig;
    j["rope_scaling"][e.key] = e.value;
    write_text(d / "config.json", j.dump());
    expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"config.json", "yarn", e.word});
  }
  json j = orig;
  j["rope_theta"] = 1e300;
  write_text(d / "config.json", j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"config.json", "rope_theta"});
  j = orig;
  j["rms_norm_eps"] = 0;
  write_text(d / "config.json", j.dump());
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"config.json", "rms_norm_eps"});
}

TEST(HostileCheckpoint, SpecialFilesAreRefusedBeforeOpening) {
  const TempDir tmp("special");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path cfg = d / "config.json";
  // A symlink to /dev/zero used to be read whole (2 GB, then bad_alloc); a FIFO used to block forever.
  fs::remove(cfg);
  fs::create_symlink("/dev/zero", cfg);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {cfg.string(), "character device", "not a regular file"});
  fs::remove(cfg);
  ASSERT_EQ(::mkfifo(cfg.c_str(), 0600), 0);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {cfg.string(), "FIFO"});
  fs::remove(cfg);
  fs::create_directory(cfg);  // used to say "not valid JSON: unexpected end of input"
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {cfg.string(), "is a folder", "not a regular file"});
  fs::remove(cfg);
  {
    std::ofstream big(cfg);
  }
  fs::resize_file(cfg, (uint64_t{64} << 20) + 1);  // sparse: no disk, and never read
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {cfg.string(), "67108865 bytes", "limit"});
  fs::remove(cfg);
  fs::copy_file(testing::golden_dir("v3-tiny") / "config.json", cfg);
  const fs::path weights = d / "model.safetensors";
  fs::remove(weights);
  ASSERT_EQ(::mkfifo(weights.c_str(), 0600), 0);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {weights.string(), "FIFO"});
  fs::remove(weights);
  fs::create_symlink("/dev/zero", weights);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {weights.string(), "character device"});
}

TEST(HostileCheckpoint, ModelPathErrorsSayWhatIsWrong) {
  const TempDir tmp("paths");
  const fs::path file = tmp.path() / "a-file";
  write_text(file, "x");
  // Used to say "does not exist".
  expect_throw_with<Error>([&] { LayerWeights::load(file); }, {file.string(), "is not a folder"});
  // A symlink loop used to escape as "filesystem error: status: ...".
  const fs::path loop = tmp.path() / "loop";
  fs::create_symlink(loop, loop);
  expect_throw_with<Error>([&] { LayerWeights::load(loop); }, {loop.string(), "cannot access", "symbolic links"});
  expect_throw_with<Error>([&] { Config::from_file(loop / "config.json"); }, {"loop"});
  expect_throw_with<Error>([&] { Config::from_file(file / "config.json"); }, {file.string(), "is a file, not a folder"});
}

TEST(HostileCheckpoint, ShardPathsStayInsideTheFolder) {
  const TempDir tmp("escape");
  const fs::path d = copy_golden(tmp, "fp8-sharded");
  const fs::path idx = d / "model.safetensors.index.json";
  const json orig = json::parse(read_text(idx));
  const std::string kvb = kPrefix + "kv_b_proj.weight";
  const std::string shard = orig["weight_map"][kvb].get<std::string>();
  // Real shards outside the folder: before the fix these loaded.
  fs::create_directories(tmp.path() / "ext");
  fs::copy_file(d / shard, tmp.path() / "ext" / shard);
  for (const std::string& name : {(tmp.path() / "ext" / shard).string(), "../ext/" + shard,
                                  "sub/../../ext/" + shard, std::string("/etc/passwd"), std::string("")}) {
    SCOPED_TRACE(name);
    json j = orig;
    j["weight_map"][kvb] = name;
    write_text(idx, j.dump());
    expect_throw_with<Error>([&] { LayerWeights::load(d); },
                             {idx.string(), "'" + kvb + "'", "'" + name + "'", "inside the checkpoint folder"});
  }
  // A subfolder inside is fine, and so is a symlinked shard (the Hugging Face cache links every file to ../../blobs).
  fs::create_directories(d / "sub");
  fs::rename(d / shard, d / "sub" / shard);
  json j = orig;
  for (auto& [name, file] : j["weight_map"].items())
    if (file == shard) file = "sub/" + shard;
  write_text(idx, j.dump());
  EXPECT_NO_THROW(LayerWeights::load(d));
  fs::rename(d / "sub" / shard, tmp.path() / "ext" / ("blob-" + shard));
  fs::create_symlink(tmp.path() / "ext" / ("blob-" + shard), d / "sub" / shard);
  EXPECT_NO_THROW(LayerWeights::load(d));
}

TEST(HostileCheckpoint, HeaderLengthIntoPaddingOrShiftedOffsets) {
  const TempDir tmp("shift");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path f = d / "model.safetensors";
  const std::string bytes = read_text(f);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  ASSERT_EQ(bytes[8 + n - 1], ' ') << "the golden header is padded with spaces";
  // N-1 still parses (one space less) and used to give 1024/1024 NaN outputs.
  std::string cut = bytes;
  const uint64_t n1 = n - 1;
  std::memcpy(cut.data(), &n1, 8);
  write_text(f, cut);
  // The data section now starts one byte early: the tensors leave its last byte over.
  const std::string data_bytes = std::to_string(bytes.size() - 8 - n1);
  expect_throw_with<Error>([&] { LayerWeights::load(d); },
                           {f.string(), "of the " + data_bytes + " data bytes", "header length"});
  // Every offset moved one byte on, with one byte more data: a hole at the start.
  Raw r = read_raw(testing::golden_dir("v3-tiny") / "model.safetensors");
  for (auto& [name, e] : r.header.items()) {
    if (name == "__metadata__") continue;
    e["data_offsets"][0] = e["data_offsets"][0].get<uint64_t>() + 1;
    e["data_offsets"][1] = e["data_offsets"][1].get<uint64_t>() + 1;
  }
  r.data.insert(0, 1, '\0');
  write_raw(f, r);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {f.string(), "leave data bytes [0, 1) in no tensor"});
  // Two tensors sharing bytes.
  r = read_raw(testing::golden_dir("v3-tiny") / "model.safetensors");
  const std::string a = kPrefix + "kv_a_layernorm.weight", b = kPrefix + "q_a_layernorm.weight";
  ASSERT_EQ(r.header[a]["dtype"], r.header[b]["dtype"]);
  r.header[b]["shape"] = r.header[a]["shape"];
  r.header[b]["data_offsets"] = r.header[a]["data_offsets"];
  write_raw(f, r);
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {f.string(), "overlap"});
}

TEST(HostileCheckpoint, NonFiniteWeights) {
  const TempDir tmp("nan");
  const fs::path d = copy_golden(tmp, "v3-tiny");
  const fs::path f = d / "model.safetensors";
  ASSERT_EQ(read_raw(f).header[kPrefix + "kv_b_proj.weight"]["dtype"], "BF16");
  const int64_t cols = 80;  // kv_lora_rank
  patch_tensor(f, kPrefix + "kv_b_proj.weight", 2 * (3 * cols + 5), std::string("\xc0\x7f", 2));  // bf16 NaN
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"'" + kPrefix + "kv_b_proj.weight'", "nan", "[3, 5]"});
  fs::copy_file(testing::golden_dir("v3-tiny") / "model.safetensors", f, fs::copy_options::overwrite_existing);
  patch_tensor(f, kPrefix + "kv_a_layernorm.weight", 2 * 7, std::string("\x80\xff", 2));  // bf16 -Inf
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"'" + kPrefix + "kv_a_layernorm.weight'", "-inf", "[7]"});
}

TEST(HostileCheckpoint, Fp8ScalesMustBePositiveAndFinite) {
  const TempDir tmp("scales");
  const fs::path d = copy_golden(tmp, "fp8-sharded");
  const std::string scale = kPrefix + "o_proj.weight_scale_inv", weight = kPrefix + "o_proj.weight";
  const fs::path scale_file = d / shard_of(d, scale), weight_file = d / shard_of(d, weight);
  const std::string scale_orig = read_text(scale_file), weight_orig = read_text(weight_file);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -1.f, 0.f}) {
    SCOPED_TRACE(bad);
    write_text(scale_file, scale_orig);
    patch_tensor(scale_file, scale, 4 * 1, f32_bytes(bad));
    expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"'" + scale + "'", "[1, 0]", "positive and finite"});
  }
  write_text(scale_file, scale_orig);
  // An fp8 NaN (0x7f) in the weight itself.
  patch_tensor(weight_file, weight, 2 * 96 + 4, std::string("\x7f", 1));
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"'" + weight + "'", "nan", "[2, 4]"});
  // Finite fp8 (448) times a finite scale (FLT_MAX) overflows f32.
  write_text(weight_file, weight_orig);
  patch_tensor(weight_file, weight, 130 * 96 + 5, std::string("\x7e", 1));
  patch_tensor(scale_file, scale, 4 * 1, f32_bytes(std::numeric_limits<float>::max()));
  expect_throw_with<Error>([&] { LayerWeights::load(d); }, {"'" + weight + "'", "times '" + scale + "'", "inf"});
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
  // No tokens or no sequences: refused by name, nothing read from `hidden`.
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, nullptr, nullptr, 2, 0); }, {"tokens", "got 0"});
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, nullptr, nullptr, 0, 3); }, {"batch", "got 0"});
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, nullptr, nullptr, 2, 3); }, {"hidden_states", "null"});
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

// A zero-byte [150000, 0, D] io tensor reserved a 2.4 GB cache and ran a quadratic duplicate check for 43 s.
TEST(BadForward, RunSequencesEmptySequencesRefusedAtOnce) {
  const SmallLayer s;
  Attention layer(s.w, {.device = "cpu", .precision = Precision::F32});
  const float none[1] = {0.f};
  const auto t0 = std::chrono::steady_clock::now();
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, none, nullptr, 150000, 0); },
                                     {"tokens", "hidden_states.shape[1]", "got 0"});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  // Sizes that overflow are refused by name before anything is allocated.
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, none, nullptr, int64_t{1} << 40, int64_t{1} << 30); },
                                     {"batch", "tokens", "overflow"});
  RunOptions o;
  o.page_size = 1;
  expect_throw_with<InvalidArgument>(
      [&] { run_sequences(layer, none, nullptr, int64_t{1} << 20, int64_t{1} << 20, o); },
      {"batch", "tokens", "2^31-1 cache pages"});
}

// Many sequences in one batch: ids are checked in O(B log B), not by a scan per chunk (B = 200000 zero-token
// chunks took minutes); a duplicate among them is still found and named.
TEST(BadForward, ManySequencesDuplicateCheckIsFast) {
  const SmallLayer s;
  Attention layer(s.w, {.device = "cpu", .precision = Precision::F32});
  LatentCache cache = layer.make_cache(4, 4);
  std::vector<SequenceChunk> batch;
  for (int i = 0; i < 200000; ++i) batch.push_back({cache.add_sequence(), 0, nullptr});
  batch[1000].num_tokens = 2;
  const auto h = testing::random_values(static_cast<size_t>(2 * s.D), 3);
  std::vector<float> out(h.size());
  const auto t0 = std::chrono::steady_clock::now();
  layer.forward(batch, h.data(), out.data(), cache);
  EXPECT_EQ(cache.length(batch[1000].seq), 2);
  batch[150000].seq = batch[77].seq;
  expect_throw_with<InvalidArgument>([&] { layer.forward(batch, h.data(), out.data(), cache); },
                                     {std::to_string(batch[77].seq), "twice"});
  EXPECT_EQ(cache.length(batch[1000].seq), 2);
  // ~0.2-3 s here; the quadratic check took 43 s for 150000 sequences.
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
}

// Counts are checked, all of them, before any chunk's positions are read: [1000000, -999998] for 2 rows made
// chunk 0 read a million positions from a 2-element array before chunk 1's count was refused.
TEST(BadForward, CountsCheckedBeforePositionsAreRead) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"}) {
    SCOPED_TRACE(dev);
    Fixture f(s.w, dev, Precision::F32);
    const auto h = testing::random_values(static_cast<size_t>(2 * s.D), 8);
    std::vector<float> out(h.size());
    // Reading chunk 0's positions first would meet the -7 at index 1 and say "negative position" instead.
    const int64_t pos[2] = {5, -7};
    const SequenceChunk c[] = {{f.a, 1000000, pos}, {f.b, -999998, nullptr}};
    try {
      f.layer.forward(c, h.data(), out.data(), f.cache);
      ADD_FAILURE() << "no exception";
    } catch (const InvalidArgument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("num_tokens of chunk 1"), std::string::npos) << msg;
      EXPECT_NE(msg.find("-999998"), std::string::npos) << msg;
      EXPECT_EQ(msg.find("position"), std::string::npos) << msg;
    }
    f.check_unchanged();
  }
}

// Counts whose sum overflows int64 ([2^63-1, 2^63-1, 3] wrapped to 1 and ended in vector::_M_default_append),
// and counts that fit int64 but no cache.
TEST(BadForward, TokenCountOverflow) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"}) {
    SCOPED_TRACE(dev);
    Fixture f(s.w, dev, Precision::F32);
    const SeqId c3 = f.cache.add_sequence();
    const auto h = testing::random_values(static_cast<size_t>(s.D), 9);
    std::vector<float> out(h.size());
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    const SequenceChunk wrap[] = {{f.a, kMax, nullptr}, {f.b, kMax, nullptr}, {c3, 3, nullptr}};
    expect_throw_with<InvalidArgument>([&] { f.layer.forward(wrap, h.data(), out.data(), f.cache); },
                                       {"num_tokens", "2^63-1", "chunk 1"});
    f.check_unchanged();
    EXPECT_EQ(f.cache.length(c3), 0);
    const SequenceChunk huge[] = {{f.a, int64_t{1} << 62, nullptr}};
    expect_throw_with<OutOfPages>([&] { f.layer.forward(huge, h.data(), out.data(), f.cache); },
                                  {"num_tokens", std::to_string(int64_t{1} << 62), "nothing was stored"});
    f.check_unchanged();
    // Directly through the cache: a count that would overflow length + extra.
    const SeqId ids[] = {f.a, f.a};
    const int64_t extra[] = {kMax, kMax};
    expect_throw_with<OutOfPages>([&] { f.cache.reserve(ids, extra); }, {"sequence " + std::to_string(f.a)});
    f.check_unchanged();
  }
}

// Finite inputs so large (3e38) that the projections overflow: the non-finite cache rows and outputs are refused
// before they are committed, the message names the sequence and row, and the cache is as it was, stored bytes
// included, also in pages the caller had reserved beforehand.
TEST(BadForward, HugeFiniteHiddenStoresNothing) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr));
      Fixture f(s.w, dev, pr);
      const SeqId ids[] = {f.b};
      const int64_t extra[] = {4};
      f.cache.reserve(ids, extra);  // b's first page, held by the caller
      const int64_t free_pages = f.cache.pages_free();
      auto h = testing::random_values(static_cast<size_t>(7 * s.D), 5);
      for (int64_t j = 0; j < s.D; ++j) h[4 * s.D + j] = 3e38f;  // row 4: token 2 of sequence b
      std::vector<float> out(h.size());
      const SequenceChunk c[] = {{f.a, 2, nullptr}, {f.b, 5, nullptr}};
      expect_throw_with<InvalidArgument>([&] { f.layer.forward(c, h.data(), out.data(), f.cache); },
                                         {"sequence " + std::to_string(f.b), "row 4", "token 2", "not finite",
                                          "nothing was stored"});
      EXPECT_EQ(f.cache.length(f.a), 5);
      EXPECT_EQ(f.cache.length(f.b), 0);
      EXPECT_EQ(f.cache.capacity(f.a), 8);
      EXPECT_EQ(f.cache.capacity(f.b), 4);
      EXPECT_EQ(f.cache.pages_free(), free_pages);
      EXPECT_EQ(f.cache.read_rows(f.a, 0, 5), f.rows);
      // Without the huge row the same call works and stores only finite rows.
      for (int64_t j = 0; j < s.D; ++j) h[4 * s.D + j] = 0.5f;
      f.layer.forward(c, h.data(), out.data(), f.cache);
      EXPECT_EQ(f.cache.length(f.b), 5);
      EXPECT_EQ(f.cache.first_non_finite(f.b, 0, 5), -1);
      for (float v : out) ASSERT_TRUE(std::isfinite(v));
    }
}

// Over a scan of input magnitudes, a call either succeeds with every output and stored row finite, or refuses
// with nothing stored. Where exactly a layer overflows depends on the backend and kernel variant (the fast f32
// layer on an AVX-512 CPU returns NaN outputs from finite cache rows at 1e15, which only the output check
// catches; 3e38 gives non-finite cache rows everywhere).
TEST(BadForward, OverflowScanNeverStoresOrReturnsNonFinite) {
  const SmallLayer s;
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      int refused = 0;
      for (float v : {1e5f, 1e10f, 1e12f, 1e15f, 1e18f, 1e20f, 1e25f, 1e30f, 1e35f, 3e38f}) {
        SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr) << " " << v);
        Fixture f(s.w, dev, pr);
        auto h = testing::random_values(static_cast<size_t>(4 * s.D), 12);
        for (int64_t j = 0; j < s.D; ++j) h[3 * s.D + j] = v * (j % 3 == 0 ? -1.f : 1.f);
        std::vector<float> out(h.size());
        const SequenceChunk c[] = {{f.a, 1, nullptr}, {f.b, 3, nullptr}};
        try {
          f.layer.forward(c, h.data(), out.data(), f.cache);
          for (float o : out) ASSERT_TRUE(std::isfinite(o));
          EXPECT_EQ(f.cache.first_non_finite(f.a, 0, 6), -1);
          EXPECT_EQ(f.cache.first_non_finite(f.b, 0, 3), -1);
        } catch (const InvalidArgument& e) {
          const std::string msg = e.what();
          EXPECT_NE(msg.find("sequence " + std::to_string(f.b)), std::string::npos) << msg;
          EXPECT_NE(msg.find("row 3"), std::string::npos) << msg;
          EXPECT_NE(msg.find("not finite"), std::string::npos) << msg;
          f.check_unchanged();
          ++refused;
        }
      }
      EXPECT_GE(refused, 1) << dev << " " << precision_name(pr);  // 3e38 at least
    }
}

TEST(BadForward, RunSequencesHugeFiniteHidden) {
  const SmallLayer s;
  Attention layer(s.w, {.device = "cpu", .precision = Precision::F32});
  auto h = testing::random_values(static_cast<size_t>(2 * 3 * s.D), 7);
  for (int64_t j = 0; j < s.D; ++j) h[(1 * 3 + 2) * s.D + j] = 3e38f;  // sequence 1, token 2
  expect_throw_with<InvalidArgument>([&] { run_sequences(layer, h.data(), nullptr, 2, 3); },
                                     {"sequence 1", "not finite"});
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
