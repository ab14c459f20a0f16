// The CUDA backend against the goldens and against the CPU backends / scalar references: the layer on every
// feed and both attention paths, the decode and prefill ops on adversarial caches (permuted block tables,
// NaN in every unused slot, zero-length sequences, odd head counts, page sizes 1..256), and the errors.
// Every test skips when the build has CUDA support but the machine has no GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <cstdlib>
#include <string>
#include <tuple>

#include "core/backend.hpp"
#include "testing.hpp"

namespace mla {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

bool have_cuda() {
  const auto d = available_devices();
  return std::find(d.begin(), d.end(), "cuda") != d.end();
}
#define SKIP_WITHOUT_GPU() \
  if (!have_cuda()) GTEST_SKIP() << "no usable GPU"

// Device copies of host vectors through the backend's buffers (the test needs no CUDA headers).
struct Device {
  std::unique_ptr<detail::Buffer> buf;
  template <class T>
  explicit Device(const std::vector<T>& v) {
    const auto bytes = static_cast<int64_t>(std::max<size_t>(1, v.size()) * sizeof(T));
    buf = detail::find_backend("cuda").allocate(bytes);
    if (!v.empty()) buf->copy_from_host(0, static_cast<int64_t>(v.size() * sizeof(T)), v.data());
  }
  template <class T>
  std::vector<T> read(size_t n) const {
    std::vector<T> v(n);
    buf->copy_to_host(0, static_cast<int64_t>(n * sizeof(T)), v.data());
    return v;
  }
  void* data() const { return buf->data(); }
};

// ---- golden cases on "cuda" -------------------------------------------------------------------------------

enum class Feed { OneShot, Chunked, Decode };
struct GoldenParam {
  std::string name;
  Precision precision;
  Feed feed;
  CacheDtype cache = CacheDtype::Auto;
};

class CudaGolden : public ::testing::TestWithParam<GoldenParam> {};

TEST_P(CudaGolden, MatchesTransformers) {
  SKIP_WITHOUT_GPU();
  const GoldenParam& p = GetParam();
  const testing::GoldenCase g = testing::load_golden(p.name);
  LayerOptions opt;
  opt.device = "cuda";
  opt.precision = p.precision;
  opt.cache_dtype = p.cache;
  Attention layer(g.weights, opt);
  RunOptions run;
  run.page_size = 16;
  run.poison_unused = true;
  run.page_order_seed = 7;
  if (p.feed == Feed::Chunked) run.chunk = 7;
  if (p.feed == Feed::Decode) run.decode_after = g.tokens / 2;
  const RunResult r = run_sequences(layer, g.hidden.data(), g.positions.data(), g.batch, g.tokens, run);
  const double tol = p.cache == CacheDtype::FP8 ? testing::kGoldenToleranceFp8Cache
                     : p.precision == Precision::F32 ? 2e-5 : 2e-2;
  const double out_err = testing::rel_error(r.output, g.output);
  EXPECT_LT(out_err, tol) << "output";
  EXPECT_LT(testing::rel_error(r.latent, g.latent), tol) << "latent";
  RecordProperty("output_rel_error", std::to_string(out_err));
}

std::vector<GoldenParam> golden_params() {
  std::vector<GoldenParam> ps;
  for (const std::string& name : testing::golden_cases())
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (Feed f : {Feed::OneShot, Feed::Chunked, Feed::Decode}) {
        ps.push_back({name, pr, f});
        if (pr == Precision::BF16) ps.push_back({name, pr, f, CacheDtype::FP8});
      }
  return ps;
}

std::string golden_name(const ::testing::TestParamInfo<GoldenParam>& info) {
  const GoldenParam& p = info.param;
  std::string s = p.name + "_" + std::string(precision_name(p.precision)) +
                  (p.cache == CacheDtype::FP8 ? "_fp8cache_" : "_") + (p.feed == Feed::OneShot ? "oneshot" : p.feed == Feed::Chunked ? "chunked" : "decode");
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(AllCases, CudaGolden, ::testing::ValuesIn(golden_params()), golden_name);

// ---- the layer against the CPU on the production head dims (576/512 latent, 192/128 expanded) ------------

Config production_dims(int64_t heads) {
  Config c = Config::preset("v3");
  c.hidden_size = 256;
  c.num_heads = heads;
  c.q_lora_rank = 96;
  c.name = "v3-dims";
  return c;
}

struct LayerParam {
  int64_t heads, page_size, chunk, decode_after;
  Path path;
  Precision precision;
};

class CudaLayerVsCpu : public ::testing::TestWithParam<LayerParam> {};

void layer_vs_cpu(const LayerParam& p, const Config& c) {
  const LayerWeights w = LayerWeights::random(c, 11);
  const int64_t B = 3, T = 45;
  const std::vector<float> hidden = testing::random_values(static_cast<size_t>(B * T * c.hidden_size), 5);
  std::vector<int64_t> positions(static_cast<size_t>(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) positions[b * T + t] = 1000 * b + t;  // per-sequence offsets
  RunOptions run;
  run.page_size = p.page_size;
  run.chunk = p.chunk;
  run.decode_after = p.decode_after;
  run.poison_unused = true;
  run.page_order_seed = 99;
  RunResult out[2];
  for (int i = 0; i < 2; ++i) {
    LayerOptions o;
    o.device = i == 0 ? "cuda" : "cpu";
    o.precision = p.precision;
    o.path = p.path;
    Attention layer(w, o);
    out[i] = run_sequences(layer, hidden.data(), positions.data(), B, T, run);
  }
  const double tol = p.precision == Precision::F32 ? 2e-5 : 1.5e-2;
  EXPECT_LT(testing::rel_error(out[0].output, out[1].output), tol) << "output";
  EXPECT_LT(testing::rel_error(out[0].latent, out[1].latent), p.precision == Precision::F32 ? 1e-6 : 1e-2) << "latent";
}

void layer_vs_cpu(const LayerParam& p) { layer_vs_cpu(p, production_dims(p.heads)); }

TEST_P(CudaLayerVsCpu, AgreesWithCpu) {
  SKIP_WITHOUT_GPU();
  layer_vs_cpu(GetParam());
}

// q / kv_a / o biases (the o bias is added by the kernel that commits the output), with and without q LoRA
// (without it the q bias goes through the fp32 query path).
TEST(CudaLayer, AttentionBiasAgreesWithCpu) {
  SKIP_WITHOUT_GPU();
  for (int64_t q_lora : {96, 0}) {
    SCOPED_TRACE("q_lora_rank " + std::to_string(q_lora));
    Config c = production_dims(3);
    c.q_lora_rank = q_lora;
    c.attention_bias = true;
    for (Precision pr : {Precision::BF16, Precision::F32}) {
      layer_vs_cpu({3, 16, 13, 20, Path::Auto, pr}, c);
      layer_vs_cpu({3, 64, 0, -1, Path::Expanded, pr}, c);
    }
  }
}

// The layer's expanded path reads K/V in place from the expansion GEMM's output (strided loads in both fast
// prefill kernels): on Hopper this runs the portable one through the layer too.
TEST(CudaLayer, ExpandedPortablePathOnHopper) {
  SKIP_WITHOUT_GPU();
  setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
  layer_vs_cpu({3, 16, 13, -1, Path::Expanded, Precision::BF16});
  layer_vs_cpu({16, 64, 0, -1, Path::Expanded, Precision::BF16});
  unsetenv("MLA_CUDA_DISABLE_SM90");
}

std::vector<LayerParam> layer_params() {
  std::vector<LayerParam> ps;
  for (Precision pr : {Precision::BF16, Precision::F32})
    for (Path path : {Path::Absorbed, Path::Expanded, Path::Auto})
      for (int64_t page : {1, 16, 64, 256}) ps.push_back({3, page, page == 16 ? 13 : 0, page == 64 ? 20 : -1, path, pr});
  ps.push_back({1, 64, 0, 30, Path::Absorbed, Precision::BF16});
  ps.push_back({16, 64, 17, 40, Path::Auto, Precision::BF16});
  ps.push_back({126, 64, 0, 40, Path::Absorbed, Precision::BF16});
  return ps;
}

std::string layer_name(const ::testing::TestParamInfo<LayerParam>& info) {
  const LayerParam& p = info.param;
  return "h" + std::to_string(p.heads) + "_page" + std::to_string(p.page_size) + "_chunk" + std::to_string(p.chunk) +
         "_decode" + std::to_string(p.decode_after + 1) + "_" + std::string(path_name(p.path)) + "_" +
         std::string(precision_name(p.precision));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLayerVsCpu, ::testing::ValuesIn(layer_params()), layer_name);

// ---- the fp8 cache (fp8_ds_mla rows) ----------------------------------------------------------------------

// The CUDA layer with an fp8 cache against the scalar reference with one, on the production dims: the same
// dequantised values feed both, so they agree to accumulation order and the odd fp8 step where the two fp32
// latent rows round differently.
TEST(CudaLayer, Fp8CacheAgreesWithCpuReference) {
  SKIP_WITHOUT_GPU();
  for (const auto& [page, chunk, decode_after, path] :
       {std::tuple{16, 13, 20, Path::Auto}, std::tuple{64, 0, -1, Path::Expanded}, std::tuple{1, 0, 5, Path::Absorbed}}) {
    SCOPED_TRACE("page " + std::to_string(page) + " " + std::string(path_name(path)));
    const Config c = production_dims(3);
    const LayerWeights w = LayerWeights::random(c, 11);
    const int64_t B = 2, T = 30;
    const std::vector<float> hidden = testing::random_values(static_cast<size_t>(B * T * c.hidden_size), 5);
    std::vector<int64_t> positions(static_cast<size_t>(B * T));
    for (int64_t i = 0; i < B * T; ++i) positions[i] = 700 * (i / T) + i % T;
    RunOptions run;
    run.page_size = page, run.chunk = chunk, run.decode_after = decode_after;
    run.poison_unused = true, run.page_order_seed = 99;
    RunResult out[2];
    for (int i = 0; i < 2; ++i) {
      LayerOptions o;
      o.device = i == 0 ? "cuda" : "cpu-reference";
      o.path = path;
      o.cache_dtype = CacheDtype::FP8;
      Attention layer(w, o);
      out[i] = run_sequences(layer, hidden.data(), positions.data(), B, T, run);
    }
    EXPECT_LT(testing::rel_error(out[0].output, out[1].output), 1.5e-2) << "output";
    EXPECT_LT(testing::rel_error(out[0].latent, out[1].latent), 1.5e-2) << "latent";
  }
}

// The CUDA cache writer gives the bytes of mla::store_row. Ternary hidden states and kv_a weights make the
// projection and the norm's sum of squares exact in any order, so both backends quantise the same fp32 latent
// values: every fp8 byte and scale must match (the rope values, from two libms' sin/cos, only closely).
TEST(CudaLayer, Fp8CacheWriterMatchesStoreRow) {
  SKIP_WITHOUT_GPU();
  Config c = production_dims(2);
  LayerWeights w = LayerWeights::random(c, 3);
  std::mt19937 rng(5);
  for (float& v : w.kv_a_proj.data) v = static_cast<float>(static_cast<int>(rng() % 3) - 1);
  const int64_t T = 40;
  std::vector<float> hidden(static_cast<size_t>(T * c.hidden_size));
  for (float& v : hidden) v = static_cast<float>(static_cast<int>(rng() % 3) - 1);
  std::vector<std::vector<uint8_t>> bytes;
  for (const char* device : {"cuda", "cpu-reference"}) {
    LayerOptions o;
    o.device = device;
    o.cache_dtype = CacheDtype::FP8;
    o.path = Path::Absorbed;
    Attention layer(w, o);
    LatentCache cache = layer.make_cache(4, 16);
    const SeqId id = cache.add_sequence();
    std::vector<float> out(hidden.size());
    const SequenceChunk chunk[] = {{id, T, nullptr}};
    layer.forward_host(chunk, hidden.data(), out.data(), cache);
    std::vector<uint8_t> rows;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = int64_t{cache.block_table(id)[t / 16]} * 16 + t % 16;
      std::vector<uint8_t> row(static_cast<size_t>(cache.row_bytes()));
      if (std::string(device) == "cuda")
        detail::find_backend("cuda").copy_to_host(static_cast<const char*>(cache.storage()) + slot * cache.row_bytes(),
                                                  cache.row_bytes(), row.data());
      else
        std::memcpy(row.data(), static_cast<const char*>(cache.storage()) + slot * cache.row_bytes(), row.size());
      rows.insert(rows.end(), row.begin(), row.end());
    }
    bytes.push_back(std::move(rows));
  }
  const RowLayout lay{.dtype = DType::F8_E4M3, .latent = c.kv_lora_rank, .rope = c.qk_rope_head_dim};
  ASSERT_EQ(bytes[0].size(), bytes[1].size());
  int64_t differ = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < lay.rope_offset(); ++j) differ += bytes[0][t * lay.bytes() + j] != bytes[1][t * lay.bytes() + j];
  EXPECT_EQ(differ, 0) << "latent bytes or scales differ";
  std::vector<float> a(static_cast<size_t>(lay.width())), b(a.size());
  for (int64_t t = 0; t < T; ++t) {
    load_row(lay, &bytes[0][t * lay.bytes()], a.data());
    load_row(lay, &bytes[1][t * lay.bytes()], b.data());
    for (int64_t j = lay.latent; j < lay.width(); ++j) ASSERT_NEAR(a[j], b[j], 1e-2 * (1 + std::fabs(b[j])));
  }
}

TEST(CudaLayer, NonFiniteHiddenThrowsAndStoresNothing) {
  SKIP_WITHOUT_GPU();
  const Config c = production_dims(2);
  LayerOptions o;
  o.device = "cuda";
  Attention layer(LayerWeights::random(c, 3), o);
  LatentCache cache = layer.make_cache(4, 64);
  const SeqId id = cache.add_sequence();
  std::vector<float> hidden = testing::random_values(static_cast<size_t>(5 * c.hidden_size), 2);
  hidden[3 * c.hidden_size + 7] = kNaN;
  const detail::Backend& be = detail::find_backend("cuda");
  auto din = be.allocate(static_cast<int64_t>(hidden.size() * 4)), dout = be.allocate(static_cast<int64_t>(hidden.size() * 4));
  din->copy_from_host(0, static_cast<int64_t>(hidden.size() * 4), hidden.data());
  const SequenceChunk chunk{id, 5, nullptr};
  try {
    layer.forward({&chunk, 1}, static_cast<const float*>(din->data()), static_cast<float*>(dout->data()), cache);
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("hidden_states[3, 7]"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.length(id), 0);
  EXPECT_EQ(cache.pages_free(), 4);
}

// A rejected batch (NaN in hidden_states) leaves the caller's output and every byte of the page pool as they
// were, on both paths, with several attention launches in one forward (their block tables share one staged
// upload); the same layer then runs the batch without the NaN and agrees with the CPU, so nothing of the
// rejected call (the error flag, the staging) leaks into the next one.
void rejected_batch_case(Path path, Precision precision, bool bias) {
  SCOPED_TRACE(std::string(path_name(path)) + " " + std::string(precision_name(precision)) +
               (bias ? " bias" : " no bias"));
  Config c = production_dims(2);
  c.attention_bias = bias;
  const LayerWeights w = LayerWeights::random(c, 3);
  const int64_t D = c.hidden_size, P = 16, pages = 12;
  LayerOptions gpu_options;
  gpu_options.device = "cuda", gpu_options.precision = precision, gpu_options.path = path;
  LayerOptions cpu_options = gpu_options;
  cpu_options.device = "cpu";
  Attention gpu(w, gpu_options), cpu(w, cpu_options);
  LatentCache gpu_cache = gpu.make_cache(pages, P, 5), cpu_cache = cpu.make_cache(pages, P, 5);

  // History: a holds 20 tokens, b 3, c none. Then the batch {a: 2, b: 5, c: 5}: absorbed, it is two decode
  // launches (token counts 2 and 5 + 5); expanded, three prefill launches.
  const std::vector<int64_t> history{20, 3, 0}, fresh{2, 5, 5};
  std::vector<SeqId> ids;
  for (int i = 0; i < 3; ++i) {
    const SeqId g = gpu_cache.add_sequence(), h = cpu_cache.add_sequence();
    ASSERT_EQ(g, h);
    ids.push_back(g);
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (history[i] == 0) continue;
    const std::vector<float> x = testing::random_values(static_cast<size_t>(history[i] * D), 40 + i);
    std::vector<float> y(x.size());
    const SequenceChunk chunk{ids[i], history[i], nullptr};
    gpu.forward_host({&chunk, 1}, x.data(), y.data(), gpu_cache);
    cpu.forward_host({&chunk, 1}, x.data(), y.data(), cpu_cache);
  }
  gpu_cache.fill_unused(kNaN);  // the rows a wrong write would land in are NaN: any change shows

  const std::vector<SequenceChunk> batch{
      {ids[0], fresh[0], nullptr}, {ids[1], fresh[1], nullptr}, {ids[2], fresh[2], nullptr}};
  const int64_t N = fresh[0] + fresh[1] + fresh[2];
  std::vector<float> hidden = testing::random_values(static_cast<size_t>(N * D), 50);
  const float good = hidden[5 * D + 7];
  hidden[5 * D + 7] = kNaN;  // b's token 3
  const float sentinel = -12345.5f;
  Device din(hidden), dout(std::vector<float>(hidden.size(), sentinel));
  const size_t pool_bytes = static_cast<size_t>(pages * gpu_cache.page_bytes());
  auto pool = [&] {
    std::vector<unsigned char> bytes(pool_bytes);
    EXPECT_EQ(cudaMemcpy(bytes.data(), gpu_cache.storage(), pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    return bytes;
  };
  const std::vector<unsigned char> pool_before = pool();
  const int64_t free_before = gpu_cache.pages_free();

  testing::expect_throw_with<InvalidArgument>(
      [&] { gpu.forward(batch, static_cast<const float*>(din.data()), static_cast<float*>(dout.data()), gpu_cache); },
      {"hidden_states[5, 7]", "not finite"});
  const std::vector<float> out_after = dout.read<float>(hidden.size());
  size_t touched = 0;
  for (float v : out_after) touched += v != sentinel;  // NaN != sentinel too
  EXPECT_EQ(touched, 0u) << "the rejected forward wrote the output";
  EXPECT_TRUE(pool() == pool_before) << "the rejected forward wrote the cache";
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(gpu_cache.length(ids[i]), history[i]);
  EXPECT_EQ(gpu_cache.pages_free(), free_before);

  // The same batch without the NaN, on the same layer and cache.
  hidden[5 * D + 7] = good;
  din.buf->copy_from_host(0, static_cast<int64_t>(hidden.size() * 4), hidden.data());
  gpu.forward(batch, static_cast<const float*>(din.data()), static_cast<float*>(dout.data()), gpu_cache);
  std::vector<float> want(hidden.size());
  cpu.forward_host(batch, hidden.data(), want.data(), cpu_cache);
  const bool f32 = precision == Precision::F32;
  EXPECT_LT(testing::rel_error(dout.read<float>(hidden.size()), want), f32 ? 2e-5 : 1.5e-2) << "output";
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t L = history[i] + fresh[i];
    ASSERT_EQ(gpu_cache.length(ids[i]), L);
    EXPECT_LT(testing::rel_error(gpu_cache.read_rows(ids[i], 0, L), cpu_cache.read_rows(ids[i], 0, L)),
              f32 ? 1e-6 : 1e-2)
        << "latent rows of sequence " << i;
  }
}

TEST(CudaLayer, RejectedBatchLeavesOutputAndCacheUntouched) {
  SKIP_WITHOUT_GPU();
  for (Path path : {Path::Absorbed, Path::Expanded, Path::Auto})
    for (Precision pr : {Precision::BF16, Precision::F32})
      for (bool bias : {false, true}) rejected_batch_case(path, pr, bias);
}

// ---- repeated decode steps: the layer's CUDA graph (capture on a key's second step, replay after) -------

// Sets an environment variable for one scope and puts back what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

LayerOptions decode_loop_options(const char* device) {
  LayerOptions o;
  o.device = device, o.precision = Precision::BF16, o.path = Path::Absorbed;  // every step graphable
  return o;
}

// Sequences prefilled with `history` tokens on the GPU and the CPU, then decoded one token each per step with
// hidden and out at fixed device addresses, as a serving loop does: the GPU layer runs a step's first
// occurrence eagerly, captures the second, replays the rest until the key changes (here when the longest
// sequence crosses a page boundary and max_pages grows).
struct DecodeLoop {
  DecodeLoop(int64_t heads, int64_t page_size, const std::vector<int64_t>& lengths, int64_t pages)
      : w(LayerWeights::random(production_dims(heads), 17)),
        D(w.config.hidden_size),
        gpu(w, decode_loop_options("cuda")),
        cpu(w, decode_loop_options("cpu")),
        gpu_cache(gpu.make_cache(pages, page_size, 3)),
        cpu_cache(cpu.make_cache(pages, page_size, 3)),
        history(lengths),
        din(std::vector<float>(lengths.size() * D, 0.f)) {
    for (size_t i = 0; i < history.size(); ++i) {
      const SeqId g = gpu_cache.add_sequence(), h = cpu_cache.add_sequence();
      EXPECT_EQ(g, h);
      ids.push_back(g);
      const std::vector<float> x = testing::random_values(static_cast<size_t>(history[i] * D), 60 + i);
      std::vector<float> y(x.size());
      const SequenceChunk chunk{g, history[i], nullptr};
      gpu.forward_host({&chunk, 1}, x.data(), y.data(), gpu_cache);
      cpu.forward_host({&chunk, 1}, x.data(), y.data(), cpu_cache);
    }
  }
  size_t size() const { return ids.size() * static_cast<size_t>(D); }
  std::vector<SequenceChunk> batch() const {
    std::vector<SequenceChunk> b;
    for (SeqId id : ids) b.push_back({id, 1, nullptr});
    return b;
  }
  std::vector<float> hidden(int step) const { return testing::random_values(size(), 1000 + step); }
  // One step on the GPU into `out` (device memory) with `x` as hidden_states.
  void gpu_step(const std::vector<float>& x, const Device& out) {
    din.buf->copy_from_host(0, static_cast<int64_t>(x.size() * 4), x.data());
    gpu.forward(batch(), static_cast<const float*>(din.data()), static_cast<float*>(out.data()), gpu_cache);
  }
  std::vector<float> cpu_step(const std::vector<float>& x) {
    std::vector<float> y(x.size());
    cpu.forward_host(batch(), x.data(), y.data(), cpu_cache);
    return y;
  }
  void expect_caches_agree() const {
    for (SeqId id : ids) {
      const int64_t L = gpu_cache.length(id);
      ASSERT_EQ(L, cpu_cache.length(id));
      EXPECT_LT(testing::rel_error(gpu_cache.read_rows(id, 0, L), cpu_cache.read_rows(id, 0, L)), 1e-2)
          << "latent rows of sequence " << id;
    }
  }

  LayerWeights w;
  int64_t D;
  Attention gpu, cpu;
  LatentCache gpu_cache, cpu_cache;
  std::vector<int64_t> history;
  std::vector<SeqId> ids;
  Device din;
};

// 40 steps of three sequences (5, 20, 37 tokens of history, page size 16): the longest crosses 48 and 64
// tokens, so the key changes twice and the steps run eager, captured and replayed in turn. Every step agrees
// with the CPU; then the same steps again on the same layer with MLA_CUDA_GRAPHS=0 give the same bits (the
// same kernels with the same plans), which a replay reading anything of its capture step (positions, slots,
// block tables, lengths) would not, even where the difference hides inside the bf16 tolerance. 16 heads take
// the 16-row decode kernel, 128 the 64-row one (sm90 with its tensor map on Hopper).
TEST(CudaLayer, GraphReplayedDecodeStepsAgreeWithCpu) {
  SKIP_WITHOUT_GPU();
  for (int64_t heads : {16, 128}) {
    SCOPED_TRACE("heads " + std::to_string(heads));
    const ScopedEnv graphs("MLA_CUDA_GRAPHS", "1");
    DecodeLoop loop(heads, 16, {5, 20, 37}, 16);
    Device dout(std::vector<float>(loop.size(), 0.f));
    constexpr int kSteps = 40;
    std::vector<std::vector<float>> got;
    for (int step = 0; step < kSteps; ++step) {
      const std::vector<float> x = loop.hidden(step);
      loop.gpu_step(x, dout);
      got.push_back(dout.read<float>(loop.size()));
      EXPECT_LT(testing::rel_error(got.back(), loop.cpu_step(x)), 1.5e-2) << "step " << step;
    }
    loop.expect_caches_agree();

    for (size_t i = 0; i < loop.ids.size(); ++i) loop.gpu_cache.truncate(loop.ids[i], loop.history[i]);
    const ScopedEnv eager("MLA_CUDA_GRAPHS", "0");
    for (int step = 0; step < kSteps; ++step) {
      loop.gpu_step(loop.hidden(step), dout);
      EXPECT_EQ(testing::max_abs_diff(dout.read<float>(loop.size()), got[step]), 0.0) << "step " << step;
    }
  }
}

// A step whose out differs from the previous step's has another key: it runs eagerly into its own buffer and
// never replays a graph that writes the other one. Steps 0-19 alternate the buffers every step (never
// captured), steps 20-39 every third step (eager, captured, replayed per run); the buffer not in use must keep
// its contents throughout.
TEST(CudaLayer, GraphNeverReplaysIntoAnotherOutput) {
  SKIP_WITHOUT_GPU();
  const ScopedEnv graphs("MLA_CUDA_GRAPHS", "1");
  DecodeLoop loop(16, 16, {5, 20, 37}, 16);
  const float sentinel = -12345.5f;
  const std::vector<float> untouched(loop.size(), sentinel);
  const Device out[2] = {Device(untouched), Device(untouched)};
  for (int step = 0; step < 40; ++step) {
    const int which = step < 20 ? step % 2 : (step / 3) % 2;
    const Device& idle = out[1 - which];
    idle.buf->copy_from_host(0, static_cast<int64_t>(untouched.size() * 4), untouched.data());
    const std::vector<float> x = loop.hidden(step);
    loop.gpu_step(x, out[which]);
    EXPECT_LT(testing::rel_error(out[which].read<float>(loop.size()), loop.cpu_step(x)), 1.5e-2) << "step " << step;
    EXPECT_TRUE(idle.read<float>(loop.size()) == untouched) << "step " << step << " wrote the other output";
  }
  loop.expect_caches_agree();
}

// Decode steps [first, last) of the loop on the GPU, each against the CPU.
void steps_agree(DecodeLoop& loop, Device& dout, int first, int last) {
  for (int step = first; step < last; ++step) {
    const std::vector<float> x = loop.hidden(step);
    loop.gpu_step(x, dout);
    EXPECT_LT(testing::rel_error(dout.read<float>(loop.size()), loop.cpu_step(x)), 1.5e-2) << "step " << step;
  }
}

// Finite hidden states that overflow the projections (3e38) on a replayed step: the layer finds the non-finite
// cache row / output on the device and refuses the step (no host read-back); out, the lengths, the free pages and
// every committed row stay as they were, and the next steps agree with the CPU.
TEST(CudaLayer, OverflowingHiddenIsRefusedOnTheDevice) {
  SKIP_WITHOUT_GPU();
  const ScopedEnv graphs("MLA_CUDA_GRAPHS", "1");
  DecodeLoop loop(16, 16, {3, 20, 33}, 12);
  Device dout(std::vector<float>(loop.size(), 0.f));
  steps_agree(loop, dout, 0, 3);  // eager, captured, replayed
  const std::vector<float> untouched(loop.size(), -12345.5f);
  dout.buf->copy_from_host(0, static_cast<int64_t>(untouched.size() * 4), untouched.data());
  std::vector<std::vector<float>> rows_before;
  for (SeqId id : loop.ids) rows_before.push_back(loop.gpu_cache.read_rows(id, 0, loop.gpu_cache.length(id)));
  const int64_t free_before = loop.gpu_cache.pages_free();
  std::vector<float> bad = loop.hidden(3);
  for (int64_t j = 0; j < loop.D; ++j) bad[1 * loop.D + j] *= 3e38f;  // finite, as the 3e38 input
  testing::expect_throw_with<InvalidArgument>([&] { loop.gpu_step(bad, dout); }, {"hidden_states row 1", "not finite"});
  EXPECT_TRUE(dout.read<float>(loop.size()) == untouched) << "the rejected step wrote the output";
  for (size_t i = 0; i < loop.ids.size(); ++i) {
    EXPECT_EQ(loop.gpu_cache.length(loop.ids[i]), loop.history[i] + 3);
    EXPECT_TRUE(loop.gpu_cache.read_rows(loop.ids[i], 0, loop.gpu_cache.length(loop.ids[i])) == rows_before[i]);
  }
  EXPECT_EQ(loop.gpu_cache.pages_free(), free_before);
  steps_agree(loop, dout, 3, 6);
  loop.expect_caches_agree();
}

// NaN in hidden_states on a step that replays the graph (the flag's reset rides on the graph's upload): it
// throws naming the element, and out, the page pool and the lengths stay as they were; the same step without
// the NaN then replays and agrees with the CPU, and so do the steps after it.
TEST(CudaLayer, NonFiniteHiddenOnReplayedStepThrowsAndStoresNothing) {
  SKIP_WITHOUT_GPU();
  for (int64_t heads : {16, 128}) {
    SCOPED_TRACE("heads " + std::to_string(heads));
    const ScopedEnv graphs("MLA_CUDA_GRAPHS", "1");
    const int64_t pages = 12;
    DecodeLoop loop(heads, 16, {3, 20, 33}, pages);  // 6 steps stay within 3 pages: one key throughout
    Device dout(std::vector<float>(loop.size(), 0.f));
    steps_agree(loop, dout, 0, 3);  // eager, captured, replayed

    loop.gpu_cache.fill_unused(kNaN);  // the rows a wrong write would land in are NaN: any change shows
    const float sentinel = -12345.5f;
    const std::vector<float> untouched(loop.size(), sentinel);
    dout.buf->copy_from_host(0, static_cast<int64_t>(untouched.size() * 4), untouched.data());
    const size_t pool_bytes = static_cast<size_t>(pages * loop.gpu_cache.page_bytes());
    auto pool = [&] {
      std::vector<unsigned char> bytes(pool_bytes);
      EXPECT_EQ(cudaMemcpy(bytes.data(), loop.gpu_cache.storage(), pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      return bytes;
    };
    const std::vector<unsigned char> pool_before = pool();
    const int64_t free_before = loop.gpu_cache.pages_free();
    std::vector<float> bad = loop.hidden(3);
    bad[1 * loop.D + 7] = kNaN;
    testing::expect_throw_with<InvalidArgument>([&] { loop.gpu_step(bad, dout); },
                                                {"hidden_states[1, 7]", "not finite"});
    EXPECT_TRUE(dout.read<float>(loop.size()) == untouched) << "the rejected step wrote the output";
    EXPECT_TRUE(pool() == pool_before) << "the rejected step wrote the cache";
    for (size_t i = 0; i < loop.ids.size(); ++i) EXPECT_EQ(loop.gpu_cache.length(loop.ids[i]), loop.history[i] + 3);
    EXPECT_EQ(loop.gpu_cache.pages_free(), free_before);

    steps_agree(loop, dout, 3, 6);
    loop.expect_caches_agree();
  }
}

// ---- the decode op against a scalar reference ------------------------------------------------------------

struct DecodeCase {
  int64_t batch, s_q, h_q, page_size;
  std::vector<int32_t> seqlens;  // empty: random in [0, 300)
  DType dtype;
  int64_t head_dim = 576, head_dim_v = 512;
  bool fp8 = false;  // kv_cache as fp8_ds_mla rows (dtype BF16)
  // Latent values spread over decades: group g of 128 columns scaled by 10^(g - 2) (small and large fp8 scales)
  // and each value by 10^(-6u), u uniform in [0, 1) (fp8 subnormals: values below 2^-6 of their group's largest,
  // and zeros).
  bool wide_range = false;
};

template <class T>
std::vector<T> encode(const std::vector<float>& x, DType t) {
  std::vector<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if constexpr (sizeof(T) == 2) y[i] = float_to_bf16(x[i]);
    else y[i] = x[i];
  }
  return y;
}

void run_decode_case(const DecodeCase& dc, uint64_t seed) {
  const int64_t D = dc.head_dim, DV = dc.head_dim_v, P = dc.page_size;
  const bool bf16 = dc.dtype == DType::BF16;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<int32_t> seqlens = dc.seqlens;
  if (seqlens.empty())
    for (int64_t b = 0; b < dc.batch; ++b) seqlens.push_back(static_cast<int32_t>(rng() % 300));
  int64_t max_pages = 1;
  for (int32_t L : seqlens) max_pages = std::max<int64_t>(max_pages, (L + P - 1) / P + 1);  // one spare page each
  const int64_t num_pages = dc.batch * max_pages + 3;
  std::vector<int32_t> perm(static_cast<size_t>(num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(static_cast<size_t>(dc.batch * max_pages), -1);  // unused entries: garbage
  for (int64_t i = 0; i < dc.batch * max_pages; ++i) table[i] = perm[i];
  // Cache: NaN everywhere, then real rows for every stored token.
  std::vector<float> cache(static_cast<size_t>(num_pages * P * D), kNaN);
  std::vector<float> vals = testing::random_values(cache.size(), seed + 1);
  if (dc.wide_range) {
    const std::vector<float> u = testing::random_values(cache.size(), seed + 7);
    for (size_t i = 0; i < vals.size(); ++i) {
      const int64_t col = static_cast<int64_t>(i) % D;
      if (col < DV) vals[i] *= std::pow(10.f, static_cast<float>(col / 128) - 2.f - 3.f * (u[i] + 1.f));
    }
  }
  for (int64_t b = 0; b < dc.batch; ++b)
    for (int64_t t = 0; t < seqlens[b]; ++t) {
      const int64_t slot = int64_t{table[b * max_pages + t / P]} * P + t % P;
      for (int64_t j = 0; j < D; ++j) {
        const float v = vals[slot * D + j];
        cache[slot * D + j] = bf16 ? round_bf16(v) : v;
      }
    }
  // fp8: every slot quantised (unused ones from their NaN rows: NaN scales and bytes), and the reference reads the
  // dequantised values.
  const RowLayout fp8_row{.dtype = DType::F8_E4M3, .latent = DV, .rope = D - DV};
  std::vector<uint8_t> fp8_cache(dc.fp8 ? static_cast<size_t>(num_pages * P * fp8_row.bytes()) : 0);
  if (dc.fp8)
    for (int64_t slot = 0; slot < num_pages * P; ++slot) {
      store_row(fp8_row, &cache[slot * D], &fp8_cache[slot * fp8_row.bytes()]);
      load_row(fp8_row, &fp8_cache[slot * fp8_row.bytes()], &cache[slot * D]);
    }
  std::vector<float> q = testing::random_values(static_cast<size_t>(dc.batch * dc.s_q * dc.h_q * D), seed + 2);
  if (bf16)
    for (float& v : q) v = round_bf16(v);
  const float scale = 0.1352f;

  std::vector<float> want(static_cast<size_t>(dc.batch * dc.s_q * dc.h_q * DV)), want_lse(static_cast<size_t>(dc.batch * dc.h_q * dc.s_q));
  for (int64_t b = 0; b < dc.batch; ++b)
    for (int64_t i = 0; i < dc.s_q; ++i)
      for (int64_t h = 0; h < dc.h_q; ++h) {
        const int64_t limit = std::max<int64_t>(0, seqlens[b] - (dc.s_q - 1 - i));
        const float* qr = &q[((b * dc.s_q + i) * dc.h_q + h) * D];
        std::vector<double> logit(static_cast<size_t>(limit));
        double mx = -INFINITY;
        for (int64_t t = 0; t < limit; ++t) {
          const float* k = &cache[(int64_t{table[b * max_pages + t / P]} * P + t % P) * D];
          double dot = 0;
          for (int64_t j = 0; j < D; ++j) dot += static_cast<double>(qr[j]) * k[j];
          logit[t] = scale * dot;
          mx = std::max(mx, logit[t]);
        }
        double sum = 0;
        std::vector<double> acc(static_cast<size_t>(DV), 0.0);
        for (int64_t t = 0; t < limit; ++t) {
          const double p = std::exp(logit[t] - mx);
          sum += p;
          const float* k = &cache[(int64_t{table[b * max_pages + t / P]} * P + t % P) * D];
          for (int64_t j = 0; j < DV; ++j) acc[j] += p * k[j];
        }
        float* o = &want[((b * dc.s_q + i) * dc.h_q + h) * DV];
        for (int64_t j = 0; j < DV; ++j) o[j] = limit > 0 ? static_cast<float>(acc[j] / sum) : 0.f;
        want_lse[(b * dc.h_q + h) * dc.s_q + i] = limit > 0 ? static_cast<float>(mx + std::log(sum)) : INFINITY;
      }

  const size_t out_n = want.size();
  DecodeParams p;
  p.batch = dc.batch, p.s_q = dc.s_q, p.h_q = dc.h_q, p.head_dim = D, p.head_dim_v = DV;
  p.page_size = P, p.num_pages = num_pages, p.max_pages = max_pages, p.dtype = dc.dtype;
  p.fp8_kv_cache = dc.fp8;
  p.softmax_scale = scale;
  p.causal = true;
  std::vector<float> got(out_n), lse;
  auto run = [&](auto element) {
    using T = decltype(element);
    Device dq(encode<T>(q, dc.dtype)), dt(table), ds(seqlens);
    Device dkv = dc.fp8 ? Device(fp8_cache) : Device(encode<T>(cache, dc.dtype));
    Device dout(std::vector<T>(out_n, bf16 ? T(0x7fc0) : T(kNaN)));  // poisoned
    Device dlse(std::vector<float>(want_lse.size(), kNaN));
    p.q = dq.data(), p.kv_cache = dkv.data(), p.block_table = static_cast<const int32_t*>(dt.data());
    p.cache_seqlens = static_cast<const int32_t*>(ds.data());
    p.out = dout.data(), p.lse = static_cast<float*>(dlse.data());
    decode_attention("cuda", p);
    const std::vector<T> o = dout.read<T>(out_n);
    for (size_t i = 0; i < out_n; ++i) {
      if constexpr (sizeof(T) == 2) got[i] = bf16_to_float(o[i]);
      else got[i] = o[i];
    }
    lse = dlse.read<float>(want_lse.size());
  };
  if (bf16) run(uint16_t{});
  else run(float{});
  const double tol = bf16 ? 1e-2 : 1e-5;
  EXPECT_LT(testing::rel_error(got, want), tol);  // also fails on any NaN left in the output
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(want_lse[i])) {
      EXPECT_TRUE(std::isinf(lse[i]) && lse[i] > 0) << "lse " << i << " = " << lse[i];
    } else {
      ASSERT_NEAR(lse[i], want_lse[i], bf16 ? 2e-3 : 1e-5) << "lse " << i;
    }
  }
}

TEST(CudaDecode, AdversarialCaches) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 1;
  for (int64_t page : {1, 16, 64, 256})
    for (int64_t h_q : {1, 3, 16, 63, 64, 126, 128}) {
      SCOPED_TRACE("page " + std::to_string(page) + " h_q " + std::to_string(h_q));
      run_decode_case({4, 1, h_q, page, {0, 1, 17, 0}, DType::BF16}, seed++);
      run_decode_case({3, 2, h_q, page, {}, DType::BF16}, seed++);
    }
}

TEST(CudaDecode, SplitKvAndLongSequences) {
  SKIP_WITHOUT_GPU();
  run_decode_case({1, 1, 128, 64, {4000}, DType::BF16}, 3);       // one long sequence: many splits + combine
  run_decode_case({2, 4, 16, 64, {1013, 3}, DType::BF16}, 4);     // s_q 4, one query sees nothing at length 3
  run_decode_case({5, 1, 128, 16, {2500, 0, 64, 65, 1}, DType::BF16}, 5);
}

// fp8 rows on every shape the bf16 kernels cover (on Hopper the sm90 kernel with its dequantising producer for
// 64-row blocks and pages of 16 and up, the sm80 kernel elsewhere, the generic one for small dims).
TEST(CudaDecode, Fp8Cache) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 500;
  for (int64_t page : {1, 16, 64, 256})
    for (int64_t h_q : {1, 16, 64, 128}) {
      SCOPED_TRACE("page " + std::to_string(page) + " h_q " + std::to_string(h_q));
      run_decode_case({4, 1, h_q, page, {0, 1, 17, 0}, DType::BF16, 576, 512, true}, seed++);
      run_decode_case({3, 2, h_q, page, {}, DType::BF16, 576, 512, true}, seed++);
    }
  run_decode_case({1, 1, 128, 64, {4000}, DType::BF16, 576, 512, true}, seed++);  // splits + combine
  run_decode_case({5, 1, 16, 16, {2500, 0, 64, 65, 1}, DType::BF16, 576, 512, true}, seed++);
  run_decode_case({80, 1, 16, 64, {}, DType::BF16, 576, 512, true}, seed++);
  for (int64_t h_q : {16, 128})  // values over nine decades, fp8 subnormals (the 16-row kernel's exact fragments)
    run_decode_case({3, 2, h_q, 64, {700, 1, 130}, DType::BF16, 576, 512, true, true}, seed++);
  run_decode_case({2, 3, 4, 1, {}, DType::BF16, 144, 128, true}, seed++);  // generic kernel, one short scale group
  run_decode_case({2, 1, 3, 16, {300, 0}, DType::BF16, 200, 136, true}, seed++);
}

// The opt-in fp8 16-row kernel (MLA_CUDA_DECODE_FP8_ROWS16=1) on the shapes it takes (h_q·s_q <= 32), every page
// size, and its edges: two row blocks of a sequence (s_q 2 × h_q 16; s_q 4 × h_q 5 with a partial second block),
// split-KV with the combine, pages of one row, queries that see no key, wide-range values (fp8 subnormals).
// Fp8SixteenRowKernelEdges is small enough for compute-sanitizer (scripts/gpu.sh).
struct Fp8Rows16On {
  Fp8Rows16On() { setenv("MLA_CUDA_DECODE_FP8_ROWS16", "1", 1); }
  ~Fp8Rows16On() { unsetenv("MLA_CUDA_DECODE_FP8_ROWS16"); }
};

TEST(CudaDecode, Fp8SixteenRowKernel) {
  SKIP_WITHOUT_GPU();
  const Fp8Rows16On on;
  uint64_t seed = 950;
  for (int64_t page : {1, 16, 64, 256})
    for (int64_t h_q : {1, 3, 16}) {
      SCOPED_TRACE("page " + std::to_string(page) + " h_q " + std::to_string(h_q));
      run_decode_case({4, 1, h_q, page, {0, 1, 17, 0}, DType::BF16, 576, 512, true}, seed++);
      run_decode_case({3, 2, h_q, page, {}, DType::BF16, 576, 512, true}, seed++);
      run_decode_case({2, 1, h_q, page, {300, 129}, DType::BF16, 576, 512, true, true}, seed++);
    }
  run_decode_case({5, 1, 16, 16, {2500, 0, 64, 65, 1}, DType::BF16, 576, 512, true}, seed++);
  run_decode_case({80, 1, 16, 64, {}, DType::BF16, 576, 512, true}, seed++);
  run_decode_case({64, 2, 16, 64, {}, DType::BF16, 576, 512, true}, seed++);
}

TEST(CudaDecode, Fp8SixteenRowKernelEdges) {
  SKIP_WITHOUT_GPU();
  const Fp8Rows16On on;
  run_decode_case({3, 2, 16, 1, {0, 1, 200}, DType::BF16, 576, 512, true}, 900);
  run_decode_case({2, 1, 16, 64, {5000, 3}, DType::BF16, 576, 512, true}, 901);
  run_decode_case({2, 4, 5, 16, {700, 66}, DType::BF16, 576, 512, true, true}, 902);
}

// h_q·s_q <= 16 on Hopper: the sm90 kernel with the rows padded to 64 (taken by batches of 64 sequences and more;
// MLA_CUDA_DECODE_SM90_SMALL=1 forces it for the small batches here). No-op elsewhere: the knob only matters on sm90.
TEST(CudaDecode, SmallHeadsPaddedOnSm90) {
  SKIP_WITHOUT_GPU();
  setenv("MLA_CUDA_DECODE_SM90_SMALL", "1", 1);
  uint64_t seed = 300;
  for (int64_t page : {16, 64, 256})
    for (int64_t h_q : {1, 3, 8, 16}) {
      SCOPED_TRACE("page " + std::to_string(page) + " h_q " + std::to_string(h_q));
      run_decode_case({4, 1, h_q, page, {0, 1, 17, 0}, DType::BF16}, seed++);
      run_decode_case({3, 2, (h_q + 1) / 2, page, {}, DType::BF16}, seed++);
    }
  run_decode_case({2, 1, 16, 64, {5000, 3}, DType::BF16}, seed++);  // split-KV and combine on the padded rows
  for (int64_t page : {16, 64}) {  // and over fp8 rows (the dequantising producer warpgroup)
    run_decode_case({4, 1, 16, page, {0, 1, 17, 0}, DType::BF16, 576, 512, true}, seed++);
    run_decode_case({3, 2, 3, page, {}, DType::BF16, 576, 512, true}, seed++);
  }
  unsetenv("MLA_CUDA_DECODE_SM90_SMALL");
  run_decode_case({80, 1, 16, 64, {}, DType::BF16}, seed++);  // 80 sequences: padded without the knob
  run_decode_case({64, 2, 8, 16, {}, DType::BF16}, seed++);
}

// On Hopper the 64-row blocks run the wgmma kernel; this runs the portable mma.sync kernel there too.
TEST(CudaDecode, PortablePathOnHopper) {
  SKIP_WITHOUT_GPU();
  setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
  run_decode_case({3, 2, 63, 16, {}, DType::BF16}, 21);
  run_decode_case({2, 1, 128, 64, {3000, 5}, DType::BF16}, 22);
  run_decode_case({4, 1, 126, 256, {0, 1, 17, 700}, DType::BF16}, 23);
  run_decode_case({3, 2, 63, 16, {}, DType::BF16, 576, 512, true}, 24);  // fp8 rows through registers
  run_decode_case({2, 1, 128, 64, {3000, 5}, DType::BF16, 576, 512, true}, 25);
  unsetenv("MLA_CUDA_DISABLE_SM90");
}

// Smaller splits than the default (MLA_CUDA_DECODE_MIN_TILES, the scheduler's A/B knob): one- and two-tile
// splits, many per sequence, on the sm90 and sm80 kernels, bf16 and fp8 rows.
TEST(CudaDecode, FinerSplits) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 700;
  for (const char* min_tiles : {"1", "2"}) {
    SCOPED_TRACE(std::string("MLA_CUDA_DECODE_MIN_TILES=") + min_tiles);
    setenv("MLA_CUDA_DECODE_MIN_TILES", min_tiles, 1);
    run_decode_case({1, 1, 128, 64, {4096}, DType::BF16}, seed++);
    run_decode_case({1, 1, 128, 64, {4000}, DType::BF16}, seed++);
    run_decode_case({5, 1, 128, 16, {2500, 0, 64, 65, 1}, DType::BF16}, seed++);
    run_decode_case({2, 1, 16, 64, {5000, 3}, DType::BF16}, seed++);
    run_decode_case({1, 1, 128, 64, {4000}, DType::BF16, 576, 512, true}, seed++);
  }
  unsetenv("MLA_CUDA_DECODE_MIN_TILES");
}

TEST(CudaDecode, GenericF32AndSmallDims) {
  SKIP_WITHOUT_GPU();
  run_decode_case({3, 2, 5, 16, {}, DType::F32}, 6);
  run_decode_case({2, 1, 3, 64, {300, 0}, DType::F32, 96, 80}, 7);
  run_decode_case({2, 3, 4, 1, {}, DType::BF16, 144, 128}, 8);
}

TEST(CudaDecode, RejectsUnsupportedByName) {
  SKIP_WITHOUT_GPU();
  Device dummy(std::vector<float>(1024, 0.f));
  DecodeParams p;
  p.batch = 1, p.h_q = 1, p.dtype = DType::F16, p.num_pages = 1, p.max_pages = 1, p.softmax_scale = 1.f;
  p.q = p.kv_cache = p.out = dummy.data();
  p.block_table = p.cache_seqlens = static_cast<const int32_t*>(dummy.data());
  try {
    decode_attention("cuda", p);
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("F16"), std::string::npos) << e.what();
  }
  p.dtype = DType::BF16;
  p.page_size = 48;
  EXPECT_THROW(decode_attention("cuda", p), InvalidArgument);
}

// ---- plan/run decode: a caller-owned workspace, captured in a CUDA graph --------------------------------

#define TEST_CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

// Captures one planned decode call into a graph, replays it after overwriting q and the sequence lengths in
// place, and compares with the plain (non-graph) call on the same new inputs: the same kernels, so the same
// bits. Both the sm90 and the portable kernels, a multi-split batch and the 16-row layout.
void run_graph_case(int64_t batch, int64_t s_q, int64_t h_q, std::vector<int32_t> lens0, std::vector<int32_t> lens1,
                    uint64_t seed) {
  constexpr int64_t D = 576, DV = 512, P = 64;
  int64_t max_pages = 1;
  for (int32_t L : lens0) max_pages = std::max<int64_t>(max_pages, (L + P - 1) / P);
  for (int32_t L : lens1) max_pages = std::max<int64_t>(max_pages, (L + P - 1) / P);
  const int64_t num_pages = batch * max_pages;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<int32_t> table(static_cast<size_t>(num_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  auto bf = [](std::vector<float> v) { return encode<uint16_t>(v, DType::BF16); };
  const size_t q_n = static_cast<size_t>(batch * s_q * h_q * D), o_n = static_cast<size_t>(batch * s_q * h_q * DV);
  Device dkv(bf(testing::random_values(static_cast<size_t>(num_pages * P * D), seed + 1)));
  Device dq(bf(testing::random_values(q_n, seed + 2)));
  Device dt(table), ds(lens0);
  Device dout(std::vector<uint16_t>(o_n, 0x7fc0)), dlse(std::vector<float>(static_cast<size_t>(batch * h_q * s_q), kNaN));
  Device want_out(std::vector<uint16_t>(o_n, 0x7fc0)), want_lse(std::vector<float>(static_cast<size_t>(batch * h_q * s_q), kNaN));
  DecodeParams p;
  p.batch = batch, p.s_q = s_q, p.h_q = h_q, p.page_size = P, p.num_pages = num_pages, p.max_pages = max_pages;
  p.dtype = DType::BF16, p.softmax_scale = 0.1352f, p.causal = true;
  p.q = dq.data(), p.kv_cache = dkv.data(), p.block_table = static_cast<const int32_t*>(dt.data());
  p.cache_seqlens = static_cast<const int32_t*>(ds.data());
  p.out = dout.data(), p.lse = static_cast<float*>(dlse.data());

  DecodeParams shape = p;  // the plan needs the shape only
  shape.q = shape.kv_cache = nullptr, shape.out = nullptr, shape.block_table = shape.cache_seqlens = nullptr;
  const DecodeSchedule sched = plan_decode_attention("cuda", shape);
  EXPECT_EQ(sched.device, "cuda");
  EXPECT_GT(sched.workspace_bytes, 0);
  void* ws = nullptr;
  TEST_CUDA_OK(cudaMalloc(&ws, static_cast<size_t>(sched.workspace_bytes)));
  cudaStream_t stream = nullptr;
  TEST_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  decode_attention("cuda", p, sched, ws, stream);  // warm (first launches set kernel attributes)
  TEST_CUDA_OK(cudaStreamSynchronize(stream));

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  TEST_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  decode_attention("cuda", p, sched, ws, stream);
  TEST_CUDA_OK(cudaStreamEndCapture(stream, &graph));
  TEST_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  // New q and lengths at the same addresses, a re-poisoned output, then one replay.
  const std::vector<uint16_t> q1 = bf(testing::random_values(q_n, seed + 3));
  dq.buf->copy_from_host(0, static_cast<int64_t>(q_n * 2), q1.data());
  ds.buf->copy_from_host(0, static_cast<int64_t>(lens1.size() * 4), lens1.data());
  const std::vector<uint16_t> poison(o_n, 0x7fc0);
  dout.buf->copy_from_host(0, static_cast<int64_t>(o_n * 2), poison.data());
  TEST_CUDA_OK(cudaGraphLaunch(exec, stream));
  TEST_CUDA_OK(cudaStreamSynchronize(stream));
  const std::vector<uint16_t> got = dout.read<uint16_t>(o_n);
  const std::vector<float> got_lse = dlse.read<float>(static_cast<size_t>(batch * h_q * s_q));

  DecodeParams plain = p;  // the convenience call, backend-owned workspace, default stream
  plain.out = want_out.data(), plain.lse = static_cast<float*>(want_lse.data());
  decode_attention("cuda", plain);
  const std::vector<uint16_t> want = want_out.read<uint16_t>(o_n);
  const std::vector<float> wlse = want_lse.read<float>(static_cast<size_t>(batch * h_q * s_q));
  size_t diff = 0, nan = 0;
  for (size_t i = 0; i < o_n; ++i) diff += got[i] != want[i], nan += std::isnan(bf16_to_float(got[i]));
  EXPECT_EQ(diff, 0u) << "graph replay differs from the plain call";
  EXPECT_EQ(nan, 0u) << "graph replay left NaN in the output";
  for (size_t i = 0; i < wlse.size(); ++i)
    ASSERT_TRUE(got_lse[i] == wlse[i] || (std::isinf(got_lse[i]) && std::isinf(wlse[i]))) << "lse " << i;

  // The work list computed once (split_decode_attention), then two runs that reuse it: same bits.
  for (int run = 0; run < 3; ++run) {
    dout.buf->copy_from_host(0, static_cast<int64_t>(o_n * 2), poison.data());
    if (run == 0) split_decode_attention("cuda", p, sched, ws, stream);
    else decode_attention("cuda", p, sched, ws, stream, /*splits_ready=*/true);
    TEST_CUDA_OK(cudaStreamSynchronize(stream));
    if (run == 0) continue;
    const std::vector<uint16_t> reused = dout.read<uint16_t>(o_n);
    size_t differ = 0;
    for (size_t i = 0; i < o_n; ++i) differ += reused[i] != want[i];
    EXPECT_EQ(differ, 0u) << "run " << run << " with the work list reused differs from the plain call";
  }

  // A schedule of another shape is refused by name.
  DecodeParams other = p;
  other.h_q = h_q + 1;
  EXPECT_THROW(decode_attention("cuda", other, sched, ws, stream), InvalidArgument);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  cudaFree(ws);
}

TEST(CudaDecode, PlannedRunCapturedInGraph) {
  SKIP_WITHOUT_GPU();
  run_graph_case(4, 1, 128, {700, 64, 0, 3000}, {2000, 5, 900, 64}, 31);  // multi-split, zero length
  run_graph_case(3, 2, 16, {100, 200, 300}, {4000, 1, 64}, 32);           // s_q 2: 32 rows, 64-row blocks
  run_graph_case(2, 1, 16, {5000, 7}, {9, 6000}, 33);                     // 16-row layout
  setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
  run_graph_case(4, 1, 128, {700, 64, 0, 3000}, {2000, 5, 900, 64}, 34);
  unsetenv("MLA_CUDA_DISABLE_SM90");
}

// The convenience call keeps its split-KV workspace per device: a call on device 1 after one of the same
// shape on device 0 (so nothing grows) must not be handed device 0's workspace.
TEST(CudaDecode, ConvenienceWorkspacePerDevice) {
  SKIP_WITHOUT_GPU();
  int count = 0, original = 0;
  TEST_CUDA_OK(cudaGetDeviceCount(&count));
  if (count < 2) GTEST_SKIP() << "needs two GPUs";
  TEST_CUDA_OK(cudaGetDevice(&original));
  struct Restore {
    int device;
    ~Restore() { cudaSetDevice(device); }
  } restore{original};
  for (int device : {0, 1, 0, 1}) {
    SCOPED_TRACE("device " + std::to_string(device));
    TEST_CUDA_OK(cudaSetDevice(device));
    run_decode_case({1, 1, 128, 64, {4000}, DType::BF16}, 3);  // many splits: the workspace is used
    run_decode_case({2, 1, 16, 64, {5000, 7}, DType::BF16}, 4);
    TEST_CUDA_OK(cudaDeviceSynchronize());
  }
}

TEST(CudaDecode, PlanOnCpuNeedsNoWorkspace) {
  // Runs without a GPU too: the CPU plan/run pair.
  DecodeParams p;
  p.batch = 1, p.h_q = 2, p.head_dim = 8, p.head_dim_v = 4, p.page_size = 4, p.num_pages = 1, p.max_pages = 1;
  p.dtype = DType::F32, p.softmax_scale = 0.5f;
  const DecodeSchedule s = plan_decode_attention("cpu", p);
  EXPECT_EQ(s.workspace_bytes, 0);
  EXPECT_EQ(s.kernel, "cpu");
  std::vector<float> q(16, 0.25f), kv(32, 0.5f), out(8, kNaN);
  const int32_t table[1] = {0}, len[1] = {3};
  p.q = q.data(), p.kv_cache = kv.data(), p.block_table = table, p.cache_seqlens = len, p.out = out.data();
  decode_attention("cpu", p, s, nullptr);
  for (float v : out) EXPECT_FLOAT_EQ(v, 0.5f);
  std::fill(out.begin(), out.end(), kNaN);
  split_decode_attention("cpu", p, s, nullptr);  // nothing to precompute on the CPU
  decode_attention("cpu", p, s, nullptr, nullptr, /*splits_ready=*/true);
  for (float v : out) EXPECT_FLOAT_EQ(v, 0.5f);
}

// ---- the prefill op against a scalar reference ------------------------------------------------------------

// cu_seqlens in host memory and in device memory (cu_seqlens_on_device) must give the same bits. poison_last: the
// last sequence (which must have no queries) has NaN keys and values, right behind the others' keys: none of it
// may reach their rows.
void run_prefill_case(int64_t heads, int64_t dqk, int64_t dv, std::vector<int32_t> nq, std::vector<int32_t> nk,
                      DType dtype, uint64_t seed, bool poison_last = false) {
  const bool bf16 = dtype == DType::BF16;
  std::vector<int32_t> cq{0}, ck{0};
  for (size_t b = 0; b < nq.size(); ++b) cq.push_back(cq.back() + nq[b]), ck.push_back(ck.back() + nk[b]);
  const int64_t TQ = cq.back(), TK = ck.back();
  auto rnd = [&](size_t n, uint64_t s) {
    std::vector<float> v = testing::random_values(n, s);
    if (bf16)
      for (float& x : v) x = round_bf16(x);
    return v;
  };
  const std::vector<float> q = rnd(static_cast<size_t>(TQ * heads * dqk), seed);
  std::vector<float> k = rnd(static_cast<size_t>(TK * heads * dqk), seed + 1), v = rnd(static_cast<size_t>(TK * heads * dv), seed + 2);
  if (poison_last) {
    ASSERT_EQ(nq.back(), 0) << "the poisoned sequence must have no queries";
    std::fill(k.begin() + ck[nq.size() - 1] * heads * dqk, k.end(), kNaN);
    std::fill(v.begin() + ck[nq.size() - 1] * heads * dv, v.end(), kNaN);
  }
  const float scale = 0.0721687836f * 2;
  std::vector<float> want(static_cast<size_t>(TQ * heads * dv), 0.f);
  for (size_t b = 0; b < nq.size(); ++b)
    for (int64_t i = 0; i < nq[b]; ++i)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t limit = std::clamp<int64_t>(nk[b] - nq[b] + i + 1, 0, nk[b]);
        const float* qr = &q[((cq[b] + i) * heads + h) * dqk];
        std::vector<double> logit(static_cast<size_t>(limit));
        double mx = -INFINITY, sum = 0;
        for (int64_t t = 0; t < limit; ++t) {
          double dot = 0;
          for (int64_t j = 0; j < dqk; ++j) dot += static_cast<double>(qr[j]) * k[((ck[b] + t) * heads + h) * dqk + j];
          logit[t] = scale * dot;
          mx = std::max(mx, logit[t]);
        }
        float* o = &want[((cq[b] + i) * heads + h) * dv];
        std::vector<double> acc(static_cast<size_t>(dv), 0.0);
        for (int64_t t = 0; t < limit; ++t) {
          const double p = std::exp(logit[t] - mx);
          sum += p;
          for (int64_t j = 0; j < dv; ++j) acc[j] += p * v[((ck[b] + t) * heads + h) * dv + j];
        }
        for (int64_t j = 0; j < dv; ++j) o[j] = limit > 0 ? static_cast<float>(acc[j] / sum) : 0.f;
      }
  PrefillParams p;
  p.batch = static_cast<int64_t>(nq.size()), p.num_heads = heads, p.head_dim_qk = dqk, p.head_dim_v = dv;
  p.total_q = TQ, p.total_k = TK, p.dtype = dtype;
  p.cu_seqlens_q = cq.data(), p.cu_seqlens_k = ck.data();
  p.softmax_scale = scale;
  p.causal = true;
  std::vector<float> got(want.size()), got_device_cu(want.size());
  auto run = [&](auto element, bool device_cu, std::vector<float>& result) {
    using T = decltype(element);
    Device dq(encode<T>(q, dtype)), dk(encode<T>(k, dtype)), dvv(encode<T>(v, dtype));
    Device dout(std::vector<T>(want.size(), bf16 ? T(0x7fc0) : T(kNaN)));
    Device dcq(cq), dck(ck);
    p.q = dq.data(), p.k = dk.data(), p.v = dvv.data(), p.out = dout.data();
    p.cu_seqlens_on_device = device_cu;
    p.cu_seqlens_q = device_cu ? static_cast<const int32_t*>(dcq.data()) : cq.data();
    p.cu_seqlens_k = device_cu ? static_cast<const int32_t*>(dck.data()) : ck.data();
    prefill_attention("cuda", p);
    const std::vector<T> o = dout.read<T>(want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      if constexpr (sizeof(T) == 2) result[i] = bf16_to_float(o[i]);
      else result[i] = o[i];
    }
  };
  for (bool device_cu : {false, true}) {
    if (bf16) run(uint16_t{}, device_cu, device_cu ? got_device_cu : got);
    else run(float{}, device_cu, device_cu ? got_device_cu : got);
  }
  EXPECT_LT(testing::rel_error(got, want), bf16 ? 1e-2 : 1e-5);
  EXPECT_EQ(std::memcmp(got.data(), got_device_cu.data(), got.size() * sizeof(float)), 0)
      << "cu_seqlens in device memory gave other bits than in host memory";
}

TEST(CudaPrefill, ExpandedKernelVarlen) {
  SKIP_WITHOUT_GPU();
  run_prefill_case(3, 192, 128, {100, 0, 257, 1, 64}, {100, 5, 300, 1013, 64}, DType::BF16, 1);
  run_prefill_case(16, 192, 128, {130}, {130}, DType::BF16, 2);
  // key counts that end inside a 128-key tile, followed by NaN rows of a sequence without queries
  run_prefill_case(4, 192, 128, {200, 77, 129, 0}, {200, 300, 129, 260}, DType::BF16, 6, /*poison_last=*/true);
  run_prefill_case(2, 192, 128, {1, 128, 0}, {1, 255, 3}, DType::BF16, 7, /*poison_last=*/true);
}

TEST(CudaPrefill, GarbageDeviceSeqlens) {
  SKIP_WITHOUT_GPU();
  // Device-side lengths are read by the kernel (Hopper's one-launch path) or copied to the host and checked there
  // (the other kernels). Decreasing and out-of-range ones: the first path clamps every bound into the tensors (no
  // access outside q, k, v, out; compute-sanitizer runs this test), the second rejects them by name and launches
  // nothing.
  const int64_t heads = 2, TQ = 200, TK = 300, guard = 4096;
  std::vector<uint16_t> q(TQ * heads * 192, 0x3c00), k(TK * heads * 192, 0x3c00), v(TK * heads * 128, 0x3c00);
  Device dq(q), dk(k), dv(v);
  Device dcq(std::vector<int32_t>{0, 150, 90, 1 << 30}), dck(std::vector<int32_t>{-5, 400, 10, 20});
  const uint16_t canary = 0x7fc1;
  auto call = [&](bool portable) {
    Device dout(std::vector<uint16_t>(TQ * heads * 128 + guard, canary));
    PrefillParams p;
    p.batch = 3, p.num_heads = heads, p.total_q = TQ, p.total_k = TK, p.dtype = DType::BF16;
    p.cu_seqlens_on_device = true;
    p.cu_seqlens_q = static_cast<const int32_t*>(dcq.data()), p.cu_seqlens_k = static_cast<const int32_t*>(dck.data());
    p.q = dq.data(), p.k = dk.data(), p.v = dv.data(), p.out = dout.data();
    p.softmax_scale = 0.1f;
    if (portable) setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
    bool threw = false;
    try {
      prefill_attention("cuda", p);
    } catch (const InvalidArgument& e) {
      threw = true;
      EXPECT_NE(std::string(e.what()).find("cu_seqlens_q"), std::string::npos) << e.what();
    }
    if (portable) unsetenv("MLA_CUDA_DISABLE_SM90");
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> out = dout.read<uint16_t>(TQ * heads * 128 + guard);
    EXPECT_TRUE(std::all_of(out.end() - guard, out.end(), [&](uint16_t x) { return x == canary; }))
        << "written past out";
    return std::make_pair(threw, std::all_of(out.begin(), out.end() - guard, [&](uint16_t x) { return x == canary; }));
  };
  const auto [threw_portable, untouched_portable] = call(true);
  EXPECT_TRUE(threw_portable) << "garbage device-side cu_seqlens were accepted by the host-checked path";
  EXPECT_TRUE(untouched_portable) << "out was written by a rejected call";
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major == 9) EXPECT_FALSE(call(false).first) << "the one-launch path should clamp, not throw";
}

TEST(CudaPrefill, OneLaunchManySequences) {
  SKIP_WITHOUT_GPU();
  // More than 32 sequences: the kernel's search for its sequence runs over several 32-wide steps.
  std::vector<int32_t> nq, nk;
  uint64_t s = 12345;
  for (int b = 0; b < 70; ++b) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const int32_t n = static_cast<int32_t>((s >> 33) % 300);
    nq.push_back(b % 9 == 4 ? 0 : n), nk.push_back(n + static_cast<int32_t>((s >> 20) % 3 == 0 ? (s >> 40) % 200 : 0));
  }
  run_prefill_case(2, 192, 128, nq, nk, DType::BF16, 21);
}

TEST(CudaPrefill, PortablePathOnHopper) {
  SKIP_WITHOUT_GPU();
  setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
  run_prefill_case(3, 192, 128, {100, 0, 257, 1, 64}, {100, 5, 300, 1013, 64}, DType::BF16, 11);
  unsetenv("MLA_CUDA_DISABLE_SM90");
}

TEST(CudaPrefill, GenericKernel) {
  SKIP_WITHOUT_GPU();
  run_prefill_case(2, 64, 48, {40, 17}, {57, 17}, DType::F32, 3);
  run_prefill_case(3, 80, 40, {33}, {70}, DType::BF16, 4);
  run_prefill_case(2, 192, 128, {70, 3}, {90, 3}, DType::F32, 5);
}

// ---- prefill_attention_backward ----------------------------------------------------------------------------

// The bf16 192/128 backward on "cuda" against the fast CPU backward (itself tested against the scalar reference in
// test_backward.cpp) on the same bf16-rounded inputs: q, k, v, d_out random, out and lse from the CPU forward
// (out rounded to bf16, as a bf16 forward hands it over). Errors are measured against max |gradient| per tensor.
// F32 (any head dims) runs the generic kernels: the same comparison, inputs not rounded, bound 1e-5.
void run_backward_case(int64_t heads, const std::vector<int32_t>& nq, const std::vector<int32_t>& nk, bool causal,
                       uint64_t seed, DType dtype = DType::BF16, int64_t dqk = 192, int64_t dv = 128) {
  const bool f32 = dtype == DType::F32;
  std::vector<int32_t> cq{0}, ck{0};
  for (size_t b = 0; b < nq.size(); ++b) cq.push_back(cq.back() + nq[b]), ck.push_back(ck.back() + nk[b]);
  const int64_t TQ = cq.back(), TK = ck.back();
  auto rnd = [f32](size_t n, uint64_t s) {
    std::vector<float> v = testing::random_values(n, s);
    if (!f32)
      for (float& x : v) x = round_bf16(x);
    return v;
  };
  auto bits = [](const std::vector<float>& x) {
    std::vector<uint16_t> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = float_to_bf16(x[i]);
    return y;
  };
  auto floats = [](const std::vector<uint16_t>& x) {
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = bf16_to_float(x[i]);
    return y;
  };
  const std::vector<float> q = rnd(static_cast<size_t>(TQ * heads * dqk), seed),
                           k = rnd(static_cast<size_t>(TK * heads * dqk), seed + 1),
                           v = rnd(static_cast<size_t>(TK * heads * dv), seed + 2),
                           d_out = rnd(static_cast<size_t>(TQ * heads * dv), seed + 3);
  const float scale = 1.f / std::sqrt(static_cast<float>(dqk));
  std::vector<float> out(static_cast<size_t>(TQ * heads * dv)), lse(static_cast<size_t>(heads * TQ));
  PrefillParams f;
  f.batch = static_cast<int64_t>(nq.size()), f.num_heads = heads, f.head_dim_qk = dqk, f.head_dim_v = dv;
  f.total_q = TQ, f.total_k = TK, f.dtype = DType::F32, f.cu_seqlens_q = cq.data(), f.cu_seqlens_k = ck.data();
  f.q = q.data(), f.k = k.data(), f.v = v.data(), f.softmax_scale = scale, f.causal = causal;
  f.out = out.data(), f.lse = lse.data();
  prefill_attention("cpu", f);
  if (!f32)
    for (float& x : out) x = round_bf16(x);

  PrefillBackwardParams p;
  p.batch = f.batch, p.num_heads = heads, p.head_dim_qk = dqk, p.head_dim_v = dv, p.total_q = TQ, p.total_k = TK;
  p.dtype = DType::F32, p.cu_seqlens_q = cq.data(), p.cu_seqlens_k = ck.data();
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data(), p.d_out = d_out.data();
  p.softmax_scale = scale, p.causal = causal;
  std::vector<float> want_dq(q.size()), want_dk(k.size()), want_dv(v.size());
  p.d_q = want_dq.data(), p.d_k = want_dk.data(), p.d_v = want_dv.data();
  prefill_attention_backward("cpu", p);

  std::vector<float> got[2][3];  // [host cu_seqlens, device cu_seqlens][d_q, d_k, d_v]
  for (const bool device_cu : {false, true}) {
    // Inputs in dtype; outputs poisoned with NaN, so that an element the op does not write fails.
    auto upload = [&](const std::vector<float>& x) { return f32 ? Device(x) : Device(bits(x)); };
    auto poisoned = [&](size_t n) {
      return f32 ? Device(std::vector<float>(n, std::nanf(""))) : Device(std::vector<uint16_t>(n, 0x7fc0));
    };
    auto download = [&](const Device& x, size_t n) { return f32 ? x.read<float>(n) : floats(x.read<uint16_t>(n)); };
    Device gq = upload(q), gk = upload(k), gv = upload(v), gout = upload(out), gdo = upload(d_out), glse(lse),
           gcq(cq), gck(ck);
    Device gdq = poisoned(q.size()), gdk = poisoned(k.size()), gdv = poisoned(v.size());
    PrefillBackwardParams d = p;
    d.dtype = dtype;
    d.cu_seqlens_on_device = device_cu;
    d.cu_seqlens_q = device_cu ? static_cast<const int32_t*>(gcq.data()) : cq.data();
    d.cu_seqlens_k = device_cu ? static_cast<const int32_t*>(gck.data()) : ck.data();
    d.q = gq.data(), d.k = gk.data(), d.v = gv.data(), d.out = gout.data(), d.d_out = gdo.data();
    d.lse = static_cast<const float*>(glse.data());
    d.d_q = gdq.data(), d.d_k = gdk.data(), d.d_v = gdv.data();
    const int64_t bytes = prefill_attention_backward_workspace_bytes("cuda", d);
    Device ws(std::vector<uint8_t>(static_cast<size_t>(bytes), 0xff));  // garbage: the op must zero what it needs
    d.workspace = ws.data();
    prefill_attention_backward("cuda", d);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    got[device_cu][0] = download(gdq, q.size());
    got[device_cu][1] = download(gdk, k.size());
    got[device_cu][2] = download(gdv, v.size());
  }
  const std::vector<float>* want[3] = {&want_dq, &want_dk, &want_dv};
  const char* names[3] = {"d_q", "d_k", "d_v"};
  for (int t = 0; t < 3; ++t) {
    double err = 0.0, ref = 0.0;
    size_t worst = 0;
    for (size_t i = 0; i < want[t]->size(); ++i) {
      const double e = std::abs(static_cast<double>(got[0][t][i]) - (*want[t])[i]);
      if (!(e <= err)) err = e, worst = i;  // NaN lands here too
      ref = std::max(ref, std::abs(static_cast<double>((*want[t])[i])));
    }
    EXPECT_LE(err, (f32 ? 1e-5 : 2e-2) * ref) << names[t] << ": max abs error " << err << " at " << worst << " (got "
                               << got[0][t][worst] << ", want " << (*want[t])[worst] << "), max |want| " << ref;
    // Atomics make the fast d_q's fp32 sums order-dependent; d_k and d_v are one block's registers, so bit-exact
    // (the generic kernels use no atomics: all three).
    if (t > 0 || f32)
      EXPECT_EQ(std::memcmp(got[0][t].data(), got[1][t].data(), got[0][t].size() * sizeof(float)), 0)
          << names[t] << ": cu_seqlens in device memory gave other bits than in host memory";
  }
}

TEST(CudaPrefillBackward, CausalVarlen) {
  SKIP_WITHOUT_GPU();
  // lengths off the 64-key and 16-query tiles, n_q < n_k, a sequence without queries, one without keys for its
  // queries (n_q > n_k: its first queries see nothing), one query
  run_backward_case(3, {100, 0, 37, 1, 64, 5}, {100, 70, 300, 13, 64, 2}, true, 1);
  run_backward_case(2, {129, 200}, {129, 333}, true, 2);
  // the sm90 kernel's tiles: 128 keys a block, 64 queries a step, a two-stage ring (steps 1, 2, 3 and many)
  run_backward_case(2, {64, 65, 128, 129, 191, 300}, {128, 129, 256, 129, 130, 300}, true, 9);
}

TEST(CudaPrefillBackward, LongSequence) {
  SKIP_WITHOUT_GPU();
  run_backward_case(2, {1000}, {1000}, true, 3);
  run_backward_case(1, {517}, {1030}, true, 4);
}

TEST(CudaPrefillBackward, NonCausal) {
  SKIP_WITHOUT_GPU();
  run_backward_case(2, {70, 3, 0}, {90, 130, 20}, false, 5);
}

// On Hopper the cases above run the sm90 kernel; these run the sm80 one there too.
TEST(CudaPrefillBackward, PortableKernelsOnHopper) {
  SKIP_WITHOUT_GPU();
  setenv("MLA_CUDA_DISABLE_SM90", "1", 1);
  run_backward_case(3, {100, 0, 37, 1, 64, 5}, {100, 70, 300, 13, 64, 2}, true, 11);
  run_backward_case(1, {517}, {1030}, true, 12);
  run_backward_case(2, {70, 3, 0}, {90, 130, 20}, false, 13);
  unsetenv("MLA_CUDA_DISABLE_SM90");
}

TEST(CudaPrefillBackward, GenericKernelsF32AndOtherHeadDims) {
  SKIP_WITHOUT_GPU();
  run_backward_case(3, {100, 0, 37, 1, 5}, {100, 70, 300, 13, 2}, true, 6, DType::F32);
  run_backward_case(2, {70, 3, 0}, {90, 130, 20}, false, 7, DType::F32, 24, 40);
  run_backward_case(4, {150, 9}, {150, 20}, true, 8, DType::BF16, 112, 40);  // the golden v3-tiny's head dims
}

TEST(CudaPrefillBackward, RefusesByName) {
  SKIP_WITHOUT_GPU();
  Device buf(std::vector<uint16_t>(4 * 2 * 192, 0));
  std::vector<int32_t> cu{0, 4};
  PrefillBackwardParams p;
  p.batch = 1, p.num_heads = 2, p.total_q = 4, p.total_k = 4, p.cu_seqlens_q = cu.data(), p.cu_seqlens_k = cu.data();
  p.q = p.k = p.v = p.out = p.d_out = buf.data();
  p.lse = static_cast<const float*>(buf.data());
  p.d_q = p.d_k = p.d_v = buf.data();
  p.softmax_scale = 0.1f;
  testing::expect_throw_with<InvalidArgument>([&] { prefill_attention_backward("cuda", p); }, {"workspace"});
  p.workspace = buf.data();
  p.dtype = DType::F16;
  testing::expect_throw_with<InvalidArgument>([&] { prefill_attention_backward("cuda", p); }, {"dtype"});
  p.dtype = DType::F32, p.head_dim_qk = 8000, p.head_dim_v = 4000;
  testing::expect_throw_with<InvalidArgument>([&] { prefill_attention_backward("cuda", p); }, {"head_dim_qk", "too large"});
}

}  // namespace
}  // namespace mla
