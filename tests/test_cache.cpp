// The paged latent cache: page accounting, all-or-nothing reservations, permuted block tables, poisoning of
// unused slots, and a failed forward() leaving everything as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
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

// ---------------------------------------------------------------------------------------------------------
// The FP8 cache format (mla/cache.hpp RowLayout, mla/dtype.hpp float_to_fp8_e4m3)

TEST(CacheFp8, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float f = fp8_e4m3_to_float(code);
    if ((c & 0x7f) == 0x7f) {  // S.1111.111: the only NaNs, and they stay NaN
      EXPECT_TRUE(std::isnan(f)) << c;
      EXPECT_EQ(float_to_fp8_e4m3(f) & 0x7f, 0x7f) << c;
      continue;
    }
    EXPECT_TRUE(std::isfinite(f)) << c;
    EXPECT_EQ(float_to_fp8_e4m3(f), code) << c << " = " << f;  // 0x80 is -0 and comes back as 0x80
  }
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), 0x1p-9f);  // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_float(0x08), 0x1p-6f);  // smallest normal
}

TEST(CacheFp8, TiesRoundToEvenAndSaturate) {
  // Between every two neighbouring positive codes: the midpoint goes to the even code (the code's last bit is
  // the mantissa's), anything above or below it to the nearer one; the same mirrored for negative values.
  for (int c = 0; c < 0x7e; ++c) {
    const float lo = fp8_e4m3_to_float(static_cast<uint8_t>(c)), hi = fp8_e4m3_to_float(static_cast<uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;  // exact: both are short binary fractions
    const int even = c % 2 == 0 ? c : c + 1;
    EXPECT_EQ(float_to_fp8_e4m3(mid), even) << c;
    EXPECT_EQ(float_to_fp8_e4m3(-mid), 0x80 | even) << c;
    EXPECT_EQ(float_to_fp8_e4m3(std::nextafter(mid, 0.f)), c) << c;
    EXPECT_EQ(float_to_fp8_e4m3(std::nextafter(mid, 1e9f)), c + 1) << c;
  }
  // Subnormals: multiples of 2^-9; below half of the smallest, zero.
  EXPECT_EQ(float_to_fp8_e4m3(0x1p-10f), 0x00);      // tie between 0 and 2^-9: even (0)
  EXPECT_EQ(float_to_fp8_e4m3(3 * 0x1p-10f), 0x02);  // tie between 1 and 2: even (2)
  EXPECT_EQ(float_to_fp8_e4m3(1e-30f), 0x00);
  EXPECT_EQ(float_to_fp8_e4m3(-1e-30f), 0x80);
  EXPECT_EQ(float_to_fp8_e4m3(0x1p-149f), 0x00);  // the smallest f32 subnormal
  EXPECT_EQ(float_to_fp8_e4m3(7 * 0x1p-9f), 0x07);
  // Past 448 (the largest finite), infinities too: ±448. 464 is the midpoint to the missing 480.
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (float big : {448.f, 449.f, 464.f, 480.f, 1e6f, 3.4e38f, kInf}) {
    EXPECT_EQ(float_to_fp8_e4m3(big), 0x7e) << big;
    EXPECT_EQ(float_to_fp8_e4m3(-big), 0xfe) << big;
  }
  EXPECT_EQ(float_to_fp8_e4m3(kNaN) & 0x7f, 0x7f);
  EXPECT_EQ(float_to_fp8_e4m3(-kNaN) & 0x7f, 0x7f);
}

TEST(CacheFp8, RowLayoutBytes) {
  const RowLayout v3{.dtype = DType::F8_E4M3, .latent = 512, .rope = 64};
  EXPECT_EQ(v3.groups(), 4);
  EXPECT_EQ(v3.scale_offset(), 512);
  EXPECT_EQ(v3.rope_offset(), 528);
  EXPECT_EQ(v3.bytes(), 656);
  const RowLayout odd{.dtype = DType::F8_E4M3, .latent = 136, .rope = 64};  // a short second group
  EXPECT_EQ(odd.groups(), 2);
  EXPECT_EQ(odd.scale_offset(), 144);  // 136 padded to 16
  EXPECT_EQ(odd.rope_offset(), 152);
  EXPECT_EQ(odd.bytes(), 288);  // 152 + 128 = 280, padded to 16
  EXPECT_EQ((RowLayout{.dtype = DType::BF16, .latent = 576, .rope = 0}.bytes()), 1152);
  CacheOptions o;
  o.num_pages = 2, o.page_size = 16, o.row_width = 576, o.dtype = DType::F8_E4M3, o.rope_width = 64;
  const LatentCache c(o);
  EXPECT_EQ(c.row_bytes(), 656);
  EXPECT_EQ(c.page_bytes(), 16 * 656);
}

// store_row then load_row: within the e4m3 bound, per value. With y = x / scale (scale = amax/448, so |y| <= 448
// up to one rounding), e4m3 keeps 3 mantissa bits: |q − y| <= 2^-4·|y| for normal y (half an ulp of 2^-3 relative
// to the binade's bottom) and <= 2^-10 in the subnormal range (spacing 2^-9). The dequantised value rounds
// q·scale to bf16 (8 bits: 2^-9 relative), and the division and product add 2^-24 each. So
//   |load − x| <= 2^-4·|x| + 2^-10·scale + 2^-9·|load| + tiny,  and per group <= amax·(2^-4 + 2^-9·(1 + 2^-4) +
// 2^-10/448) < 0.0645·amax; the rope values are bf16-rounded (2^-9 relative).
TEST(CacheFp8, StoreLoadRoundTripWithinBound) {
  for (auto [dc, dr] : {std::pair<int64_t, int64_t>{512, 64}, {136, 64}, {40, 8}}) {
    const RowLayout lay{.dtype = DType::F8_E4M3, .latent = dc, .rope = dr};
    std::vector<std::byte> bytes(static_cast<size_t>(lay.bytes()));
    std::vector<float> back(static_cast<size_t>(lay.width()));
    double worst_rel_to_amax = 0;
    for (int trial = 0; trial < 40; ++trial) {
      const float mag = std::ldexp(1.f, trial % 20 - 10);  // group amax from 2^-10 to 2^9
      std::vector<float> row = testing::random_values(static_cast<size_t>(lay.width()), 100 + trial, mag);
      if (trial % 5 == 0) row[static_cast<size_t>(trial % dc)] *= 37.f;  // one outlier per group now and then
      if (trial % 7 == 0) row[1] = 1e-6f * mag;                          // a subnormal after scaling
      store_row(lay, row.data(), bytes.data());
      load_row(lay, bytes.data(), back.data());
      for (int64_t g = 0; g < lay.groups(); ++g) {
        const int64_t j0 = 128 * g, j1 = std::min(dc, j0 + 128);
        float amax = 0;
        for (int64_t j = j0; j < j1; ++j) amax = std::max(amax, std::fabs(row[j]));
        const float scale = amax / 448.f;
        float stored_scale;
        std::memcpy(&stored_scale, bytes.data() + lay.scale_offset() + 4 * g, 4);
        EXPECT_EQ(stored_scale, scale);
        for (int64_t j = j0; j < j1; ++j) {
          const double x = row[j], y = back[j], err = std::fabs(y - x);
          const double bound = 0x1p-4 * std::fabs(x) + 0x1p-10 * scale + 0x1p-9 * std::fabs(y) + 1e-6 * amax;
          EXPECT_LE(err, bound) << "dc " << dc << " j " << j << " x " << x << " got " << y;
          EXPECT_LE(err, 0.0645 * amax) << j;
          worst_rel_to_amax = std::max(worst_rel_to_amax, err / amax);
          EXPECT_EQ(y, round_bf16(y));  // a bf16 value
        }
      }
      for (int64_t j = dc; j < lay.width(); ++j) EXPECT_EQ(back[j], round_bf16(row[j]));
    }
    RecordProperty("worst_error_over_amax_dc" + std::to_string(dc), std::to_string(worst_rel_to_amax));
    EXPECT_GT(worst_rel_to_amax, 0.01);  // the bound is not vacuous: e4m3 errors of a few percent do occur
  }
}

TEST(CacheFp8, AllZeroGroupStoresZeros) {
  const RowLayout lay{.dtype = DType::F8_E4M3, .latent = 256, .rope = 16};
  std::vector<float> row = testing::random_values(static_cast<size_t>(lay.width()), 7);
  std::fill(row.begin() + 128, row.begin() + 256, 0.f);  // group 1 all zero
  row[5] = 0.f;
  std::vector<std::byte> bytes(static_cast<size_t>(lay.bytes()), std::byte{0xaa});
  store_row(lay, row.data(), bytes.data());
  for (int64_t j = 128; j < 256; ++j) EXPECT_EQ(bytes[j], std::byte{0}) << j;
  float scale1 = -1;
  std::memcpy(&scale1, bytes.data() + lay.scale_offset() + 4, 4);
  EXPECT_EQ(scale1, 0.f);
  EXPECT_EQ(bytes[5], std::byte{0});
  for (int64_t j = lay.rope_offset() + 2 * lay.rope; j < lay.bytes(); ++j) EXPECT_EQ(bytes[j], std::byte{0});  // pad
  std::vector<float> back(static_cast<size_t>(lay.width()), kNaN);
  load_row(lay, bytes.data(), back.data());
  for (int64_t j = 128; j < 256; ++j) EXPECT_EQ(back[j], 0.f) << j;
  EXPECT_EQ(back[5], 0.f);
  EXPECT_TRUE(row_is_finite(lay, bytes.data()));
}

LatentCache make_fp8(int64_t pages, int64_t page_size, int64_t dc, int64_t dr, uint64_t seed = 0) {
  CacheOptions o;
  o.num_pages = pages, o.page_size = page_size, o.row_width = dc + dr, o.dtype = DType::F8_E4M3;
  o.rope_width = dr, o.page_order_seed = seed;
  return LatentCache(o);
}

std::byte* fp8_slot(LatentCache& c, SeqId id, int64_t t) {
  const int64_t P = c.options().page_size;
  return static_cast<std::byte*>(c.storage()) + (c.block_table(id)[t / P] * P + t % P) * c.row_bytes();
}

// Tokens [0, n) of a new sequence stored with store_row from random rows; returns the id.
SeqId add_fp8_rows(LatentCache& c, int64_t n, uint64_t seed) {
  const SeqId id = c.add_sequence();
  const SeqId ids[] = {id};
  const int64_t extra[] = {n};
  c.reserve(ids, extra);
  for (int64_t t = 0; t < n; ++t) {
    const auto row = testing::random_values(static_cast<size_t>(c.options().row_width), seed + t, 3.f);
    store_row(c.row_layout(), row.data(), fp8_slot(c, id, t));
  }
  c.commit(id, n);
  return id;
}

TEST(CacheFp8, FirstNonFinite) {
  const int64_t dc = 136, dr = 8;
  const RowLayout lay{.dtype = DType::F8_E4M3, .latent = dc, .rope = dr};
  // Each way a stored row can be non-finite: a NaN code, a NaN or infinite scale, a NaN rope value, and a
  // finite code times a finite scale that overflows (saturated 448 x 1e38).
  const std::vector<std::function<void(std::byte*)>> poisons = {
      [&](std::byte* r) { r[130] = std::byte{0x7f}; },
      [&](std::byte* r) { r[3] = std::byte{0xff}; },
      [&](std::byte* r) {
        const float s = kNaN;
        std::memcpy(r + lay.scale_offset() + 4, &s, 4);
      },
      [&](std::byte* r) {
        const float s = std::numeric_limits<float>::infinity();
        std::memcpy(r + lay.scale_offset(), &s, 4);
      },
      [&](std::byte* r) {
        const uint16_t b = 0x7fc0;
        std::memcpy(r + lay.rope_offset() + 2 * 7, &b, 2);
      },
      [&](std::byte* r) {
        const float s = 1e38f;
        std::memcpy(r + lay.scale_offset(), &s, 4);
        r[0] = std::byte{0x7e};
      },
  };
  for (size_t k = 0; k < poisons.size(); ++k) {
    SCOPED_TRACE(k);
    LatentCache c = make_fp8(4, 4, dc, dr, 3);
    const SeqId id = add_fp8_rows(c, 9, 50);
    EXPECT_EQ(c.first_non_finite(id, 0, 9), -1);
    poisons[k](fp8_slot(c, id, 6));
    EXPECT_EQ(c.first_non_finite(id, 0, 9), 6);
    EXPECT_EQ(c.first_non_finite(id, 0, 6), -1);
    EXPECT_EQ(c.first_non_finite(id, 6, 7), 6);
    EXPECT_THROW(c.first_non_finite(id, 0, 17), InvalidArgument);  // past capacity
  }
}

TEST(CacheFp8, FillUnusedPoisonsOnlyUnusedSlots) {
  const int64_t P = 4, pages = 9, dc = 136, dr = 8;
  LatentCache c = make_fp8(pages, P, dc, dr, 3);
  const SeqId a = add_fp8_rows(c, 6, 10), b = add_fp8_rows(c, 1, 20);
  const auto rows_a = c.read_rows(a, 0, 6), rows_b = c.read_rows(b, 0, 1);
  const SeqId e = c.add_sequence();
  const SeqId ids[] = {e};
  const int64_t ex[] = {3};
  c.reserve(ids, ex);  // reserved but unused
  c.fill_unused(kNaN);
  EXPECT_EQ(c.read_rows(a, 0, 6), rows_a);
  EXPECT_EQ(c.read_rows(b, 0, 1), rows_b);
  EXPECT_EQ(c.first_non_finite(a, 0, 6), -1);
  EXPECT_EQ(c.first_non_finite(a, 0, 8), 6);  // the rest of a's second page
  EXPECT_EQ(c.first_non_finite(e, 0, 4), 0);
  std::set<int64_t> used;
  for (int64_t t = 0; t < 6; ++t) used.insert(c.block_table(a)[t / P] * P + t % P);
  used.insert(c.block_table(b)[0] * P);
  const RowLayout lay = c.row_layout();
  std::vector<float> row(static_cast<size_t>(lay.width()));
  int64_t nan_slots = 0;
  for (int64_t slot = 0; slot < pages * P; ++slot) {
    const auto* r = static_cast<const std::byte*>(c.storage()) + slot * lay.bytes();
    load_row(lay, r, row.data());
    int64_t nans = 0;
    for (float v : row) nans += std::isnan(v);
    if (used.count(slot)) {
      EXPECT_EQ(nans, 0) << "slot " << slot;
    } else {
      EXPECT_EQ(nans, lay.width()) << "slot " << slot;  // every value, latent and rope, reads as NaN
      EXPECT_FALSE(row_is_finite(lay, r));
      ++nan_slots;
    }
  }
  EXPECT_EQ(nan_slots, pages * P - 7);
}

}  // namespace
}  // namespace mla
