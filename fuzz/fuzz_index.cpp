// libFuzzer target: model.safetensors.index.json as Checkpoint reads it (a sharded checkpoint folder), then
// lookups of the names it lists, which open the shards they point to.
//
// The folder is made once per process under the temporary directory and removed at exit: two small valid
// shards with the names the golden fp8-sharded index uses (tests/data/golden/fp8-sharded), one truncated shard,
// and the index file, rewritten for every input. Oracle as in fuzz_safetensors.cpp: only mla::Error may escape
// the library.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mla/error.hpp"
#include "mla/safetensors.hpp"

namespace fs = std::filesystem;

namespace {

constexpr size_t kMaxLookups = 64;   // bounds the work per input; the index's own parse sees every entry

class Folder {
 public:
  Folder() {
    dir_ = fs::temp_directory_path() / ("mla_fuzz_index_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    const std::vector<float> a = {1, 2, 3, 4, 5, 6};
    const std::vector<int64_t> ids = {0, 1, 2, 3};
    const mla::TensorToWrite shard1[] = {
        {"model.layers.0.self_attn.q_a_proj.weight", mla::DType::F32, {2, 3}, a.data()},
        {"model.layers.0.input_layernorm.weight", mla::DType::F32, {6}, a.data()}};
    const mla::TensorToWrite shard2[] = {
        {"model.layers.0.self_attn.kv_b_proj.weight", mla::DType::F32, {3, 2}, a.data()},
        {"model.layers.0.self_attn.o_proj.weight_scale_inv", mla::DType::I64, {4}, ids.data()}};
    mla::write_safetensors(dir_ / "model-00001-of-00002.safetensors", shard1);
    mla::write_safetensors(dir_ / "model-00002-of-00002.safetensors", shard2);
    std::ofstream(dir_ / "truncated.safetensors", std::ios::binary) << "\x10\0\0";
  }
  ~Folder() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  const fs::path& dir() const { return dir_; }

  void write_index(const uint8_t* data, size_t size) const {
    std::ofstream out(dir_ / "model.safetensors.index.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out.flush()) {
      std::fprintf(stderr, "fuzz_index: cannot write the index file in %s\n", dir_.c_str());
      std::abort();
    }
  }

 private:
  fs::path dir_;
};

// The tensor names the input lists, read with the same JSON library; shard names that are not a plain file name
// are skipped so that the fuzzer only opens files of its own folder (where such names lead is a question for the
// library's checks, not something to try on the fuzzing machine).
std::vector<std::string> listed_names(const uint8_t* data, size_t size) {
  std::vector<std::string> names;
  const auto index = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (!index.is_object()) return names;
  const auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) return names;
  for (const auto& [name, file] : wm->items()) {
    if (names.size() == kMaxLookups) break;
    if (!file.is_string()) continue;
    const auto& f = file.get_ref<const std::string&>();
    if (f.find('/') != std::string::npos || f == "." || f == "..") continue;
    names.push_back(name);
  }
  return names;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Folder folder;
  folder.write_index(data, size);
  try {
    const mla::Checkpoint checkpoint(folder.dir());
    for (const std::string& name : listed_names(data, size)) {
      try {
        if (!checkpoint.contains(name)) continue;
        const mla::TensorRef t = checkpoint.tensor(name);
        (void)t.info.numel();
      } catch (const mla::Error&) {
      }
    }
  } catch (const mla::Error&) {
  }
  return 0;
}
