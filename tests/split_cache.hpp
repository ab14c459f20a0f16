// A decode fixture whose cache is also spread over `world` ranks by pages (context parallelism, mla/parallel.hpp):
// the whole block tables and lengths, and each rank's share of them over the same page pool. Unused slots and
// spare pages hold NaN, so a decode that reads past its share shows it. Shared by tests/test_parallel.cpp (CPU)
// and tests/test_nccl.cpp (GPUs).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "mla/mla.hpp"
#include "testing.hpp"

namespace mla::testing {

// Values of a BF16 or F32 array: `values` already rounded to dtype, `bits` its BF16 storage.
struct Typed {
  DType dtype = DType::F32;
  std::vector<float> values;
  std::vector<uint16_t> bits;
  Typed() = default;
  Typed(DType t, std::vector<float> v) : dtype(t), values(std::move(v)) {
    if (dtype != DType::BF16) return;
    bits.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i) bits[i] = float_to_bf16(values[i]), values[i] = bf16_to_float(bits[i]);
  }
  Typed(DType t, size_t n) : Typed(t, std::vector<float>(n, 0.f)) {}
  void* data() { return dtype == DType::F32 ? static_cast<void*>(values.data()) : bits.data(); }
  const void* data() const { return dtype == DType::F32 ? static_cast<const void*>(values.data()) : bits.data(); }
  int64_t bytes() const { return static_cast<int64_t>(values.size()) * dtype_size(dtype); }
  std::vector<float> read() const {  // after a kernel wrote data()
    if (dtype == DType::F32) return values;
    std::vector<float> v(bits.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_float(bits[i]);
    return v;
  }
};

// How the ranks share a sequence's pages: round-robin (the library's choice, context_parallel_length) or W
// contiguous ranges of pages.
enum class Split { RoundRobinPages, ContiguousPages };

struct SplitCache {
  int64_t batch = 0, s_q = 1, h_q = 0, head_dim = 0, head_dim_v = 0, page_size = 0, num_pages = 0, max_pages = 0;
  int64_t world = 1;
  Typed q, kv;                       // [batch, s_q, h_q, head_dim], [num_pages, page_size, head_dim]
  std::vector<int32_t> table, lens;  // the whole cache: [batch, max_pages], [batch]
  std::vector<std::vector<int32_t>> rank_table, rank_lens;  // per rank: [batch, max_pages], [batch]

  // decode_attention's parameters over the whole cache (rank < 0) or over one rank's share; pointers are host
  // memory (a GPU test replaces them).
  DecodeParams params(int64_t rank = -1) {
    DecodeParams p;
    p.batch = batch, p.s_q = s_q, p.h_q = h_q, p.head_dim = head_dim, p.head_dim_v = head_dim_v;
    p.page_size = page_size, p.num_pages = num_pages, p.max_pages = max_pages, p.dtype = q.dtype;
    p.q = q.data(), p.kv_cache = kv.data();
    p.block_table = rank < 0 ? table.data() : rank_table[static_cast<size_t>(rank)].data();
    p.cache_seqlens = rank < 0 ? lens.data() : rank_lens[static_cast<size_t>(rank)].data();
    p.softmax_scale = 1.f / std::sqrt(static_cast<float>(head_dim));
    p.causal = false;
    return p;
  }
  int64_t rows() const { return batch * s_q * h_q; }
};

inline SplitCache make_split_cache(DType dtype, int64_t h_q, int64_t s_q, int64_t head_dim, int64_t head_dim_v,
                                   int64_t page_size, std::vector<int32_t> lens, int64_t world, Split split,
                                   uint64_t seed) {
  SplitCache c;
  c.batch = static_cast<int64_t>(lens.size()), c.s_q = s_q, c.h_q = h_q, c.head_dim = head_dim;
  c.head_dim_v = head_dim_v, c.page_size = page_size, c.world = world, c.lens = std::move(lens);
  int64_t used = 0;
  for (int32_t L : c.lens) {
    const int64_t pages = (L + page_size - 1) / page_size;
    used += pages;
    c.max_pages = std::max(c.max_pages, pages + 1);  // one spare entry per row
  }
  c.num_pages = used + 3;  // spare pages nobody owns
  std::mt19937_64 rng(seed);
  std::vector<int32_t> order(static_cast<size_t>(c.num_pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);  // permuted block tables

  c.q = Typed(dtype, random_values(static_cast<size_t>(c.batch * s_q * h_q * head_dim), seed + 1));
  std::vector<float> kv(static_cast<size_t>(c.num_pages * page_size * head_dim),
                        std::numeric_limits<float>::quiet_NaN());
  const std::vector<float> noise = random_values(kv.size(), seed + 2);
  c.table.assign(static_cast<size_t>(c.batch * c.max_pages), -1);
  c.rank_table.assign(static_cast<size_t>(world), c.table);
  c.rank_lens.assign(static_cast<size_t>(world), std::vector<int32_t>(static_cast<size_t>(c.batch), 0));
  size_t next = 0;
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t L = c.lens[b], pages = (L + page_size - 1) / page_size;
    std::vector<int64_t> filled(static_cast<size_t>(world), 0);  // pages each rank holds so far
    for (int64_t j = 0; j < pages; ++j) {
      const int32_t page = order[next++];
      c.table[b * c.max_pages + j] = page;
      for (int64_t t = j * page_size; t < std::min(L, (j + 1) * page_size); ++t)  // only stored tokens are finite
        for (int64_t e = 0; e < head_dim; ++e) {
          const size_t at = static_cast<size_t>((page * page_size + t % page_size) * head_dim + e);
          kv[at] = noise[at];
        }
      const int64_t per = (pages + world - 1) / world;
      const int64_t r = split == Split::RoundRobinPages ? j % world : j / std::max<int64_t>(per, 1);
      auto& rt = c.rank_table[static_cast<size_t>(r)];
      rt[b * c.max_pages + filled[r]++] = page;
      c.rank_lens[static_cast<size_t>(r)][b] += static_cast<int32_t>(std::min(L, (j + 1) * page_size) - j * page_size);
    }
  }
  c.kv = Typed(dtype, std::move(kv));
  return c;
}

}  // namespace mla::testing
