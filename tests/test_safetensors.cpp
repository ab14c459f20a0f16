#include "mla/safetensors.hpp"

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "mla/dtype.hpp"
#include "mla/error.hpp"

#ifndef MLA_TEST_DATA_DIR
#define MLA_TEST_DATA_DIR "/work/main/tests/data"   // fallback for a build outside CMake
#endif

namespace fs = std::filesystem;
using mla::DType;

namespace {

const fs::path kGolden = fs::path(MLA_TEST_DATA_DIR) / "golden";
const std::vector<std::string> kCases = {"v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "fp8-sharded",
                                         "long-positions"};
const std::string kAttn = "model.layers.0.self_attn.";

// A fresh folder per test, removed afterwards even when the test fails.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path_ = fs::temp_directory_path() /
            ("mla_st_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" +
             std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

// The message of the mla::Error that `f` throws; fails the test when none is thrown.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const mla::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an mla::Error";
  return {};
}

void expect_contains(const std::string& msg, std::initializer_list<std::string> words) {
  for (const std::string& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good());
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A hand-made safetensors file, for headers no correct writer would produce.
void write_raw(const fs::path& p, const std::string& header, size_t data_bytes) {
  write_bytes(p, le64(header.size()) + header + std::string(data_bytes, '\0'));
}

std::vector<std::string> dir_listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<fs::path> model_files(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with("model") && e.path().extension() == ".safetensors") files.push_back(e.path());
  }
  return files;
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// dtype conversions

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::F8_E4M3, DType::I64, DType::I32}) {
    EXPECT_EQ(mla::dtype_from_name(mla::dtype_name(t), "ctx"), t);
  }
  expect_contains(error_of([] { mla::dtype_from_name("I8", "some.file"); }), {"some.file", "I8"});
}

TEST(DType, F16) {
  EXPECT_EQ(mla::f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(mla::f16_to_float(0xc000), -2.0f);
  EXPECT_EQ(mla::f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(mla::f16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(mla::f16_to_float(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_TRUE(std::signbit(mla::f16_to_float(0x8000)));
  EXPECT_EQ(mla::f16_to_float(0x7c00), INFINITY);
  EXPECT_EQ(mla::f16_to_float(0xfc00), -INFINITY);
  EXPECT_TRUE(std::isnan(mla::f16_to_float(0x7e00)));
}

TEST(DType, Fp8E4M3AllValues) {
  for (int v = 0; v < 256; ++v) {
    const int e = (v >> 3) & 15, m = v & 7;
    const float sign = (v & 0x80) ? -1.0f : 1.0f;
    const float got = mla::fp8_e4m3_to_float(static_cast<uint8_t>(v));
    if (e == 15 && m == 7) {
      EXPECT_TRUE(std::isnan(got)) << v;
      continue;
    }
    const float want = e == 0 ? sign * std::ldexp(static_cast<float>(m), -9)
                              : sign * std::ldexp(1.0f + m / 8.0f, e - 7);
    EXPECT_EQ(got, want) << "byte " << v;
  }
  EXPECT_EQ(mla::fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(mla::fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(mla::fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
}

// ---------------------------------------------------------------------------------------------------------
// Golden files

TEST(Golden, IoFiles) {
  for (const std::string& c : kCases) {
    SCOPED_TRACE(c);
    const mla::SafetensorsFile f(kGolden / c / "io.safetensors");
    const mla::TensorRef h = f.tensor("hidden_states");
    ASSERT_EQ(h.info.dtype, DType::F32);
    ASSERT_EQ(h.info.shape.size(), 3u);
    const int64_t B = h.info.shape[0], T = h.info.shape[1], D = h.info.shape[2];

    const std::vector<float> hidden = f.read_f32("hidden_states", std::vector<int64_t>{B, T, D});
    EXPECT_TRUE(all_finite(hidden));
    for (float x : hidden) ASSERT_EQ(mla::round_bf16(x), x) << "hidden_states must be exact in bf16";
    const std::vector<float> out = f.read_f32("output", std::vector<int64_t>{B, T, D});
    EXPECT_TRUE(all_finite(out));
    EXPECT_EQ(f.tensor("position_ids").info.dtype, DType::I64);
    EXPECT_EQ(f.read_i64("position_ids", std::vector<int64_t>{B, T}).size(), static_cast<size_t>(B * T));
    const mla::TensorRef latent = f.tensor("latent");
    ASSERT_EQ(latent.info.shape.size(), 3u);
    EXPECT_EQ(latent.info.shape[0], B);
    EXPECT_EQ(latent.info.shape[1], T);
    EXPECT_TRUE(all_finite(f.read_f32("latent")));
  }
}

TEST(Golden, LongPositions) {
  const mla::SafetensorsFile f(kGolden / "long-positions" / "io.safetensors");
  const std::vector<int64_t> pos = f.read_i64("position_ids", std::vector<int64_t>{1, 16});
  for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(pos[i], 150000 + i);
}

TEST(Golden, EveryModelTensorReadable) {
  for (const std::string& c : kCases) {
    SCOPED_TRACE(c);
    const mla::Checkpoint ck(kGolden / c);
    const std::vector<fs::path> files = model_files(kGolden / c);
    ASSERT_FALSE(files.empty());
    size_t count = 0;
    for (const fs::path& p : files) {
      const mla::SafetensorsFile f(p);
      EXPECT_EQ(f.metadata().at("format"), "pt");
      for (const std::string& name : f.names()) {
        SCOPED_TRACE(name);
        const std::vector<float> v = f.read_f32(name);
        EXPECT_EQ(static_cast<int64_t>(v.size()), f.tensor(name).info.numel());
        EXPECT_TRUE(all_finite(v));
        ASSERT_TRUE(ck.contains(name));
        const mla::TensorRef via_ck = ck.tensor(name);
        EXPECT_EQ(via_ck.info.shape, f.tensor(name).info.shape);
        ++count;
      }
    }
    EXPECT_GT(count, 5u);
    EXPECT_TRUE(ck.contains(kAttn + "kv_b_proj.weight"));
    EXPECT_FALSE(ck.contains("lm_head.weight"));
  }
}

TEST(Golden, Bf16Values) {
  const mla::SafetensorsFile f(kGolden / "v3-tiny" / "model.safetensors");
  EXPECT_EQ(f.tensor(kAttn + "kv_a_layernorm.weight").info.dtype, DType::BF16);
  const std::vector<float> w = f.read_f32(kAttn + "kv_a_layernorm.weight", std::vector<int64_t>{80});
  EXPECT_EQ(w[0], 0.8984375f);
  EXPECT_EQ(w[1], 0.9765625f);
  double sum = 0;
  for (float x : w) sum += x;
  EXPECT_EQ(sum, 81.4296875);   // from an independent Python decoder
}

TEST(Golden, Fp8ShardedCheckpoint) {
  const mla::Checkpoint ck(kGolden / "fp8-sharded");
  EXPECT_EQ(ck.dir(), kGolden / "fp8-sharded");
  const mla::TensorRef w = ck.tensor(kAttn + "q_a_proj.weight");
  EXPECT_EQ(w.info.dtype, DType::F8_E4M3);
  EXPECT_EQ(w.info.shape, (std::vector<int64_t>{200, 384}));
  EXPECT_NE(w.file.find("model-00001-of-00002.safetensors"), std::string::npos);

  // 128x128 blocks with partial edge blocks: ceil(200/128) x ceil(384/128).
  const mla::TensorRef s = ck.tensor(kAttn + "q_a_proj.weight_scale_inv");
  EXPECT_EQ(s.info.dtype, DType::F32);
  EXPECT_EQ(s.info.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_NE(s.file.find("model-00002-of-00002.safetensors"), std::string::npos);
  EXPECT_EQ(ck.tensor(kAttn + "kv_b_proj.weight_scale_inv").info.shape, (std::vector<int64_t>{2, 2}));

  std::vector<float> v(static_cast<size_t>(w.info.numel()));
  mla::convert_to_f32(w, v.data());
  EXPECT_EQ(v[0], -240.0f);
  EXPECT_EQ(v[1], -40.0f);
  double sum = 0, abs_sum = 0;
  for (float x : v) {
    ASSERT_LE(std::fabs(x), 448.0f);
    sum += x;
    abs_sum += std::fabs(x);
  }
  EXPECT_EQ(sum, -4555.19921875);   // from an independent Python decoder
  EXPECT_EQ(abs_sum, 6525397.0234375);
}

// A block of a 2-D tensor equals the same rows and columns of the whole tensor's conversion, for every float dtype
// the golden files hold (BF16, F8_E4M3) and F32; a 1-D tensor is one row; blocks outside the shape are refused.
TEST(Block, EqualsTheWholeTensorsRowsAndColumns) {
  const mla::Checkpoint v3(kGolden / "v3-tiny"), fp8(kGolden / "fp8-sharded");
  TempDir tmp;
  std::vector<float> f32(7 * 33);
  for (size_t i = 0; i < f32.size(); ++i) f32[i] = static_cast<float>(i) * 0.25f - 9.f;
  const std::vector<mla::TensorToWrite> tensors = {{"m", DType::F32, {7, 33}, f32.data()},
                                                   {"v", DType::F32, {33}, f32.data()},
                                                   {"t", DType::F32, {1, 7, 33}, f32.data()}};
  mla::write_safetensors(tmp / "f.safetensors", tensors);
  const mla::SafetensorsFile file(tmp / "f.safetensors");
  const std::vector<mla::TensorRef> refs = {v3.tensor(kAttn + "kv_b_proj.weight"),
                                            fp8.tensor(kAttn + "o_proj.weight"), file.tensor("m")};
  for (const mla::TensorRef& t : refs) {
    SCOPED_TRACE(t.info.name);
    const int64_t rows = t.info.shape[0], cols = t.info.shape[1];
    std::vector<float> whole(static_cast<size_t>(rows * cols));
    mla::convert_to_f32(t, whole.data());
    for (const auto& [r0, nr, c0, nc] : std::vector<std::array<int64_t, 4>>{
             {0, rows, 0, cols}, {1, rows - 2, 3, cols - 5}, {rows - 1, 1, cols - 1, 1}, {2, 3, 0, 0}, {0, 0, 1, 2}}) {
      std::vector<float> block(static_cast<size_t>(nr * nc), -1.f);
      mla::convert_block_to_f32(t, r0, nr, c0, nc, block.data());
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < nc; ++c)
          ASSERT_EQ(block[r * nc + c], whole[(r0 + r) * cols + c0 + c]) << "[" << r0 + r << ", " << c0 + c << "]";
    }
    std::vector<float> out(static_cast<size_t>(rows * cols));
    expect_contains(error_of([&] { mla::convert_block_to_f32(t, 1, rows, 0, 1, out.data()); }),
                    {t.info.name, "not inside"});
    expect_contains(error_of([&] { mla::convert_block_to_f32(t, 0, 1, -1, 1, out.data()); }), {"not inside"});
  }
  std::vector<float> v(4);
  mla::convert_block_to_f32(file.tensor("v"), 0, 1, 29, 4, v.data());
  EXPECT_EQ(v, std::vector<float>(f32.begin() + 29, f32.begin() + 33));
  expect_contains(error_of([&] { mla::convert_block_to_f32(file.tensor("v"), 1, 1, 0, 1, v.data()); }),
                  {"not inside"});
  expect_contains(error_of([&] { mla::convert_block_to_f32(file.tensor("t"), 0, 1, 0, 1, v.data()); }),
                  {"'t'", "[1, 7, 33]", "1-D or 2-D"});
}

// ---------------------------------------------------------------------------------------------------------
// Writing

TEST(Write, RoundTripF32I64AndMetadata) {
  TempDir tmp;
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
  const std::vector<int64_t> b = {0, -1, INT64_MAX, INT64_MIN};
  const std::vector<int32_t> c = {7, -7};
  const float scalar = 42.0f;
  const std::vector<mla::TensorToWrite> tensors = {
      {"a", DType::F32, {2, 3}, a.data()},
      {"b", DType::I64, {4}, b.data()},
      {"c", DType::I32, {2}, c.data()},
      {"scalar", DType::F32, {}, &scalar},
      {"empty", DType::F32, {0, 3}, nullptr},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "round \"trip\""}};
  const fs::path p = tmp / "out.safetensors";
  mla::write_safetensors(p, tensors, meta);

  const std::string raw = read_bytes(p);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u) << "header padded to a multiple of 8";

  const mla::SafetensorsFile f(p);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b", "c", "empty", "scalar"}));
  EXPECT_EQ(f.read_f32("a", std::vector<int64_t>{2, 3}), a);
  EXPECT_TRUE(std::signbit(f.read_f32("a")[4]));
  EXPECT_EQ(f.read_i64("b", std::vector<int64_t>{4}), b);
  EXPECT_EQ(f.read_i64("c"), (std::vector<int64_t>{7, -7}));
  EXPECT_EQ(f.read_f32("scalar"), std::vector<float>{42.0f});
  EXPECT_TRUE(f.tensor("scalar").info.shape.empty());
  EXPECT_TRUE(f.read_f32("empty", std::vector<int64_t>{0, 3}).empty());
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"out.safetensors"});
}

TEST(Write, IntoMissingFolderThrowsAndLeavesNothing) {
  TempDir tmp;
  const float x = 1;
  const std::vector<mla::TensorToWrite> t = {{"x", DType::F32, {1}, &x}};
  const fs::path p = tmp / "no_such_dir" / "out.safetensors";
  expect_contains(error_of([&] { mla::write_safetensors(p, t); }), {p.string(), "No such file or directory"});
  EXPECT_FALSE(fs::exists(tmp / "no_such_dir"));
  EXPECT_TRUE(dir_listing(tmp.path()).empty());
}

TEST(Write, OverwriteReplacesAtomically) {
  TempDir tmp;
  const fs::path p = tmp / "w.safetensors";
  const std::vector<float> old_data = {1, 2, 3};
  const std::vector<float> new_data = {9, 8, 7, 6};
  mla::write_safetensors(p, std::vector<mla::TensorToWrite>{{"w", DType::F32, {3}, old_data.data()}});
  const mla::SafetensorsFile before(p);

  mla::write_safetensors(p, std::vector<mla::TensorToWrite>{{"w", DType::F32, {2, 2}, new_data.data()}});
  // rename() swaps the directory entry: a reader that mapped the old file keeps seeing whole old data.
  EXPECT_EQ(before.read_f32("w"), old_data);
  EXPECT_EQ(mla::SafetensorsFile(p).read_f32("w", std::vector<int64_t>{2, 2}), new_data);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"w.safetensors"});
}

TEST(Write, FailedWriteLeavesTargetUntouched) {
  TempDir tmp;
  const fs::path p = tmp / "w.safetensors";
  const std::vector<float> old_data = {1, 2, 3};
  mla::write_safetensors(p, std::vector<mla::TensorToWrite>{{"w", DType::F32, {3}, old_data.data()}});
  const std::string before = read_bytes(p);

  // A file-size limit makes write() fail part-way (EFBIG) instead of killing the process with SIGXFSZ.
  const std::vector<float> big(1 << 16, 1.0f);
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string msg = error_of([&] {
    mla::write_safetensors(p, std::vector<mla::TensorToWrite>{{"w", DType::F32, {1 << 16}, big.data()}});
  });
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);

  expect_contains(msg, {p.string(), "cannot write", "File too large"});
  EXPECT_EQ(read_bytes(p), before);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"w.safetensors"});
}

TEST(Write, RejectsBadTensors) {
  TempDir tmp;
  const fs::path p = tmp / "w.safetensors";
  const float x = 1;
  expect_contains(error_of([&] {
                    mla::write_safetensors(p, std::vector<mla::TensorToWrite>{{"x", DType::F32, {1}, &x},
                                                                              {"x", DType::F32, {1}, &x}});
                  }),
                  {p.string(), "'x'", "twice"});
  expect_contains(error_of([&] {
                    mla::write_safetensors(p, std::vector<mla::TensorToWrite>{{"x", DType::F32, {-1}, &x}});
                  }),
                  {"'x'", "negative"});
  EXPECT_TRUE(dir_listing(tmp.path()).empty());
}

// ---------------------------------------------------------------------------------------------------------
// Bad input files

TEST(BadFile, Missing) {
  TempDir tmp;
  const fs::path p = tmp / "nope.safetensors";
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "cannot open", "No such file"});
}

TEST(BadFile, Empty) {
  TempDir tmp;
  const fs::path p = tmp / "empty.safetensors";
  write_bytes(p, "");
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "empty", "0 bytes"});
}

TEST(BadFile, ShorterThanEightBytes) {
  TempDir tmp;
  const fs::path p = tmp / "short.safetensors";
  write_bytes(p, "abcde");
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "5 bytes", "8-byte"});
}

TEST(BadFile, HeaderLengthBeyondFile) {
  TempDir tmp;
  const fs::path p = tmp / "long.safetensors";
  write_bytes(p, le64(1000) + "{}");
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }),
                  {p.string(), "header length 1000", "exceeds the file size 10"});
}

TEST(BadFile, HeaderNotJson) {
  TempDir tmp;
  const fs::path p = tmp / "bad.safetensors";
  write_raw(p, "{\"x\": [1, 2", 0);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "header is not valid JSON"});
  write_raw(p, "[1, 2]", 0);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "not a JSON object"});
}

TEST(BadFile, OffsetsBeyondTruncatedFile) {
  TempDir tmp;
  const fs::path src = kGolden / "v3-tiny" / "io.safetensors";
  const fs::path p = tmp / "truncated.safetensors";
  fs::copy_file(src, p);
  const auto size = fs::file_size(p);
  fs::resize_file(p, size - 100);
  const std::string msg = error_of([&] { mla::SafetensorsFile f(p); });
  expect_contains(msg, {p.string(), "data_offsets", "extend beyond", "truncated"});
  EXPECT_NE(msg.find("tensor '"), std::string::npos) << msg;
}

TEST(BadFile, OffsetsBeyondDataExactMessage) {
  TempDir tmp;
  const fs::path p = tmp / "x.safetensors";
  write_raw(p, R"({"x": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}})", 1024);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }),
                  {p.string() + ": tensor 'x': data_offsets [0, 4096] extend beyond the 1024 data bytes"});
}

TEST(BadFile, SizeMismatch) {
  TempDir tmp;
  const fs::path p = tmp / "mismatch.safetensors";
  write_raw(p, R"({"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})", 10);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'x'", "12 bytes", "hold 10 bytes"});
}

TEST(BadFile, BadEntries) {
  TempDir tmp;
  const fs::path p = tmp / "e.safetensors";
  write_raw(p, R"({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", 0);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'x'", "shape"});
  write_raw(p, R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'x'", "begin after end"});
  write_raw(p, R"({"x": {"shape": [1], "data_offsets": [0, 4]}})", 4);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'x'", "dtype"});
  write_raw(p, R"({"__metadata__": {"a": 1}})", 0);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "__metadata__"});
  write_raw(p, R"({"x": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 0]}})", 0);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'x'", "too large"});
}

TEST(BadFile, UnsupportedDtypeOnlyFailsWhenRequested) {
  TempDir tmp;
  const fs::path p = tmp / "mixed.safetensors";
  std::string header =
      R"({"mask": {"dtype": "BOOL", "shape": [4], "data_offsets": [0, 4]},)"
      R"( "f": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},)"
      R"( "odd": {"dtype": "C64", "shape": [1], "data_offsets": [8, 16]}})";
  write_raw(p, header, 16);
  const mla::SafetensorsFile f(p);
  EXPECT_TRUE(f.contains("mask"));
  EXPECT_EQ(f.read_f32("f"), std::vector<float>{0.0f});
  expect_contains(error_of([&] { f.tensor("mask"); }), {p.string(), "'mask'", "unsupported dtype", "BOOL"});
  expect_contains(error_of([&] { f.read_f32("odd"); }), {"unsupported dtype", "C64"});

  // A known 1-byte dtype is still size-checked at open.
  write_raw(p, R"({"m": {"dtype": "U8", "shape": [4], "data_offsets": [0, 3]}})", 3);
  expect_contains(error_of([&] { mla::SafetensorsFile g(p); }), {"'m'", "4 bytes", "hold 3 bytes"});
}

TEST(BadFile, UnknownDtypeRefusedAtOpenEvenIfUnused) {
  TempDir tmp;
  const fs::path p = tmp / "unknown.safetensors";
  write_raw(p,
            R"({"f": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
            R"( "junk": {"dtype": "Q7", "shape": [4], "data_offsets": [4, 8]}})",
            8);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'junk'", "unknown dtype 'Q7'"});
  // Sub-byte dtypes of the format are known: sized in bits, and must fill whole bytes.
  write_raw(p, R"({"q": {"dtype": "F4", "shape": [6], "data_offsets": [0, 3]}})", 3);
  EXPECT_NO_THROW(mla::SafetensorsFile{p});
  write_raw(p, R"({"q": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}})", 2);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {"'q'", "whole bytes"});
}

// The format's rule: the tensors tile the data section, sorted, with no overlap and no hole.
TEST(BadFile, TensorsMustTileTheDataSection) {
  TempDir tmp;
  const fs::path p = tmp / "tile.safetensors";
  write_raw(p,
            R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
            R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
            12);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "'b'", "[4, 12]", "overlap tensor 'a'"});
  write_raw(p, R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [1, 5]}})", 5);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }),
                  {p.string(), "'a'", "leave data bytes [0, 1) in no tensor"});
  write_raw(p,
            R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},)"
            R"( "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]}})",
            10);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {"'b'", "leave data bytes [4, 6)"});
  write_raw(p, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 5);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "cover 4 of the 5 data bytes"});
  // Zero-size tensors and files written here tile exactly.
  write_raw(p,
            R"({"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},)"
            R"( "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
            4);
  EXPECT_NO_THROW(mla::SafetensorsFile{p});
  // A header length cut into the header's trailing spaces still parses as JSON, and must fail.
  const std::string header = R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}   )";
  write_bytes(p, le64(header.size() - 1) + header + "xy");
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "cover 2 of the 3 data bytes"});
  write_bytes(p, le64(header.size()) + header + "xy");
  EXPECT_TRUE(mla::SafetensorsFile(p).contains("a"));
}

TEST(BadFile, HeaderOverTheFormatLimit) {
  TempDir tmp;
  const fs::path p = tmp / "big.safetensors";
  write_bytes(p, le64(100'000'001) + "{}");
  fs::resize_file(p, 8 + 100'000'001);  // sparse, and never read
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }),
                  {p.string(), "header length 100000001", "limit of 100000000 bytes"});
}

TEST(BadFile, SpecialFiles) {
  TempDir tmp;
  const fs::path p = tmp / "x.safetensors";
  fs::create_symlink("/dev/zero", p);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "character device"});
  fs::remove(p);
  ASSERT_EQ(::mkfifo(p.c_str(), 0600), 0);  // open() without O_NONBLOCK would wait for a writer forever
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "FIFO"});
  fs::remove(p);
  fs::create_directory(p);
  expect_contains(error_of([&] { mla::SafetensorsFile f(p); }), {p.string(), "is a folder"});
}

TEST(BadFile, NumelOverflowThrows) {
  mla::TensorInfo t;
  t.name = "huge";
  t.shape = {int64_t{1} << 62, 8};
  expect_contains(error_of([&] { (void)t.numel(); }), {"'huge'", "overflows"});
}

TEST(BadFile, MissingTensorAndWrongShapeOrType) {
  const fs::path p = kGolden / "v3-tiny" / "io.safetensors";
  const mla::SafetensorsFile f(p);
  EXPECT_FALSE(f.contains("nope"));
  expect_contains(error_of([&] { f.tensor("nope"); }), {p.string() + ": no tensor 'nope'"});
  expect_contains(error_of([&] { f.read_f32("nope"); }), {"no tensor 'nope'"});
  expect_contains(error_of([&] { f.read_f32("hidden_states", std::vector<int64_t>{2, 37, 255}); }),
                  {p.string() + ": tensor 'hidden_states' has shape [2, 37, 256], expected [2, 37, 255]"});
  expect_contains(error_of([&] { f.read_i64("position_ids", std::vector<int64_t>{74}); }),
                  {"has shape [2, 37], expected [74]"});
  expect_contains(error_of([&] { f.read_i64("hidden_states"); }), {"'hidden_states'", "F32", "I64"});
  expect_contains(error_of([&] { f.read_f32("position_ids"); }), {"'position_ids'", "I64", "not a float"});
}

// ---------------------------------------------------------------------------------------------------------
// Checkpoint errors

TEST(CheckpointErrors, MissingFolder) {
  TempDir tmp;
  const fs::path d = tmp / "nope";
  expect_contains(error_of([&] { mla::Checkpoint c(d); }), {"checkpoint folder '" + d.string() + "' does not exist"});
}

TEST(CheckpointErrors, NotAFolder) {
  const fs::path f = kGolden / "v3-tiny" / "config.json";
  expect_contains(error_of([&] { mla::Checkpoint c(f); }), {f.string(), "is not a folder"});
}

TEST(CheckpointErrors, FolderWithoutModelFiles) {
  TempDir tmp;
  write_bytes(tmp / "config.json", "{}");
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }),
                  {tmp.path().string(), "model.safetensors.index.json", "model.safetensors"});
}

TEST(CheckpointErrors, IndexNotJson) {
  TempDir tmp;
  write_bytes(tmp / "model.safetensors.index.json", "{\"weight_map\": {");
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }),
                  {(tmp / "model.safetensors.index.json").string(), "not valid JSON"});
  write_bytes(tmp / "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }), {"weight_map"});
}

TEST(CheckpointErrors, IndexNamesMissingShard) {
  TempDir tmp;
  const fs::path golden = kGolden / "fp8-sharded";
  fs::copy_file(golden / "model.safetensors.index.json", tmp / "model.safetensors.index.json");
  fs::copy_file(golden / "model-00001-of-00002.safetensors", tmp / "model-00001-of-00002.safetensors");
  const mla::Checkpoint ck(tmp.path());   // shards open lazily: a missing one only matters when used
  EXPECT_EQ(ck.tensor(kAttn + "q_a_proj.weight").info.dtype, DType::F8_E4M3);
  expect_contains(error_of([&] { ck.tensor(kAttn + "o_proj.weight"); }),
                  {tmp.path().string(), "'" + kAttn + "o_proj.weight'", "model-00002-of-00002.safetensors",
                   "missing"});
}

TEST(CheckpointErrors, TensorMissing) {
  const fs::path single = kGolden / "v3-tiny";
  const mla::Checkpoint a(single);
  expect_contains(error_of([&] { a.tensor("lm_head.weight"); }),
                  {"checkpoint '" + single.string() + "': no tensor 'lm_head.weight'"});

  const fs::path sharded = kGolden / "fp8-sharded";
  const mla::Checkpoint b(sharded);
  expect_contains(error_of([&] { b.tensor("lm_head.weight"); }),
                  {"checkpoint '" + sharded.string() + "': no tensor 'lm_head.weight'", "index"});
}

TEST(CheckpointErrors, IndexListsTensorTheShardLacks) {
  TempDir tmp;
  fs::copy_file(kGolden / "fp8-sharded" / "model-00001-of-00002.safetensors", tmp / "shard.safetensors");
  write_bytes(tmp / "model.safetensors.index.json", R"({"weight_map": {"ghost": "shard.safetensors"}})");
  const mla::Checkpoint ck(tmp.path());
  EXPECT_TRUE(ck.contains("ghost"));
  expect_contains(error_of([&] { ck.tensor("ghost"); }),
                  {"checkpoint '" + tmp.path().string() + "': no tensor 'ghost'", "shard.safetensors"});
}

TEST(CheckpointErrors, IndexSpecialFilesAndSize) {
  TempDir tmp;
  const fs::path idx = tmp / "model.safetensors.index.json";
  fs::create_symlink("/dev/zero", idx);  // used to be read whole: 2 GB, then bad_alloc
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }), {idx.string(), "character device"});
  fs::remove(idx);
  ASSERT_EQ(::mkfifo(idx.c_str(), 0600), 0);
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }), {idx.string(), "FIFO"});
  fs::remove(idx);
  fs::create_directory(idx);
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }), {idx.string(), "is a folder"});
  fs::remove(idx);
  write_bytes(idx, "{}");
  fs::resize_file(idx, (uint64_t{64} << 20) + 1);  // sparse
  expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }), {idx.string(), "67108865 bytes", "limit"});
}

TEST(CheckpointErrors, ShardNamesMustStayInside) {
  TempDir tmp;
  fs::copy_file(kGolden / "fp8-sharded" / "model-00001-of-00002.safetensors", tmp / "shard.safetensors");
  for (const std::string& name : {std::string("/etc/passwd"), std::string("../shard.safetensors"),
                                  std::string("a/../../shard.safetensors"), std::string(""), std::string(".")}) {
    SCOPED_TRACE(name);
    const nlohmann::json index = {{"weight_map", {{"w", name}}}};
    write_bytes(tmp / "model.safetensors.index.json", index.dump());
    // Refused when the index is read, before any tensor is asked for.
    expect_contains(error_of([&] { mla::Checkpoint c(tmp.path()); }),
                    {"model.safetensors.index.json", "'w'", "'" + name + "'", "inside the checkpoint folder"});
  }
  write_bytes(tmp / "model.safetensors.index.json", R"({"weight_map": {"w": "./shard.safetensors"}})");
  EXPECT_NO_THROW(mla::Checkpoint{tmp.path()});
}

TEST(CheckpointErrors, MovedCheckpointKeepsWorking) {
  mla::Checkpoint a(kGolden / "fp8-sharded");
  const mla::TensorRef before = a.tensor(kAttn + "o_proj.weight_scale_inv");
  mla::Checkpoint b(std::move(a));
  const mla::TensorRef after = b.tensor(kAttn + "o_proj.weight_scale_inv");
  EXPECT_EQ(before.data, after.data) << "the shard stays mapped and cached across the move";
}
