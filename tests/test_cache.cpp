// The paged latent cache: page accounting, all-or-nothing reservations, permuted block tables, poisoning of
// unused slots, and a failed forward() leaving everything as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <tuple>

#include "testing.hpp"

namespace mla {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

LatentCache make(int64_t pages, int64_t page_size, int64_t width = 6, DType dtype = DType::F32, uint64_t seed = 0) {
  CacheOptions o;
  o.num_pages = pages;
  o.page_size = page_size;
  o.row_width = width;
  o.dtype = dtype;
  o.device = "cpu";
  o.page_order_seed = seed;
  return LatentCache(o);
}

// Row value that identifies (sequence, token, column).
float tag(SeqId id, int64_t t, int64_t j) { return static_cast<float>(1000 * (id + 1) + 10 * t + j) / 64.f; }

// Writes the tagged row of token t straight into storage (as a backend would).
void write_row(LatentCache& c, SeqId id, int64_t t) {
  const auto& o = c.options();
  const int64_t slot = c.block_table(id)[t / o.page_size] * o.page_size + t % o.page_size;
  for (int64_t j = 0; j < o.row_width; ++j) {
    const float v = tag(id, t, j);
    if (o.dtype == DType::F32) static_cast<float*>(c.storage())[slot * o.row_width + j] = v;
    else static_cast<uint16_t*>(c.storage())[slot * o.row_width + j] = float_to_bf16(v);
  }
}

std::vector<float> expected_rows(SeqId id, int64_t n, int64_t width, bool bf16 = false) {
  std::vector<float> r;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < width; ++j) r.push_back(bf16 ? round_bf16(tag(id, t, j)) : tag(id, t, j));
  return r;
}

// Adds a sequence with n tagged tokens.
SeqId add_filled(LatentCache& c, int64_t n) {
  const SeqId id = c.add_sequence();
  const SeqId ids[] = {id};
  const int64_t extra[] = {n};
  c.reserve(ids, extra);
  for (int64_t t = 0; t < n; ++t) write_row(c, id, t);
  c.commit(id, n);
  return id;
}

std::vector<int32_t> table(const LatentCache& c, SeqId id) {
  auto s = c.block_table(id);
  return {s.begin(), s.end()};
}

TEST(Cache, PageSizeValidation) {
  for (int64_t p : {0, 3, 512, -1, 6, 100, 257}) {
    SCOPED_TRACE(p);
    try {
      make(4, p);
      ADD_FAILURE() << "accepted page size " << p;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("page_size"), std::string::npos) << e.what();
    }
  }
  for (int64_t p = 1; p <= 256; p *= 2) {
    SCOPED_TRACE(p);
    LatentCache c = make(3, p);
    EXPECT_EQ(c.pages_total(), 3);
    EXPECT_EQ(c.pages_free(), 3);
    EXPECT_EQ(c.page_bytes(), p * 6 * 4);
  }
  EXPECT_THROW(make(0, 16), InvalidArgument);
  CacheOptions o;
  o.num_pages = 2;
  o.row_width = 8;
  o.dtype = DType::F16;
  EXPECT_THROW(LatentCache{o}, InvalidArgument);
  o.dtype = DType::BF16;
  o.row_width = 0;
  EXPECT_THROW(LatentCache{o}, InvalidArgument);
}

// num_pages x page_size x row_width x 4 wrapped to 0 bytes for 2^26 x 256 x 2^28 and fill_unused() then wrote
// past the allocation: the product is checked, and capped at kMaxCacheBytes.
TEST(Cache, SizeOverflowRejectedByName) {
  for (auto [pages, page_size, width] : {std::tuple<int64_t, int64_t, int64_t>{int64_t{1} << 26, 256, int64_t{1} << 28},
                                         {1, 1, int64_t{1} << 62},                // row_width x 4 alone overflows
                                         {int64_t{1} << 30, 256, 256}}) {         // 2^48 bytes: over the cap
    SCOPED_TRACE(::testing::Message() << pages << " x " << page_size << " x " << width);
    // Init-captures: clang before 16 cannot capture structured bindings (P1091).
    testing::expect_throw_with<InvalidArgument>([p = pages, s = page_size, w = width] { make(p, s, w); },
                                                {"num_pages (" + std::to_string(pages) + ")",
                                                 "row_width (" + std::to_string(width) + ")", "page_size", "limit"});
  }
}

// Below the cap, a pool larger than the machine's memory is refused before it is allocated (64 TiB here).
TEST(Cache, PoolLargerThanMemoryIsOutOfMemory) {
  testing::expect_throw_with<OutOfMemory>([&] { make(int64_t{1} << 28, 256, 256); },
                                          {"num_pages (268435456)", "row_width (256)", "cannot allocate"});
  EXPECT_EQ(make(2, 4).pages_free(), 2);  // and ordinary caches still work
}

// reserve() with many sequences (each listed once, or twice: they accumulate) is not quadratic.
TEST(Cache, ReserveManySequences) {
  LatentCache c = make(300010, 1, 2);
  std::vector<SeqId> ids;
  for (int i = 0; i < 150000; ++i) ids.push_back(c.add_sequence());
  ids.push_back(ids[5]);
  std::vector<int64_t> extra(ids.size(), 2);
  const auto t0 = std::chrono::steady_clock::now();
  c.reserve(ids, extra);
  // ~0.2-3 s here; the quadratic check took 43 s for 150000 sequences.
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
  EXPECT_EQ(c.capacity(ids[5]), 4);
  EXPECT_EQ(c.capacity(ids[6]), 2);
  EXPECT_EQ(c.pages_free(), 300010 - 150000 * 2 - 2);  // 2 tokens each, 2 more for ids[5]; one page per token
}

// first_non_finite() finds NaN and infinity in written (not yet committed) rows, in f32 and bf16 caches.
TEST(Cache, FirstNonFinite) {
  for (DType dt : {DType::F32, DType::BF16})
    for (float bad : {kNaN, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dt) << " " << bad);
      LatentCache c = make(4, 4, 6, dt, 3);
      const SeqId id = add_filled(c, 3);
      const SeqId ids[] = {id};
      const int64_t extra[] = {6};
      c.reserve(ids, extra);
      for (int64_t t = 3; t < 9; ++t) write_row(c, id, t);
      EXPECT_EQ(c.first_non_finite(id, 0, 9), -1);
      const int64_t slot = c.block_table(id)[6 / 4] * 4 + 6 % 4;  // token 6, column 5
      if (dt == DType::F32) static_cast<float*>(c.storage())[slot * 6 + 5] = bad;
      else static_cast<uint16_t*>(c.storage())[slot * 6 + 5] = float_to_bf16(bad);
      EXPECT_EQ(c.first_non_finite(id, 0, 9), 6);
      EXPECT_EQ(c.first_non_finite(id, 3, 6), -1);
      EXPECT_EQ(c.first_non_finite(id, 6, 7), 6);
      EXPECT_THROW(c.first_non_finite(id, 0, 13), InvalidArgument);  // past capacity
    }
}

TEST(Cache, ReserveCommitLengthCapacity) {
  LatentCache c = make(8, 4);
  EXPECT_EQ(c.row_bytes(), 24);
  const SeqId a = c.add_sequence(), b = c.add_sequence();
  EXPECT_NE(a, b);
  EXPECT_TRUE(c.contains(a));
  EXPECT_TRUE(c.contains(b));
  EXPECT_EQ(c.sequences(), (std::vector<SeqId>{a, b}));
  EXPECT_EQ(c.length(a), 0);
  EXPECT_EQ(c.capacity(a), 0);
  EXPECT_TRUE(c.block_table(a).empty());

  const SeqId ids[] = {a, b};
  const int64_t extra[] = {10, 1};
  c.reserve(ids, extra);
  EXPECT_EQ(c.capacity(a), 12);
  EXPECT_EQ(c.capacity(b), 4);
  EXPECT_EQ(c.length(a), 0);
  EXPECT_EQ(c.pages_free(), 4);
  // Seed 0: pages handed out in index order.
  EXPECT_EQ(table(c, a), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(table(c, b), (std::vector<int32_t>{3}));

  c.commit(a, 10);
  EXPECT_EQ(c.length(a), 10);
  EXPECT_THROW(c.commit(a, 13), InvalidArgument);  // beyond capacity
  EXPECT_THROW(c.commit(a, 9), InvalidArgument);   // shrinking is truncate's job
  EXPECT_EQ(c.length(a), 10);

  // Room already there: no new page.
  const SeqId one[] = {a};
  const int64_t two[] = {2};
  c.reserve(one, two);
  EXPECT_EQ(c.pages_free(), 4);
  const int64_t three[] = {3};
  c.reserve(one, three);
  EXPECT_EQ(c.pages_free(), 3);
  EXPECT_EQ(c.capacity(a), 16);

  const int64_t neg[] = {-1};
  EXPECT_THROW(c.reserve(one, neg), InvalidArgument);
  const int64_t pair[] = {1, 1};
  EXPECT_THROW(c.reserve(one, pair), InvalidArgument);

  c.truncate(a, 4);
  EXPECT_EQ(c.length(a), 4);
  EXPECT_EQ(c.capacity(a), 16);
  EXPECT_THROW(c.truncate(a, 5), InvalidArgument);
  EXPECT_THROW(c.truncate(a, -1), InvalidArgument);
}

TEST(Cache, FreeSequenceReturnsPages) {
  LatentCache c = make(6, 2);
  const SeqId a = add_filled(c, 5);  // 3 pages
  const SeqId b = add_filled(c, 3);  // 2 pages
  EXPECT_EQ(c.pages_free(), 1);
  c.free_sequence(a);
  EXPECT_FALSE(c.contains(a));
  EXPECT_EQ(c.pages_free(), 4);
  EXPECT_THROW(c.length(a), InvalidArgument);
  EXPECT_THROW(c.free_sequence(a), InvalidArgument);
  // b is untouched.
  EXPECT_EQ(c.read_rows(b, 0, 3), expected_rows(b, 3, 6));
  // The freed pages are usable again; every page is owned at most once.
  const SeqId d = add_filled(c, 8);
  std::set<int32_t> owned;
  for (SeqId id : {b, d})
    for (int32_t p : c.block_table(id)) EXPECT_TRUE(owned.insert(p).second) << "page " << p << " owned twice";
  EXPECT_EQ(c.pages_free(), 0);
  EXPECT_EQ(c.read_rows(d, 0, 8), expected_rows(d, 8, 6));
  EXPECT_EQ(c.read_rows(b, 0, 3), expected_rows(b, 3, 6));
}

TEST(Cache, UnknownSequence) {
  LatentCache c = make(2, 4);
  const SeqId a = c.add_sequence();
  const SeqId bad = a + 100;
  auto check = [&](auto fn) {
    try {
      fn();
      ADD_FAILURE() << "no exception";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(std::to_string(bad)), std::string::npos) << e.what();
    }
  };
  check([&] { c.length(bad); });
  check([&] { c.capacity(bad); });
  check([&] { c.block_table(bad); });
  check([&] { c.commit(bad, 0); });
  check([&] { c.truncate(bad, 0); });
  check([&] { c.release_unused(bad); });
  check([&] { c.read_rows(bad, 0, 0); });
  check([&] { c.free_sequence(bad); });
  check([&] {
    const SeqId ids[] = {a, bad};
    const int64_t ex[] = {1, 1};
    c.reserve(ids, ex);
  });
  // The failed reserve gave a nothing.
  EXPECT_EQ(c.capacity(a), 0);
  EXPECT_EQ(c.pages_free(), 2);
  EXPECT_FALSE(c.contains(bad));
}

TEST(Cache, ReserveIsAllOrNothing) {
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    LatentCache c = make(7, 4, 6, dt, 99);
    const SeqId a = add_filled(c, 6);   // 2 pages
    const SeqId b = add_filled(c, 4);   // 1 page
    const SeqId e = c.add_sequence();   // empty
    const auto ta = table(c, a), tb = table(c, b);
    ASSERT_EQ(c.pages_free(), 4);
    const SeqId ids[] = {a, b, e};
    const int64_t extra[] = {2, 9, 4};  // a fits in its page; b needs 3, e needs 1: 4 pages ok
    const int64_t too_many[] = {3, 9, 5};  // a 1 + b 3 + e 2 = 6 > 4
    try {
      c.reserve(ids, too_many);
      ADD_FAILURE() << "no OutOfPages";
    } catch (const OutOfPages& ex) {
      const std::string msg = ex.what();
      EXPECT_NE(msg.find("pages"), std::string::npos) << msg;
      EXPECT_NE(msg.find('6'), std::string::npos) << "needs 6: " << msg;
    }
    EXPECT_EQ(c.pages_free(), 4);
    EXPECT_EQ(table(c, a), ta);
    EXPECT_EQ(table(c, b), tb);
    EXPECT_TRUE(c.block_table(e).empty());
    EXPECT_EQ(c.length(a), 6);
    EXPECT_EQ(c.length(b), 4);
    EXPECT_EQ(c.length(e), 0);
    EXPECT_EQ(c.read_rows(a, 0, 6), expected_rows(a, 6, 6, dt == DType::BF16));
    EXPECT_EQ(c.read_rows(b, 0, 4), expected_rows(b, 4, 6, dt == DType::BF16));
    // The request that fits exactly goes through.
    c.reserve(ids, extra);
    EXPECT_EQ(c.pages_free(), 0);
    EXPECT_EQ(c.capacity(a), 8);
    EXPECT_EQ(c.capacity(b), 16);
    EXPECT_EQ(c.capacity(e), 4);
    EXPECT_EQ(c.read_rows(a, 0, 6), expected_rows(a, 6, 6, dt == DType::BF16));
  }
}

TEST(Cache, PageOrderSeedPermutes) {
  const int64_t n = 32;
  auto full_table = [&](uint64_t seed) {
    LatentCache c = make(n, 2, 4, DType::F32, seed);
    const SeqId a = c.add_sequence();
    const SeqId ids[] = {a};
    const int64_t ex[] = {2 * n};
    c.reserve(ids, ex);
    EXPECT_EQ(c.pages_free(), 0);
    return table(c, a);
  };
  std::vector<int32_t> identity(n);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(full_table(0), identity);
  const auto t1 = full_table(1), t7 = full_table(7);
  for (const auto& t : {t1, t7}) {
    EXPECT_NE(t, identity);
    auto sorted = t;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, identity) << "not a permutation";
  }
  EXPECT_NE(t1, t7);
  EXPECT_EQ(full_table(7), t7);  // deterministic
}

TEST(Cache, FillUnusedPoisonsOnlyUnusedSlots) {
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t P = 4, W = 5, pages = 9;
    LatentCache c = make(pages, P, W, dt, 3);
    const SeqId a = add_filled(c, 6);
    const SeqId b = add_filled(c, 1);
    const SeqId e = c.add_sequence();
    const SeqId ids[] = {e};
    const int64_t ex[] = {3};
    c.reserve(ids, ex);  // reserved but unused
    c.fill_unused(kNaN);
    EXPECT_EQ(c.read_rows(a, 0, 6), expected_rows(a, 6, W, dt == DType::BF16));
    EXPECT_EQ(c.read_rows(b, 0, 1), expected_rows(b, 1, W, dt == DType::BF16));
    std::set<int64_t> used;
    for (int64_t t = 0; t < 6; ++t) used.insert(c.block_table(a)[t / P] * P + t % P);
    used.insert(c.block_table(b)[0] * P);
    int64_t nan_slots = 0;
    for (int64_t slot = 0; slot < pages * P; ++slot)
      for (int64_t j = 0; j < W; ++j) {
        const float v = dt == DType::F32 ? static_cast<const float*>(c.storage())[slot * W + j]
                                         : bf16_to_float(static_cast<const uint16_t*>(c.storage())[slot * W + j]);
        if (used.count(slot)) EXPECT_FALSE(std::isnan(v)) << "slot " << slot;
        else {
          EXPECT_TRUE(std::isnan(v)) << "slot " << slot;
          nan_slots += j == 0;
        }
      }
    EXPECT_EQ(nan_slots, pages * P - 7);
    // A stored token after poisoning is readable; its neighbours stay NaN.
    write_row(c, e, 0);
    c.commit(e, 1);
    EXPECT_EQ(c.read_rows(e, 0, 1), expected_rows(e, 1, W, dt == DType::BF16));
  }
}

TEST(Cache, ReleaseUnused) {
  LatentCache c = make(6, 4);
  const SeqId a = c.add_sequence();
  const SeqId ids[] = {a};
  const int64_t ex[] = {10};
  c.reserve(ids, ex);  // 3 pages
  for (int64_t t = 0; t < 5; ++t) write_row(c, a, t);
  c.commit(a, 5);
  const auto before = table(c, a);
  c.release_unused(a);
  EXPECT_EQ(c.capacity(a), 8);
  EXPECT_EQ(c.pages_free(), 4);
  EXPECT_EQ(table(c, a), std::vector<int32_t>(before.begin(), before.begin() + 2));
  EXPECT_EQ(c.read_rows(a, 0, 5), expected_rows(a, 5, 6));
  c.release_unused(a);  // idempotent
  EXPECT_EQ(c.pages_free(), 4);
  c.truncate(a, 0);
  c.release_unused(a);
  EXPECT_EQ(c.pages_free(), 6);
  EXPECT_EQ(c.capacity(a), 0);
}

TEST(Cache, ReadRowsBounds) {
  LatentCache c = make(4, 4);
  const SeqId a = add_filled(c, 3);
  EXPECT_THROW(c.read_rows(a, 0, 4), InvalidArgument);
  EXPECT_THROW(c.read_rows(a, -1, 2), InvalidArgument);
  EXPECT_THROW(c.read_rows(a, 2, 1), InvalidArgument);
  EXPECT_TRUE(c.read_rows(a, 3, 3).empty());
  const auto mid = c.read_rows(a, 1, 3);
  const auto all = expected_rows(a, 3, 6);
  EXPECT_EQ(mid, std::vector<float>(all.begin() + 6, all.end()));
}

// ---------------------------------------------------------------------------------------------------------
// forward() with too few pages.

TEST(Cache, ForwardOutOfPagesChangesNothing) {
  const Config cfg = testing::small_config(32, 2, 0, 16, 8, 8, 8);
  const LayerWeights w = LayerWeights::random(cfg, 5);
  for (const char* dev : {"cpu", "cpu-reference"}) {
    SCOPED_TRACE(dev);
    LayerOptions lo;
    lo.device = dev;
    lo.precision = Precision::F32;
    Attention layer(w, lo);
    LatentCache cache = layer.make_cache(3, 4, 11);
    const SeqId a = cache.add_sequence(), b = cache.add_sequence();
    const int64_t D = cfg.hidden_size, W = cfg.latent_dim();
    const auto h5 = testing::random_values(5 * D, 1);
    std::vector<float> out(5 * D);
    const SequenceChunk first[] = {{a, 5, nullptr}};
    layer.forward(first, h5.data(), out.data(), cache);
    ASSERT_EQ(cache.length(a), 5);
    ASSERT_EQ(cache.pages_free(), 1);
    const auto rows = cache.read_rows(a, 0, 5);
    const auto ta = table(cache, a);

    const auto h8 = testing::random_values(8 * D, 2);
    std::vector<float> out8(8 * D, 0.f);
    const SequenceChunk too_big[] = {{a, 4, nullptr}, {b, 4, nullptr}};  // needs 2 pages, 1 free
    try {
      layer.forward(too_big, h8.data(), out8.data(), cache);
      ADD_FAILURE() << "no OutOfPages";
    } catch (const OutOfPages& e) {
      EXPECT_NE(std::string(e.what()).find("pages"), std::string::npos) << e.what();
    }
    EXPECT_EQ(cache.length(a), 5);
    EXPECT_EQ(cache.length(b), 0);
    EXPECT_EQ(cache.pages_free(), 1);
    EXPECT_EQ(table(cache, a), ta);
    EXPECT_TRUE(cache.block_table(b).empty());
    EXPECT_EQ(cache.read_rows(a, 0, 5), rows);
    EXPECT_TRUE(std::all_of(out8.begin(), out8.end(), [](float v) { return v == 0.f; }));

    // What fits still works afterwards, and the earlier rows are still the same.
    const SequenceChunk fits[] = {{a, 3, nullptr}, {b, 0, nullptr}};
    layer.forward(fits, h8.data(), out8.data(), cache);
    EXPECT_EQ(cache.length(a), 8);
    EXPECT_EQ(cache.pages_free(), 1);
    const auto all = cache.read_rows(a, 0, 8);
    EXPECT_EQ(std::vector<float>(all.begin(), all.begin() + 5 * W), rows);
  }
}

}  // namespace
}  // namespace mla
