// The `mla` program end to end: forward on golden cases, and every bad input leaves no output file.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>

#include <nlohmann/json.hpp>

#include "cpu/kernels.hpp"
#include "testing.hpp"

namespace mla {
namespace {

namespace fs = std::filesystem;

struct Result {
  int code = -1;
  std::string output;  // stdout + stderr
};

// Runs a shell command line; its exit code and its stdout + stderr.
Result run_command(const std::string& cmd) {
  Result r;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf{};
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) r.output.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// env: assignments for the command line, e.g. "MLA_CPU_ISA=scalar"; MLA_CPU_ISA is unset otherwise.
Result run(const std::string& args, const std::string& env = "") {
  return run_command("env -u MLA_CPU_ISA " + env + " " + std::string(MLA_CLI_PATH) + " " + args + " 2>&1");
}

// As run(), under a 1 GiB address-space limit: hostile inputs must fail by name, not by exhausting memory. Not in
// an AddressSanitizer build (scripts/sanitize.sh), whose shadow memory alone reserves terabytes of address space:
// there the plain build's run of this test holds the bound.
#if defined(__SANITIZE_ADDRESS__)
constexpr const char* kAddressSpaceLimit = "";
#else
constexpr const char* kAddressSpaceLimit = "ulimit -v 1048576 && ";
#endif
Result run_limited(const std::string& args) {
  return run_command(std::string(kAddressSpaceLimit) + "env -u MLA_CPU_ISA " + std::string(MLA_CLI_PATH) + " " + args +
                     " 2>&1");
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mla-cli-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string out() const { return (dir_ / "out.safetensors").string(); }
  // No output and no temporary left behind.
  void expect_no_output() const {
    EXPECT_FALSE(fs::exists(out()));
    for (const auto& e : fs::directory_iterator(dir_)) ADD_FAILURE() << "left behind: " << e.path();
  }
  fs::path dir_;
};

TEST_F(Cli, ForwardMatchesGoldenInEveryFeedMode) {
  for (const std::string name : {"v3-tiny", "yarn-ramp", "fp8-sharded"}) {
    const auto g = testing::golden_dir(name);
    for (const std::string extra : {"", "--chunk 5", "--decode-after 3 --page-size 1", "--path absorbed"}) {
      const Result r = run("forward --model " + g.string() + " --input " + (g / "io.safetensors").string() +
                           " --output " + out() + " --dtype f32 " + extra);
      ASSERT_EQ(r.code, 0) << r.output;
      SafetensorsFile o(out());
      SafetensorsFile ref(g / "io.safetensors");
      EXPECT_LT(testing::rel_error(o.read_f32("output"), ref.read_f32("output")), 2e-5) << name << " " << extra;
      EXPECT_LT(testing::rel_error(o.read_f32("latent"), ref.read_f32("latent")), 2e-5) << name << " " << extra;
    }
  }
}

TEST_F(Cli, ForwardBf16) {
  const auto g = testing::golden_dir("v2lite-tiny");
  const Result r = run("forward --model " + g.string() + " --input " + (g / "io.safetensors").string() + " --output " +
                       out() + " --dtype bf16 --chunk 4");
  ASSERT_EQ(r.code, 0) << r.output;
  SafetensorsFile o(out()), ref(g / "io.safetensors");
  EXPECT_LT(testing::rel_error(o.read_f32("output"), ref.read_f32("output")), 2e-2);
}

TEST_F(Cli, ErrorsLeaveNoOutput) {
  const auto g = testing::golden_dir("v3-tiny");
  const std::string io = (g / "io.safetensors").string();
  // Input of the wrong width: another case's hidden states.
  const std::string other = (testing::golden_dir("noyarn") / "io.safetensors").string();
  std::ofstream(dir_ / "empty.safetensors").close();
  const fs::path bad_model = dir_ / "model";
  fs::create_directories(bad_model);
  std::ofstream(bad_model / "config.json") << "{ not json";
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"--model " + (dir_ / "missing").string() + " --input " + io, "does not exist"},
      {"--model " + g.string() + " --input " + other, "hidden_states has shape"},
      {"--model " + g.string() + " --input " + (dir_ / "empty.safetensors").string(), "empty.safetensors"},
      {"--model " + bad_model.string() + " --input " + io, "not valid JSON"},
      {"--model " + g.string() + " --input " + io + " --layer 3", "layer 3"},
      {"--model " + g.string() + " --input " + io + " --page-size 3", "page_size"},
      {"--model " + g.string() + " --input " + io + " --device cuda", "cuda"},
      {"--model " + g.string() + " --input " + io + " --decode-after 999", "decode_after"},
  };
  for (const Case& c : cases) {
    const Result r = run("forward " + c.args + " --output " + out());
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_FALSE(fs::exists(out())) << c.args;
  }
  fs::remove_all(bad_model);
  fs::remove(dir_ / "empty.safetensors");
  expect_no_output();
}

// Each damage of a checkpoint copy must make `mla forward` fail with a message naming it and write nothing.
TEST_F(Cli, ForwardRejectsDamagedCheckpoints) {
  const auto io = (testing::golden_dir("v3-tiny") / "io.safetensors").string();
  auto fresh = [&](const std::string& name) {
    const fs::path d = dir_ / "ckpt";
    fs::remove_all(d);
    fs::copy(testing::golden_dir(name), d, fs::copy_options::recursive);
    fs::remove(d / "io.safetensors");
    return d;
  };
  auto patch = [](const fs::path& file, const std::function<void(std::string&)>& edit) {
    std::ifstream in(file, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    in.close();
    edit(bytes);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  };
  struct Case {
    std::string name, expect;
    std::function<void(const fs::path&)> damage;
  } cases[] = {
      {"truncated shard", "truncated", [&](const fs::path& d) { fs::resize_file(d / "model.safetensors", 4096); }},
      {"header length beyond the file", "exceeds", [&](const fs::path& d) {
         patch(d / "model.safetensors", [](std::string& b) { b[6] = 0x7f; });
       }},
      {"header not JSON", "JSON", [&](const fs::path& d) {
         patch(d / "model.safetensors", [](std::string& b) { b[8] = '#'; });
       }},
      {"config disagrees with the tensors", "kv_a_proj_with_mqa", [&](const fs::path& d) {
         patch(d / "config.json", [](std::string& b) {
           const std::string from = "\"kv_lora_rank\": 80", to = "\"kv_lora_rank\": 81";
           b.replace(b.find(from), from.size(), to);
         });
       }},
      {"config not JSON", "config.json", [&](const fs::path& d) { std::ofstream(d / "config.json") << "{ oops"; }},
      {"missing tensor", "no tensor", [&](const fs::path& d) {
         patch(d / "model.safetensors", [](std::string& b) {
           const auto at = b.find("kv_b_proj.weight");
           b[at] = 'x';  // renames the tensor: the checkpoint no longer has kv_b_proj.weight
         });
       }},
  };
  for (const Case& c : cases) {
    const fs::path d = fresh("v3-tiny");
    c.damage(d);
    const Result r = run("forward --model " + d.string() + " --input " + io + " --output " + out());
    EXPECT_NE(r.code, 0) << c.name;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << c.name << ": " << r.output;
    EXPECT_FALSE(fs::exists(out())) << c.name;
  }
  fs::remove_all(dir_ / "ckpt");
  expect_no_output();
}

// The hostile inputs of the issue: each fails with exit status 1 and one line "mla <cmd>: error: ..." naming what
// is wrong, writes nothing, and stays within 1 GiB of address space.
TEST_F(Cli, HostileInputsFailWithOneLine) {
  const auto io = (testing::golden_dir("v3-tiny") / "io.safetensors").string();
  const fs::path d = dir_ / "ckpt";
  auto fresh = [&](const std::string& name) {
    fs::remove_all(d);
    fs::copy(testing::golden_dir(name), d, fs::copy_options::recursive);
    fs::remove(d / "io.safetensors");
  };
  auto edit_config = [&](const std::function<void(nlohmann::json&)>& edit) {
    std::ifstream in(d / "config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    in.close();
    edit(j);
    std::ofstream(d / "config.json", std::ios::trunc) << j.dump();
  };
  auto replace_in = [](const fs::path& file, const std::string& from, const std::string& to) {
    std::ifstream in(file, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    in.close();
    bytes.replace(bytes.find(from), from.size(), to);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  };
  const std::string forward = "forward --model " + d.string() + " --input " + io + " --output " + out();
  struct Case {
    std::string name, golden, args;
    std::vector<std::string> expect;
    std::function<void()> damage;
  } cases[] = {
      {"hidden_size 1e28", "v3-tiny", forward, {"config.json", "'hidden_size'", "out of range"},
       [&] { replace_in(d / "config.json", "\"hidden_size\": 256", "\"hidden_size\": 1e28"); }},
      {"hidden_size 2^62", "v3-tiny", forward, {"'hidden_size'", "262144"},
       [&] { edit_config([](nlohmann::json& j) { j["hidden_size"] = int64_t{1} << 62; }); }},
      {"info with qk_rope_head_dim 2^28", "v3-tiny", "info --model " + d.string(), {"'qk_rope_head_dim'", "4096"},
       [&] { edit_config([](nlohmann::json& j) { j["qk_rope_head_dim"] = int64_t{1} << 28; }); }},
      {"page size 2^63-1", "v3-tiny", forward + " --page-size 9223372036854775807", {"--page-size", "256"}, [] {}},
      {"model is a file", "v3-tiny", "forward --model " + io + " --input " + io + " --output " + out(),
       {io, "is not a folder"}, [] {}},
      {"config.json is a folder", "v3-tiny", forward, {"config.json", "is a folder"}, [&] {
         fs::remove(d / "config.json");
         fs::create_directory(d / "config.json");
       }},
      {"config.json links to /dev/zero", "v3-tiny", forward, {"config.json", "character device"}, [&] {
         fs::remove(d / "config.json");
         fs::create_symlink("/dev/zero", d / "config.json");
       }},
      {"index is a FIFO", "fp8-sharded", forward, {"model.safetensors.index.json", "FIFO"}, [&] {
         fs::remove(d / "model.safetensors.index.json");
         ASSERT_EQ(::mkfifo((d / "model.safetensors.index.json").c_str(), 0600), 0);
       }},
      {"shard outside the folder", "fp8-sharded", forward, {"'/etc/passwd'", "inside the checkpoint folder"},
       [&] { replace_in(d / "model.safetensors.index.json", "model-00002-of-00002.safetensors", "/etc/passwd"); }},
      {"header length minus one", "v3-tiny", forward, {"model.safetensors", "data bytes", "header length"}, [&] {
         std::fstream f(d / "model.safetensors", std::ios::binary | std::ios::in | std::ios::out);
         uint64_t n = 0;
         f.read(reinterpret_cast<char*>(&n), 8);
         --n;
         f.seekp(0);
         f.write(reinterpret_cast<const char*>(&n), 8);
       }},
      {"YaRN factor 1e-300", "v3-tiny", forward, {"yarn 'factor'"},
       [&] { edit_config([](nlohmann::json& j) { j["rope_scaling"]["factor"] = 1e-300; }); }},
      {"input is a FIFO", "v3-tiny",
       "forward --model " + d.string() + " --input " + (dir_ / "fifo").string() + " --output " + out(),
       {(dir_ / "fifo").string(), "FIFO"}, [&] { ASSERT_EQ(::mkfifo((dir_ / "fifo").c_str(), 0600), 0); }},
      {"model is a symlink loop", "v3-tiny", "forward --model " + (dir_ / "loop").string() + " --input " + io +
       " --output " + out(), {(dir_ / "loop").string(), "cannot access"},
       [&] { fs::create_symlink(dir_ / "loop", dir_ / "loop"); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    fresh(c.golden);
    c.damage();
    const Result r = run_limited(c.args);
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_TRUE(r.output.starts_with("mla ") || r.output.starts_with("mla: ")) << r.output;
    EXPECT_NE(r.output.find("error: "), std::string::npos) << r.output;
    for (const std::string& w : c.expect) EXPECT_NE(r.output.find(w), std::string::npos) << w << " not in " << r.output;
    EXPECT_FALSE(fs::exists(out()));
    fs::remove(dir_ / "fifo");
    fs::remove(dir_ / "loop");
  }
  fs::remove_all(d);
  expect_no_output();
}

TEST_F(Cli, FailedRunKeepsAnExistingOutput) {
  std::ofstream(out()) << "previous";
  const auto g = testing::golden_dir("v3-tiny");
  const Result r = run("forward --model " + g.string() + " --input " + (dir_ / "missing.safetensors").string() +
                       " --output " + out());
  EXPECT_NE(r.code, 0);
  std::ifstream in(out());
  std::string s;
  in >> s;
  EXPECT_EQ(s, "previous");
}

TEST_F(Cli, InfoPrintsDerivedConstants) {
  const Result r = run("info --preset v3");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("0.13523"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("lo=10 hi=23"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1152 B"), std::string::npos) << r.output;
  EXPECT_NE(run("info --preset nope").code, 0);
  const Result m = run("info --model " + testing::golden_dir("yarn-ramp").string());
  EXPECT_EQ(m.code, 0) << m.output;
}

// --cache-dtype fp8: the cache bytes of one token and of --context tokens, beside bf16 (V3: 656 B against 1152 B;
// v3-tiny's 80 + 64 values: 80 e4m3 + one scale + 64 bf16 = 212 bytes, padded to 224).
TEST_F(Cli, InfoPrintsFp8CacheBytes) {
  const Result r = run("info --preset v3 --context 4096 --cache-dtype fp8");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* want : {"latent cache at context 4096 (--cache-dtype fp8", "512 e4m3 @0 | 4 fp32 scales @512 | "
                           "64 bf16 rope @528 | zero pad to 656 B", "latent (MLA)   fp8        656 B",
                           "one token      656 B", "4096 tokens    2686976 B (2.69 MB)", "163.91 MB",
                           "same in bf16   4718592 B (4.72 MB)", "287.83 MB", "1.76x smaller"})
    EXPECT_NE(r.output.find(want), std::string::npos) << want << " not in\n" << r.output;
  const Result a = run("info --preset v2-lite --context 1000");
  ASSERT_EQ(a.code, 0) << a.output;
  for (const char* want : {"latent cache at context 1000 (--cache-dtype auto", "1000 tokens    1152000 B (1.15 MB)",
                           "same in fp8    656000 B (656.0 KB)"})
    EXPECT_NE(a.output.find(want), std::string::npos) << want << " not in\n" << a.output;
  EXPECT_EQ(a.output.find("fp32 scales"), std::string::npos) << a.output;
  const Result m = run("info --model " + testing::golden_dir("v3-tiny").string() + " --context 10 --cache-dtype fp8");
  ASSERT_EQ(m.code, 0) << m.output;
  EXPECT_NE(m.output.find("80 e4m3 @0 | 1 fp32 scales @80 | 64 bf16 rope @84 | zero pad to 224 B"), std::string::npos)
      << m.output;
  EXPECT_NE(m.output.find("10 tokens      2240 B"), std::string::npos) << m.output;
}

// A bad --cache-dtype is one error line naming the option and the values it takes, for every command that has it;
// fp8 with an f32 layer names both options. Nothing is written.
TEST_F(Cli, CacheDtypeRejectsBadValues) {
  const auto g = testing::golden_dir("v3-tiny");
  const std::string forward =
      "forward --model " + g.string() + " --input " + (g / "io.safetensors").string() + " --output " + out();
  for (const std::string& cmd : {std::string("info"), std::string("demo"), forward}) {
    for (const char* bad : {"bf16", "fp9", "FP8", "''"}) {
      SCOPED_TRACE(cmd + " --cache-dtype " + bad);
      const Result r = run(cmd + " --cache-dtype " + bad);
      EXPECT_EQ(r.code, 1) << r.output;
      EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
      for (const char* want : {"error: ", "--cache-dtype", "auto", "fp8"})
        EXPECT_NE(r.output.find(want), std::string::npos) << want << " not in " << r.output;
    }
  }
  for (const std::string& cmd : {std::string("demo --dtype f32"), forward + " --dtype f32"}) {
    const Result r = run(cmd + " --cache-dtype fp8");
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_NE(r.output.find("error: --cache-dtype fp8 needs --dtype bf16"), std::string::npos) << r.output;
  }
  expect_no_output();
}

// forward with an fp8 cache (on cpu-reference: the fast CPU layer's fp8 path lands separately) agrees with the
// float64 goldens within the fp8-cache bound in every feed mode, and its latent output is the dequantised rows, not
// the bf16 ones.
TEST_F(Cli, ForwardWithFp8CacheMatchesGoldens) {
  for (const std::string name : {"v3-tiny", "v2lite-tiny"}) {
    const auto g = testing::golden_dir(name);
    const std::string base = "forward --model " + g.string() + " --input " + (g / "io.safetensors").string() +
                             " --output " + out() + " --dtype bf16 --device cpu-reference";
    ASSERT_EQ(run(base).code, 0);
    const std::vector<float> bf16_latent = SafetensorsFile(out()).read_f32("latent");
    for (const std::string extra : {"", "--chunk 5", "--decode-after 3 --page-size 1"}) {
      SCOPED_TRACE(name + " " + extra);
      const Result r = run(base + " --cache-dtype fp8 " + extra);
      ASSERT_EQ(r.code, 0) << r.output;
      SafetensorsFile o(out()), ref(g / "io.safetensors");
      const double out_err = testing::rel_error(o.read_f32("output"), ref.read_f32("output"));
      const double lat_err = testing::rel_error(o.read_f32("latent"), ref.read_f32("latent"));
      EXPECT_LT(out_err, testing::kGoldenToleranceFp8Cache);
      EXPECT_LT(lat_err, testing::kGoldenToleranceFp8Cache);
      EXPECT_GT(testing::rel_error(o.read_f32("latent"), bf16_latent), 1e-3) << "the rows were not quantised";
      std::printf("  %s %s: output rel. error %.3e, latent %.3e\n", name.c_str(), extra.c_str(), out_err, lat_err);
    }
  }
}

// The demo with an fp8 cache (cpu-reference, small): its comparisons hold, it generates again over a bf16 cache and
// prints how far the outputs moved, and it shows the fp8 bytes beside bf16.
TEST_F(Cli, DemoWithFp8Cache) {
  const Result r = run("demo --device cpu-reference --cache-dtype fp8 --prompt 8 --generate 2 --chunk 4");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output.find("MISMATCH"), std::string::npos) << r.output;
  for (const char* want : {"fp8 cache", "[5/5] generate the same tokens with a bf16 cache", "fp8 cache vs bf16 cache",
                           "latent 656 B (fp8)", "656 B vs bf16 1152 B per token per layer: 1.76x smaller"})
    EXPECT_NE(r.output.find(want), std::string::npos) << want << " not in\n" << r.output;
}

TEST_F(Cli, DemoRunsAndMatches) {
  const Result r = run("demo --prompt 96 --generate 4 --chunk 40");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("speedup"), std::string::npos);
  // The fp8 cache's bytes beside bf16 (the demo's own cache is bf16 here).
  EXPECT_NE(r.output.find("656 B vs bf16 1152 B per token per layer"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[4/4]"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("MISMATCH"), std::string::npos) << r.output;
  // It says which kernels it ran and how fast this CPU's GEMM is, so that a slow machine explains itself.
  EXPECT_NE(r.output.find("kernels: " + cpu::kernel_isa()), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("GEMM (1024^3"), std::string::npos) << r.output;
}

// info names the kernel variant and the GEMM library's ISA; MLA_CPU_ISA changes both, and a variant this CPU
// cannot run (or no variant at all) is an error that names it.
TEST_F(Cli, InfoNamesTheKernelVariant) {
  const Result best = run("info --preset v2-lite");
  ASSERT_EQ(best.code, 0) << best.output;
  EXPECT_NE(best.output.find("kernels   " + cpu::kernel_isa()), std::string::npos) << best.output;
  EXPECT_NE(best.output.find("this CPU runs: "), std::string::npos) << best.output;
  const Result scalar = run("info --preset v2-lite", "MLA_CPU_ISA=scalar");
  ASSERT_EQ(scalar.code, 0) << scalar.output;
  EXPECT_NE(scalar.output.find("kernels   scalar"), std::string::npos) << scalar.output;
  EXPECT_NE(scalar.output.find("up to sse41"), std::string::npos) << scalar.output;
  const Result typo = run("info --preset v2-lite", "MLA_CPU_ISA=avx512_bf16");
  EXPECT_NE(typo.code, 0) << typo.output;
  EXPECT_NE(typo.output.find("MLA_CPU_ISA=avx512_bf16: unknown variant"), std::string::npos) << typo.output;
  for (const char* v : {"avx512-bf16", "avx512", "avx2"}) {
    bool runs = false;
    for (cpu::Isa i : cpu::supported_isas()) runs |= cpu::isa_name(i) == v;
    const Result r = run("info --preset v2-lite", std::string("MLA_CPU_ISA=") + v);
    if (runs) {
      EXPECT_EQ(r.code, 0) << r.output;
      EXPECT_NE(r.output.find(std::string("kernels   ") + v), std::string::npos) << r.output;
    } else {
      EXPECT_NE(r.code, 0) << r.output;
      EXPECT_NE(r.output.find(std::string("MLA_CPU_ISA=") + v + ": this CPU cannot run that variant, it lacks"),
                std::string::npos)
          << r.output;
    }
  }
}

// The bench's JSON keeps its keys, adds the best GEMM of any precision and the read bandwidth, and every
// fraction is taken against a ceiling measured in the same run.
TEST_F(Cli, BenchReportsItsCeilings) {
  const std::string json = (dir_ / "bench.json").string();
  const Result r = run("bench --prefill-tokens 64 --context 96 --repeats 1 --json " + json);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("kernels: " + cpu::kernel_isa()), std::string::npos) << r.output;
  std::ifstream f(json);
  const auto j = nlohmann::json::parse(f);
  const auto& c = j.at("ceilings");
  const double best = c.at("gemm_best_gflops");
  EXPECT_EQ(best, std::max(c.at("gemm_bf16_gflops").get<double>(), c.at("gemm_f32_gflops").get<double>()));
  EXPECT_GT(c.at("copy_gbps").get<double>(), 0);
  EXPECT_GT(c.at("read_gbps").get<double>(), 0);
  EXPECT_EQ(j.at("kernel_isa"), cpu::kernel_isa());
  int rows = 0;
  for (const auto& row : j.at("rows")) {
    ++rows;
    if (row.at("work") == "prefill") {
      EXPECT_NEAR(row.at("fraction_of_gemm_peak").get<double>(), row.at("gflops").get<double>() / best, 1e-9);
    } else {
      EXPECT_NEAR(row.at("fraction_of_copy_bandwidth").get<double>(),
                  row.at("gbps").get<double>() / c.at("copy_gbps").get<double>(), 1e-9);
      EXPECT_NEAR(row.at("fraction_of_read_bandwidth").get<double>(),
                  row.at("gbps").get<double>() / c.at("read_gbps").get<double>(), 1e-9);
      EXPECT_GE(row.at("layers_in_turn").get<int>(), 2);
    }
  }
  EXPECT_EQ(rows, 6);
}

// --tp / --cp: refused by name where they cannot run (not cuda, counts that differ, a build or machine without
// the GPUs); with 2+ GPUs they run the multi-GPU benchmark, which scripts/gpu.sh nccl runs instead.
TEST_F(Cli, BenchTpCpRefusedWhereTheyCannotRun) {
  Result r = run("bench --tp 2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("need --device cuda"), std::string::npos) << r.output;
  r = run("bench --device cuda --tp 2 --cp 4");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("give one count"), std::string::npos) << r.output;
  r = run("bench --device cuda --tp 0");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--tp"), std::string::npos) << r.output;
  const std::vector<std::string> devices = available_devices();
  if (std::find(devices.begin(), devices.end(), "cuda") != devices.end()) return;  // would run the benchmark
  r = run("bench --device cuda --cp 2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_TRUE(r.output.find("no CUDA support") != std::string::npos ||
              r.output.find("needs 2 or more GPUs") != std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace mla
