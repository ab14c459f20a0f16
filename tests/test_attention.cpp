// The properties of spec section 8 on random weights of small odd shapes and on golden weights: fast backend
// == scalar reference, expanded == absorbed, chunked == one-shot, decode == prefill row, batches == each
// sequence alone, zero-length chunks, adversarial caches (permuted pages, NaN in unused slots, odd page sizes,
// head counts and lengths), and negative controls that prove the golden comparison catches real mistakes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>

#include "reference_f64.hpp"
#include "testing.hpp"

namespace mla {
namespace {

using testing::rel_error;
using testing::small_config;

LayerOptions opts(const char* device, Precision pr, Path path = Path::Auto) {
  LayerOptions o;
  o.device = device;
  o.precision = pr;
  o.path = path;
  return o;
}

// One forward() of n tokens of one sequence; returns the output rows.
std::vector<float> step(Attention& layer, LatentCache& cache, SeqId id, const float* hidden, int64_t n,
                        const int64_t* positions = nullptr) {
  std::vector<float> out(static_cast<size_t>(n * layer.config().hidden_size), std::nanf(""));
  const SequenceChunk chunk[] = {{id, n, positions}};
  layer.forward(chunk, hidden, out.data(), cache);
  return out;
}

// Copies the first n stored rows of `sid` in `src` into a new sequence of `dst` (through the public storage).
SeqId copy_sequence(const LatentCache& src, SeqId sid, LatentCache& dst, int64_t n) {
  const SeqId id = dst.add_sequence();
  const SeqId ids[] = {id};
  const int64_t extra[] = {n};
  dst.reserve(ids, extra);
  const auto rows = src.read_rows(sid, 0, n);
  const auto& o = dst.options();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = dst.block_table(id)[t / o.page_size] * o.page_size + t % o.page_size;
    for (int64_t j = 0; j < o.row_width; ++j) {
      const float v = rows[t * o.row_width + j];
      if (o.dtype == DType::F32) static_cast<float*>(dst.storage())[slot * o.row_width + j] = v;
      else static_cast<uint16_t*>(dst.storage())[slot * o.row_width + j] = float_to_bf16(v);
    }
  }
  dst.commit(id, n);
  return id;
}

double bf16_or(Precision pr, double f32_tol, double bf16_tol) { return pr == Precision::F32 ? f32_tol : bf16_tol; }

// Cache rows of the same tokens fed differently (chunking, batching). They depend only on the token, so they are
// bit-identical on the reference backend and in bf16. The fast backend's f32 rows come from oneDNN GEMMs whose
// kernel (sgemm for M <= 8, matmul above) and so accumulation order depend on how many tokens a call carries:
// there they agree to f32 rounding only.
void expect_same_rows(const char* dev, Precision pr, const std::vector<float>& a, const std::vector<float>& b) {
  if (std::string(dev) == "cpu" && pr == Precision::F32) {
    const double err = rel_error(a, b);
    EXPECT_LT(err, 1e-6);
    ::testing::Test::RecordProperty("f32_row_rel_diff", std::to_string(err));
  } else {
    EXPECT_EQ(a, b);
  }
}

void report(const std::string& what, double err) {
  ::testing::Test::RecordProperty(what, std::to_string(err));
}

struct Shape {
  const char* name;
  int64_t D, H, dq, dc, dn, dr, dv;
  bool yarn;
};

const Shape kShapes[] = {
    {"h1_noq_dr16", 96, 1, 0, 48, 16, 16, 24, true},
    {"h3_q40_dr32", 96, 3, 40, 48, 16, 32, 24, true},
    {"h5_q40_dr16_plain", 96, 5, 40, 48, 16, 16, 24, false},
};

// ---------------------------------------------------------------------------------------------------------
// Fast backend == scalar reference

TEST(Attention, FastMatchesReferenceRandomShapes) {
  for (const Shape& s : kShapes) {
    const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 11);
    const int64_t T = 70;
    const auto hidden = testing::random_values(static_cast<size_t>(T * s.D), 21);
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (Path path : {Path::Expanded, Path::Absorbed}) {
        SCOPED_TRACE(::testing::Message() << s.name << " " << precision_name(pr) << " " << path_name(path));
        Attention fast(w, opts("cpu", pr, path)), ref(w, opts("cpu-reference", pr, path));
        RunOptions ro;
        ro.chunk = 29;  // 29 + 29 + 12: later chunks attend to cached keys
        ro.page_size = 16;
        const RunResult a = run_sequences(fast, hidden.data(), nullptr, 1, T, ro);
        const RunResult b = run_sequences(ref, hidden.data(), nullptr, 1, T, ro);
        const double err = rel_error(a.output, b.output);
        EXPECT_LT(err, bf16_or(pr, 1e-5, 5e-3));
        EXPECT_LT(rel_error(a.latent, b.latent), bf16_or(pr, 1e-6, 5e-3));
        report(std::string(s.name) + "_" + std::string(precision_name(pr)) + "_" + std::string(path_name(path)), err);
      }
  }
}

// 600 keys = three 256-key blocks (256, 256, 88) on the fast backend's absorbed path (its expanded path takes
// them in one block here; ExpandedOverSeveralBlocksEqualsAbsorbed covers its blocks). The reference gets the fast
// backend's first 592 rows copied into its own cache (re-running a 592-token prefill on the scalar reference would
// cost seconds), then both attend 8 new tokens over all 600 keys, on both paths. The long fast prefill itself is
// checked against the float64 reference.
TEST(Attention, FastMatchesReferenceSeveralKeyBlocks) {
  const Shape s = kShapes[1];
  const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 12);
  const int64_t T0 = 592, n = 8, D = s.D;
  const auto hidden = testing::random_values(static_cast<size_t>((T0 + n) * D), 22);
  std::vector<int64_t> pos(T0 + n);
  for (int64_t i = 0; i < T0 + n; ++i) pos[i] = i;
  const testing::RefResult f64 = testing::reference_forward(w, hidden.data(), pos.data(), T0 + n);
  for (Precision pr : {Precision::F32, Precision::BF16}) {
    for (Path path : {Path::Expanded, Path::Absorbed}) {
      SCOPED_TRACE(::testing::Message() << precision_name(pr) << " " << path_name(path));
      Attention fast(w, opts("cpu", pr, path)), ref(w, opts("cpu-reference", pr, path));
      LatentCache fc = fast.make_cache(64, 16, 5), rc = ref.make_cache(64, 16, 0);
      const SeqId fid = fc.add_sequence();
      const auto prefill = step(fast, fc, fid, hidden.data(), T0);
      const SeqId rid = copy_sequence(fc, fid, rc, T0);
      const auto a = step(fast, fc, fid, hidden.data() + T0 * D, n);
      const auto b = step(ref, rc, rid, hidden.data() + T0 * D, n);
      const double err = rel_error(a, b);
      EXPECT_LT(err, bf16_or(pr, 1e-5, 5e-3));
      EXPECT_LT(rel_error(fc.read_rows(fid, T0, T0 + n), rc.read_rows(rid, T0, T0 + n)), bf16_or(pr, 1e-6, 5e-3));
      report(std::string("blocks_") + std::string(precision_name(pr)) + "_" + std::string(path_name(path)), err);
      // The 592-token prefill (query tiles of 64 over 256-key blocks) against float64.
      const std::vector<double> want(f64.output.begin(), f64.output.begin() + T0 * D);
      EXPECT_LT(testing::rel_error_f64(prefill, want), bf16_or(pr, 1e-5, 2e-2));
      const std::vector<double> want_tail(f64.output.begin() + T0 * D, f64.output.end());
      EXPECT_LT(testing::rel_error_f64(a, want_tail), bf16_or(pr, 1e-5, 2e-2));
    }
  }
}

TEST(Attention, FastMatchesReferenceGoldenWeights) {
  for (const char* name : {"v2lite-tiny", "fp8-sharded", "v3-tiny"}) {
    const testing::GoldenCase g = testing::load_golden(name);
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (Path path : {Path::Expanded, Path::Absorbed}) {
        SCOPED_TRACE(::testing::Message() << name << " " << precision_name(pr) << " " << path_name(path));
        Attention fast(g.weights, opts("cpu", pr, path)), ref(g.weights, opts("cpu-reference", pr, path));
        RunOptions ro;
        ro.page_size = 32;
        ro.chunk = 13;
        const RunResult a = run_sequences(fast, g.hidden.data(), g.positions.data(), g.batch, g.tokens, ro);
        const RunResult b = run_sequences(ref, g.hidden.data(), g.positions.data(), g.batch, g.tokens, ro);
        EXPECT_LT(rel_error(a.output, b.output), bf16_or(pr, 1e-5, 5e-3));
        EXPECT_LT(rel_error(a.latent, b.latent), bf16_or(pr, 1e-6, 5e-3));
        EXPECT_LT(rel_error(a.output, g.output), bf16_or(pr, 2e-5, 2e-2));
      }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Expanded == absorbed

TEST(Attention, ExpandedEqualsAbsorbed) {
  for (const Shape& s : kShapes) {
    const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 13);
    const int64_t T = 50;
    const auto hidden = testing::random_values(static_cast<size_t>(T * s.D), 23);
    for (const char* dev : {"cpu", "cpu-reference"})
      for (Precision pr : {Precision::F32, Precision::BF16}) {
        SCOPED_TRACE(::testing::Message() << s.name << " " << dev << " " << precision_name(pr));
        Attention ex(w, opts(dev, pr, Path::Expanded)), ab(w, opts(dev, pr, Path::Absorbed));
        RunOptions ro;
        ro.decode_after = 40;  // prefill 40, then 10 decode steps
        const RunResult a = run_sequences(ex, hidden.data(), nullptr, 1, T, ro);
        const RunResult b = run_sequences(ab, hidden.data(), nullptr, 1, T, ro);
        const double err = rel_error(a.output, b.output);
        EXPECT_LT(err, bf16_or(pr, 1e-5, 2e-2));
        // The cache rows do not depend on the path.
        EXPECT_EQ(a.latent, b.latent);
        report(std::string(s.name) + "_" + dev + "_" + std::string(precision_name(pr)), err);
        std::cout << "[expanded-vs-absorbed] " << s.name << " " << dev << " " << precision_name(pr) << " rel " << err
                  << "\n";
      }
  }
}

// The expanded path expands at most 64 MB of K and V at once (fast.cpp, kExpandedBytes): with 64 full-width heads
// (147 KB per key in f32) that is 256 keys, so 700 tokens take three blocks and every query tile's online softmax
// runs over several of them (the small shapes above fit in one block). The absorbed path, with its own kernel and
// 256-key split, must agree; so must a chunked prefill.
TEST(Attention, ExpandedOverSeveralBlocksEqualsAbsorbed) {
  const LayerWeights w = LayerWeights::random(small_config(64, 64, 0, 32, 128, 64, 128), 14);
  const int64_t T = 700;
  const auto hidden = testing::random_values(static_cast<size_t>(T * 64), 24);
  for (Precision pr : {Precision::F32, Precision::BF16}) {
    SCOPED_TRACE(precision_name(pr));
    Attention ex(w, opts("cpu", pr, Path::Expanded)), ab(w, opts("cpu", pr, Path::Absorbed));
    const RunResult a = run_sequences(ex, hidden.data(), nullptr, 1, T, {});
    const RunResult b = run_sequences(ab, hidden.data(), nullptr, 1, T, {});
    EXPECT_LT(rel_error(a.output, b.output), bf16_or(pr, 1e-5, 2e-2));
    RunOptions ro;
    ro.chunk = 300;  // 300 + 300 + 100: the later chunks' keys span blocks of cached and new rows
    const RunResult c = run_sequences(ex, hidden.data(), nullptr, 1, T, ro);
    EXPECT_LT(rel_error(c.output, a.output), bf16_or(pr, 1e-5, 1e-2));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Chunked == one-shot, decode == prefill row

TEST(Attention, ChunkedEqualsOneShot) {
  const Shape s = kShapes[1];
  const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 14);
  const int64_t T = 97, D = s.D;
  const auto hidden = testing::random_values(static_cast<size_t>(T * D), 24);
  const int64_t chunks[] = {40, 1, 17, 39};
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (Path path : {Path::Expanded, Path::Absorbed, Path::Auto}) {
        SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr) << " " << path_name(path));
        Attention layer(w, opts(dev, pr, path));
        LatentCache one = layer.make_cache(16, 16), many = layer.make_cache(16, 16, 3);
        const SeqId a = one.add_sequence(), b = many.add_sequence();
        const auto full = step(layer, one, a, hidden.data(), T);
        std::vector<float> pieces;
        int64_t done = 0;
        for (int64_t c : chunks) {
          const auto o = step(layer, many, b, hidden.data() + done * D, c);
          pieces.insert(pieces.end(), o.begin(), o.end());
          done += c;
        }
        ASSERT_EQ(done, T);
        EXPECT_EQ(many.length(b), T);
        // Auto picks the absorbed path for the 1-token chunk: bf16 then agrees only to rounding.
        const double tol = path == Path::Auto ? bf16_or(pr, 1e-5, 2e-2) : bf16_or(pr, 1e-6, 5e-3);
        const double err = rel_error(pieces, full);
        EXPECT_LT(err, tol);
        // Rows depend only on their token: identical bits however the tokens were fed.
        expect_same_rows(dev, pr, many.read_rows(b, 0, T), one.read_rows(a, 0, T));
        report(std::string(dev) + "_" + std::string(precision_name(pr)) + "_" + std::string(path_name(path)), err);
      }
}

TEST(Attention, DecodeEqualsPrefillRow) {
  for (const Shape& s : kShapes) {
    const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 15);
    const int64_t N = 33, D = s.D;
    const auto hidden = testing::random_values(static_cast<size_t>((N + 1) * D), 25);
    for (const char* dev : {"cpu", "cpu-reference"})
      for (Precision pr : {Precision::F32, Precision::BF16})
        for (Path path : {Path::Expanded, Path::Absorbed, Path::Auto}) {
          SCOPED_TRACE(::testing::Message() << s.name << " " << dev << " " << precision_name(pr) << " "
                                            << path_name(path));
          Attention layer(w, opts(dev, pr, path));
          LatentCache c1 = layer.make_cache(8, 16), c2 = layer.make_cache(8, 16);
          const SeqId a = c1.add_sequence(), b = c2.add_sequence();
          const auto full = step(layer, c1, a, hidden.data(), N + 1);
          step(layer, c2, b, hidden.data(), N);
          const auto dec = step(layer, c2, b, hidden.data() + N * D, 1);
          if (path == Path::Auto) EXPECT_EQ(layer.last_paths().at(0), Path::Absorbed);
          const std::vector<float> row(full.begin() + N * D, full.end());
          const double tol = path == Path::Auto ? bf16_or(pr, 1e-5, 2e-2) : bf16_or(pr, 1e-6, 5e-3);
          EXPECT_LT(rel_error(dec, row), tol);
          expect_same_rows(dev, pr, c2.read_rows(b, 0, N + 1), c1.read_rows(a, 0, N + 1));
        }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Batches

// Three sequences with different cached lengths, chunk lengths (one of them 0) and explicit positions in one
// call == each sequence alone in its own cache.
TEST(Attention, BatchEqualsEachAlone) {
  const Shape s = kShapes[2];
  const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 16);
  const int64_t D = s.D;
  // Per sequence: rounds of (tokens, first position).
  const int64_t rounds[2][3] = {{5, 23, 1}, {7, 0, 30}};
  const int64_t first_pos[3] = {0, 1000, 77};
  std::vector<std::vector<float>> hid(3);
  for (int q = 0; q < 3; ++q) hid[q] = testing::random_values(static_cast<size_t>(64 * D), 100 + q);
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr));
      Attention layer(w, opts(dev, pr));
      LatentCache shared = layer.make_cache(12, 8, 17);
      std::vector<LatentCache> alone;
      std::vector<SeqId> sid, aid;
      for (int q = 0; q < 3; ++q) {
        sid.push_back(shared.add_sequence());
        alone.push_back(layer.make_cache(4, 16));
        aid.push_back(alone.back().add_sequence());
      }
      std::vector<int64_t> done(3, 0);
      for (const auto& round : rounds) {
        std::vector<std::vector<int64_t>> pos(3);
        std::vector<SequenceChunk> batch;
        std::vector<float> in;
        for (int q = 0; q < 3; ++q) {
          for (int64_t i = 0; i < round[q]; ++i) pos[q].push_back(first_pos[q] + 3 * (done[q] + i));  // gaps
          in.insert(in.end(), hid[q].begin() + done[q] * D, hid[q].begin() + (done[q] + round[q]) * D);
        }
        for (int q = 0; q < 3; ++q) batch.push_back({sid[q], round[q], pos[q].data()});
        std::vector<float> out(in.size(), std::nanf(""));
        layer.forward(batch, in.data(), out.data(), shared);
        int64_t row = 0;
        for (int q = 0; q < 3; ++q) {
          const auto o = step(layer, alone[q], aid[q], hid[q].data() + done[q] * D, round[q], pos[q].data());
          const std::vector<float> part(out.begin() + row * D, out.begin() + (row + round[q]) * D);
          if (round[q] > 0) {
            EXPECT_LT(rel_error(part, o), bf16_or(pr, 1e-6, 5e-3)) << "sequence " << q;
          }
          EXPECT_EQ(layer.last_paths().size(), 1u);
          row += round[q];
          done[q] += round[q];
          EXPECT_EQ(shared.length(sid[q]), done[q]);
          expect_same_rows(dev, pr, shared.read_rows(sid[q], 0, done[q]), alone[q].read_rows(aid[q], 0, done[q]));
        }
      }
    }
}

TEST(Attention, ZeroLengthChunks) {
  const Shape s = kShapes[0];
  const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 17);
  const int64_t D = s.D;
  const auto hidden = testing::random_values(static_cast<size_t>(20 * D), 26);
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr));
      Attention layer(w, opts(dev, pr));
      LatentCache cache = layer.make_cache(8, 4, 9);
      const SeqId a = cache.add_sequence(), b = cache.add_sequence(), e = cache.add_sequence();
      step(layer, cache, a, hidden.data(), 6);
      const auto rows_a = cache.read_rows(a, 0, 6);
      const std::vector<int32_t> table_a(cache.block_table(a).begin(), cache.block_table(a).end());
      const int64_t free_before = cache.pages_free();

      // Only zero-length chunks, null buffers: a no-op.
      const SequenceChunk none[] = {{a, 0, nullptr}, {e, 0, nullptr}};
      EXPECT_NO_THROW(layer.forward(none, nullptr, nullptr, cache));
      const SequenceChunk empty[] = {{a, 0, nullptr}};
      EXPECT_NO_THROW(layer.forward(std::span<const SequenceChunk>(), nullptr, nullptr, cache));
      EXPECT_NO_THROW(layer.forward(empty, nullptr, nullptr, cache));
      EXPECT_EQ(cache.pages_free(), free_before);

      // A zero-length chunk next to a real one, in both orders.
      std::vector<float> out(5 * D, std::nanf(""));
      const SequenceChunk mixed[] = {{a, 0, nullptr}, {b, 5, nullptr}, {e, 0, nullptr}};
      layer.forward(mixed, hidden.data() + 6 * D, out.data(), cache);
      EXPECT_EQ(cache.length(a), 6);
      EXPECT_EQ(cache.length(e), 0);
      EXPECT_EQ(cache.length(b), 5);
      EXPECT_TRUE(cache.block_table(e).empty());
      EXPECT_EQ(cache.read_rows(a, 0, 6), rows_a);
      EXPECT_EQ(std::vector<int32_t>(cache.block_table(a).begin(), cache.block_table(a).end()), table_a);
      // b's output equals b alone.
      LatentCache solo = layer.make_cache(2, 4);
      const SeqId sb = solo.add_sequence();
      const auto o = step(layer, solo, sb, hidden.data() + 6 * D, 5);
      EXPECT_LT(rel_error(out, o), bf16_or(pr, 1e-6, 5e-3));
      // Then a continues normally.
      const auto o2 = step(layer, cache, a, hidden.data() + 11 * D, 2);
      EXPECT_EQ(cache.length(a), 8);
      for (float v : o2) ASSERT_TRUE(std::isfinite(v));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Adversarial caches

struct AdvCase {
  int64_t H, T;
  bool reference_too;   // also compare with the scalar reference backend
};

// Poisoned (NaN in every unused slot before every call), permuted caches of several page sizes, fed in chunks
// and then token by token, must give what a clean identity-ordered cache gives.
TEST(Attention, AdversarialCaches) {
  const AdvCase cases[] = {{1, 1, true},     {3, 17, true},      {63, 17, true},
                           {126, 17, true},  {1, 1013, false},   {3, 1013, false}};
  for (const AdvCase& ac : cases) {
    const Config cfg = small_config(32, ac.H, ac.H > 3 ? 0 : 24, 16, 8, 8, 8);
    const LayerWeights w = LayerWeights::random(cfg, 18 + ac.H);
    const int64_t T = ac.T, D = cfg.hidden_size;
    const auto hidden = testing::random_values(static_cast<size_t>(T * D), 27);
    std::vector<int64_t> pos(T);
    for (int64_t i = 0; i < T; ++i) pos[i] = 5 + i;
    std::vector<double> f64;
    if (T > 100) f64 = testing::reference_forward(w, hidden.data(), pos.data(), T).output;
    for (Precision pr : {Precision::F32, Precision::BF16}) {
      std::vector<const char*> devs = {"cpu"};
      if (ac.reference_too) devs.push_back("cpu-reference");
      for (const char* dev : devs) {
        Attention layer(w, opts(dev, pr));
        RunOptions clean;
        clean.chunk = T > 100 ? 300 : 7;
        clean.decode_after = T > 100 ? T - 3 : T - T / 3;
        const RunResult base = run_sequences(layer, hidden.data(), pos.data(), 1, T, clean);
        for (float v : base.output) ASSERT_TRUE(std::isfinite(v));
        if (!f64.empty() && pr == Precision::F32) EXPECT_LT(testing::rel_error_f64(base.output, f64), 1e-5);
        for (int64_t page : {1, 16, 64, 256}) {
          if (T > 100 && page == 1 && ac.H > 1) continue;  // keep the run short
          SCOPED_TRACE(::testing::Message() << "H=" << ac.H << " T=" << T << " " << dev << " "
                                            << precision_name(pr) << " page=" << page);
          RunOptions adv = clean;
          adv.page_size = page;
          adv.page_order_seed = 1234 + page;
          adv.poison_unused = true;
          const RunResult r = run_sequences(layer, hidden.data(), pos.data(), 1, T, adv);
          EXPECT_LT(rel_error(r.output, base.output), bf16_or(pr, 1e-6, 1e-3));
          EXPECT_EQ(r.latent, base.latent);
        }
      }
    }
    if (ac.reference_too) {  // and the two backends agree on the clean run
      for (Precision pr : {Precision::F32, Precision::BF16}) {
        Attention fast(w, opts("cpu", pr)), ref(w, opts("cpu-reference", pr));
        RunOptions ro;
        ro.page_size = 16;
        ro.page_order_seed = 3;
        ro.poison_unused = true;
        const RunResult a = run_sequences(fast, hidden.data(), pos.data(), 1, T, ro);
        const RunResult b = run_sequences(ref, hidden.data(), pos.data(), 1, T, ro);
        EXPECT_LT(rel_error(a.output, b.output), bf16_or(pr, 1e-5, 5e-3)) << "H=" << ac.H << " T=" << T;
      }
    }
  }
}

// NaN in unused slots written directly with fill_unused before a call that extends a sequence inside a
// partly filled page: the kernels must read only the stored rows.
TEST(Attention, FillUnusedBeforeEachCall) {
  const Config cfg = small_config(32, 3, 24, 16, 8, 8, 8);
  const LayerWeights w = LayerWeights::random(cfg, 31);
  const int64_t D = cfg.hidden_size, T = 40;
  const auto hidden = testing::random_values(static_cast<size_t>(T * D), 28);
  for (const char* dev : {"cpu", "cpu-reference"})
    for (Precision pr : {Precision::F32, Precision::BF16})
      for (Path path : {Path::Expanded, Path::Absorbed}) {
        SCOPED_TRACE(::testing::Message() << dev << " " << precision_name(pr) << " " << path_name(path));
        Attention layer(w, opts(dev, pr, path));
        LatentCache clean = layer.make_cache(4, 16), dirty = layer.make_cache(12, 8, 77);
        const SeqId a = clean.add_sequence(), b = dirty.add_sequence(), other = dirty.add_sequence();
        std::vector<float> x, y;
        int64_t done = 0;
        for (int64_t c : {3, 9, 1, 1, 26}) {
          dirty.fill_unused(std::nanf(""));
          const auto o1 = step(layer, clean, a, hidden.data() + done * D, c);
          const auto o2 = step(layer, dirty, b, hidden.data() + done * D, c);
          x.insert(x.end(), o1.begin(), o1.end());
          y.insert(y.end(), o2.begin(), o2.end());
          if (done == 0) step(layer, dirty, other, hidden.data(), 2);  // interleaved pages of another sequence
          done += c;
        }
        EXPECT_LT(rel_error(y, x), bf16_or(pr, 1e-6, 1e-3));
        EXPECT_EQ(dirty.read_rows(b, 0, T), clean.read_rows(a, 0, T));
      }
}

// ---------------------------------------------------------------------------------------------------------
// FP8 cache (cache_dtype FP8, bf16 layers): the fast backend writes the bytes store_row writes and reads exactly
// load_row's values, so it agrees with the scalar reference to accumulation order (and the odd fp8 code that a
// different f32 accumulation of kv_a flips), on both paths, every page size and feed, with NaN in unused slots.

LayerOptions fp8_opts(const char* device, Path path) {
  LayerOptions o = opts(device, Precision::BF16, path);
  o.cache_dtype = CacheDtype::FP8;
  return o;
}

TEST(Attention, Fp8CacheFastMatchesReference) {
  // Five heads with a q projection and plain rope; two heads without one, d_c 136: a short second scale group.
  const Shape shapes[] = {kShapes[2], {"h2_noq_dc136_dr16", 64, 2, 0, 136, 16, 16, 24, true}};
  struct Feed {
    const char* name;
    int64_t page_size, chunk, decode_after;
  };
  const Feed feeds[] = {{"oneshot_p1", 1, 0, -1}, {"chunked_p16", 16, 19, -1}, {"decode_p64", 64, 0, 36}};
  double worst = 0;
  for (const Shape& s : shapes) {
    const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 11);
    const int64_t T = 44;
    const auto hidden = testing::random_values(static_cast<size_t>(T * s.D), 21);
    for (Path path : {Path::Expanded, Path::Absorbed}) {
      Attention fast(w, fp8_opts("cpu", path)), ref(w, fp8_opts("cpu-reference", path));
      for (const Feed& f : feeds) {
        SCOPED_TRACE(::testing::Message() << s.name << " " << path_name(path) << " " << f.name);
        RunOptions ro;
        ro.chunk = f.chunk, ro.page_size = f.page_size, ro.decode_after = f.decode_after, ro.page_order_seed = 9;
        const RunResult b = run_sequences(ref, hidden.data(), nullptr, 1, T, ro);
        ro.poison_unused = true;  // NaN in every unused slot before each call must never reach an output
        const RunResult a = run_sequences(fast, hidden.data(), nullptr, 1, T, ro);
        const double err = rel_error(a.output, b.output);
        EXPECT_LT(err, 5e-3);
        EXPECT_LT(rel_error(a.latent, b.latent), 5e-3);
        worst = std::max(worst, err);
      }
    }
  }
  report("fp8_fast_vs_reference_worst", worst);
}

// The same over several key blocks (600 keys: 256-key blocks on both paths' gathers and the lanes kernel's
// panels), decode after a prefill, against the bf16 layer over a bf16 cache holding the same dequantised rows:
// the fast backend reads exactly those values, so only the new tokens' own rows (fp8 against bf16) differ.
TEST(Attention, Fp8CacheSeveralKeyBlocksMatchesReference) {
  const Shape s = kShapes[1];
  const LayerWeights w = LayerWeights::random(small_config(s.D, s.H, s.dq, s.dc, s.dn, s.dr, s.dv, s.yarn), 12);
  const int64_t T0 = 592, n = 8, D = s.D;
  const auto hidden = testing::random_values(static_cast<size_t>((T0 + n) * D), 22);
  for (Path path : {Path::Expanded, Path::Absorbed}) {
    SCOPED_TRACE(path_name(path));
    Attention fast(w, fp8_opts("cpu", path)), ref(w, fp8_opts("cpu-reference", path));
    LatentCache fc = fast.make_cache(64, 16, 5), rc = ref.make_cache(64, 16, 0);
    const SeqId fid = fc.add_sequence();
    step(fast, fc, fid, hidden.data(), T0);
    // The reference gets the fast backend's stored bytes (whole pages, same table order).
    const SeqId rid = rc.add_sequence();
    const SeqId ids[] = {rid};
    const int64_t extra[] = {T0};
    rc.reserve(ids, extra);
    for (int64_t t = 0; t < T0; ++t)
      std::memcpy(
          static_cast<std::byte*>(rc.storage()) + (rc.block_table(rid)[t / 16] * 16 + t % 16) * rc.row_bytes(),
          static_cast<const std::byte*>(fc.storage()) + (fc.block_table(fid)[t / 16] * 16 + t % 16) * fc.row_bytes(),
          static_cast<size_t>(fc.row_bytes()));
    rc.commit(rid, T0);
    fc.fill_unused(std::nanf(""));
    rc.fill_unused(std::nanf(""));
    std::vector<float> a, b;
    for (int64_t i = 0; i < n; ++i) {  // decode one token at a time
      const auto oa = step(fast, fc, fid, hidden.data() + (T0 + i) * D, 1);
      const auto ob = step(ref, rc, rid, hidden.data() + (T0 + i) * D, 1);
      a.insert(a.end(), oa.begin(), oa.end());
      b.insert(b.end(), ob.begin(), ob.end());
    }
    const double err = rel_error(a, b);
    EXPECT_LT(err, 5e-3);
    report(std::string("fp8_blocks_") + std::string(path_name(path)), err);
  }
}

// FP8 against BF16 on a V3-shaped layer (kv_lora_rank 512, rope 64, nope 128, v 128; 4 heads instead of 128 and
// narrower hidden and q_lora sizes, for time) whose kv_a_layernorm has a realistic spread: most channels near 1, a few
// outliers 8-16x larger, so each 128-group's scale is set by its outliers as in real checkpoints. Both against
// the float64 reference; the FP8 error is reported and bounded by the 5e-2.
// (Suite AttentionAccuracy: not rerun per kernel variant.)
TEST(AttentionAccuracy, Fp8CacheV3Shape) {
  const Config cfg = small_config(256, 4, 128, 512, 128, 64, 128);
  LayerWeights w = LayerWeights::random(cfg, 41);
  const auto noise = testing::random_values(w.kv_a_norm.size(), 42);
  for (size_t j = 0; j < w.kv_a_norm.size(); ++j)
    w.kv_a_norm[j] = (0.6f + 0.5f * std::fabs(noise[j])) * (j % 61 == 7 ? 8.f + 8.f * std::fabs(noise[j]) : 1.f);
  const int64_t T = 48, D = cfg.hidden_size;
  const auto hidden = testing::random_values(static_cast<size_t>(T * D), 43);
  std::vector<int64_t> pos(T);
  for (int64_t i = 0; i < T; ++i) pos[i] = i;
  const testing::RefResult f64 = testing::reference_forward(w, hidden.data(), pos.data(), T);
  RunOptions ro;
  ro.page_size = 64;
  ro.decode_after = 32;  // prefill 32, then 16 decode steps over the fp8 rows
  for (Path path : {Path::Expanded, Path::Absorbed}) {
    SCOPED_TRACE(path_name(path));
    Attention bf16(w, opts("cpu", Precision::BF16, path)), fp8(w, fp8_opts("cpu", path));
    const RunResult rb = run_sequences(bf16, hidden.data(), nullptr, 1, T, ro);
    const RunResult rf = run_sequences(fp8, hidden.data(), nullptr, 1, T, ro);
    const double err_bf16 = testing::rel_error_f64(rb.output, f64.output);
    const double err_fp8 = testing::rel_error_f64(rf.output, f64.output);
    const double lat_fp8 = testing::rel_error_f64(rf.latent, f64.latent);
    const double fp8_vs_bf16 = rel_error(rf.output, rb.output);
    EXPECT_LT(err_bf16, 2e-2);
    EXPECT_LT(err_fp8, 5e-2);
    EXPECT_LT(lat_fp8, 5e-2);
    EXPECT_GT(err_fp8, err_bf16);  // the fp8 rows are really read (a bf16 fallback would not lose accuracy)
    const std::string p(path_name(path));
    report("v3shape_bf16_vs_f64_" + p, err_bf16);
    report("v3shape_fp8_vs_f64_" + p, err_fp8);
    report("v3shape_fp8_latent_vs_f64_" + p, lat_fp8);
    report("v3shape_fp8_vs_bf16_" + p, fp8_vs_bf16);
    std::cout << "  V3-shaped, " << p << ": output rel. error vs float64: bf16 cache " << err_bf16 << ", fp8 cache "
              << err_fp8 << " (latent " << lat_fp8 << "); fp8 vs bf16 " << fp8_vs_bf16 << "\n";
  }
}

// ---------------------------------------------------------------------------------------------------------
// The float64 reference and the negative controls

TEST(NegativeControls, F64ReferenceMatchesEveryGolden) {
  for (const std::string& name : testing::golden_cases()) {
    const testing::GoldenCase g = testing::load_golden(name);
    const int64_t D = g.weights.config.hidden_size, W = g.weights.config.latent_dim();
    std::vector<double> out, lat;
    for (int64_t b = 0; b < g.batch; ++b) {
      const auto r = testing::reference_forward(g.weights, g.hidden.data() + b * g.tokens * D,
                                                g.positions.data() + b * g.tokens, g.tokens);
      out.insert(out.end(), r.output.begin(), r.output.end());
      lat.insert(lat.end(), r.latent.begin(), r.latent.end());
    }
    const double eo = testing::rel_error_f64(out, g.output), el = testing::rel_error_f64(lat, g.latent);
    EXPECT_LT(eo, 2e-5) << name;
    EXPECT_LT(el, 2e-5) << name;
    EXPECT_EQ(W * g.tokens * g.batch, static_cast<int64_t>(lat.size()));
    std::cout << "[f64-reference] " << name << " output rel " << eo << " latent rel " << el << "\n";
    report(name, eo);
  }
}

struct VariantErrors {
  double output, latent;
};

VariantErrors variant_error(const testing::GoldenCase& g, testing::Variant v) {
  const int64_t D = g.weights.config.hidden_size;
  std::vector<double> out, lat;
  for (int64_t b = 0; b < g.batch; ++b) {
    const auto r = testing::reference_forward(g.weights, g.hidden.data() + b * g.tokens * D,
                                              g.positions.data() + b * g.tokens, g.tokens, v);
    out.insert(out.end(), r.output.begin(), r.output.end());
    lat.insert(lat.end(), r.latent.begin(), r.latent.end());
  }
  return {testing::rel_error_f64(out, g.output), testing::rel_error_f64(lat, g.latent)};
}

// Each wrong variant must miss the goldens by far more than the 2e-5 f32 tolerance of test_golden (the
// threshold, 2e-3, is 100x that tolerance); the correct one must pass.
TEST(NegativeControls, WrongVariantsFailGolden) {
  using testing::Variant;
  for (const char* name : {"yarn-ramp", "v3-tiny"}) {
    const testing::GoldenCase g = testing::load_golden(name);
    const VariantErrors ok = variant_error(g, Variant::Correct);
    EXPECT_LT(ok.output, 2e-5) << name;
    EXPECT_LT(ok.latent, 2e-5) << name;
    std::cout << "[negative-control] " << name << " correct: output " << ok.output << " latent " << ok.latent << "\n";
    for (Variant v : {Variant::HalfSplitRope, Variant::LayerNorm, Variant::Tau576}) {
      const VariantErrors e = variant_error(g, v);
      std::cout << "[negative-control] " << name << " " << testing::variant_name(v) << ": output " << e.output
                << " latent " << e.latent << "\n";
      report(std::string(name) + "_" + testing::variant_name(v), e.output);
      EXPECT_GT(e.output, 2e-3) << name << " " << testing::variant_name(v);
    }
  }
}

// ε = rms_norm_eps (1e-5 on yarn-ramp) in the latent norms changes each norm by only ~(1e-5 − 1e-6)/(2·mean x²),
// so the damage is small. It must still be well above the float64 reference's own error and above what the
// library's f32 build achieves on that case, so that a tolerance between the two tells them apart.
TEST(NegativeControls, ConfigEpsOnYarnRamp) {
  using testing::Variant;
  const testing::GoldenCase g = testing::load_golden("yarn-ramp");
  ASSERT_DOUBLE_EQ(g.weights.config.rms_norm_eps, 1e-5);
  const VariantErrors ok = variant_error(g, Variant::Correct), bad = variant_error(g, Variant::ConfigEps);
  std::cout << "[negative-control] yarn-ramp config-eps: output " << bad.output << " latent " << bad.latent << "\n";
  report("config_eps_output", bad.output);
  report("config_eps_latent", bad.latent);
  EXPECT_GT(bad.output, 10 * ok.output);
  EXPECT_GT(bad.latent, 10 * ok.latent);
  EXPECT_GT(std::max(bad.output, bad.latent), testing::kGoldenToleranceF32);  // fails the golden comparison
  // What the library's f32 build gets on yarn-ramp, on both backends.
  for (const char* dev : {"cpu", "cpu-reference"}) {
    Attention layer(g.weights, opts(dev, Precision::F32));
    const RunResult r = run_sequences(layer, g.hidden.data(), g.positions.data(), g.batch, g.tokens, {});
    const double eo = rel_error(r.output, g.output), el = rel_error(r.latent, g.latent);
    std::cout << "[negative-control] yarn-ramp library f32 " << dev << ": output " << eo << " latent " << el << "\n";
    EXPECT_LT(eo, bad.output / 3) << dev;
    EXPECT_LT(el, bad.latent / 3) << dev;
  }
  // On v3-tiny rms_norm_eps is 1e-6: the variant is the correct computation there.
  const testing::GoldenCase v3 = testing::load_golden("v3-tiny");
  EXPECT_EQ(variant_error(v3, Variant::ConfigEps).output, variant_error(v3, Variant::Correct).output);
}

}  // namespace
}  // namespace mla
