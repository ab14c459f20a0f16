// The paged latent cache: per token one row [RMSNorm(c) (d_c) | RoPE(k_pe) (d_r)], rope dims in pair order.
// Storage is [num_pages, page_size, row_width]; each sequence owns a block table of page indices.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mla/dtype.hpp"

namespace mla {

namespace detail {
class Buffer;
}

using SeqId = int64_t;

struct CacheOptions {
  int64_t num_pages = 0;
  int64_t page_size = 64;          // a power of two from 1 to 256
  int64_t row_width = 576;         // d_c + d_r
  DType dtype = DType::BF16;       // BF16, or F32 for the f32 path
  std::string device = "cpu";      // a backend name: "cpu", "cpu-reference", "cuda"
  // 0: free pages are handed out in index order. Otherwise they are handed out in a random order drawn from
  // this seed, so block tables are permuted (tests and benchmarks use it to defeat accidental contiguity).
  uint64_t page_order_seed = 0;
};

// The largest page pool a cache accepts: 2^47 bytes, the user address space of x86-64 and of CUDA devices.
// Below that, a pool the machine cannot hold (for host caches: more than its physical memory) throws
// OutOfMemory naming num_pages, page_size and row_width.
inline constexpr int64_t kMaxCacheBytes = int64_t{1} << 47;

class LatentCache {
 public:
  // Throws InvalidArgument naming the option for a bad page_size, num_pages, row_width or dtype, or a pool
  // larger than kMaxCacheBytes.
  explicit LatentCache(const CacheOptions& options);
  ~LatentCache();
  LatentCache(LatentCache&&) noexcept;
  LatentCache& operator=(LatentCache&&) noexcept;

  const CacheOptions& options() const { return options_; }

  SeqId add_sequence();
  void free_sequence(SeqId id);            // returns its pages to the pool
  bool contains(SeqId id) const;
  std::vector<SeqId> sequences() const;
  int64_t length(SeqId id) const;          // tokens stored
  int64_t capacity(SeqId id) const;        // tokens its pages can hold
  std::span<const int32_t> block_table(SeqId id) const;
  int64_t pages_total() const { return options_.num_pages; }
  int64_t pages_free() const { return static_cast<int64_t>(free_pages_.size()); }

  // Gives each listed sequence room for `extra[i]` more tokens. All or nothing: throws OutOfPages naming the
  // shortfall and changes nothing when the pool cannot serve every request.
  void reserve(std::span<const SeqId> ids, std::span<const int64_t> extra);
  // Marks rows [length, new_length) as stored (a backend wrote them). new_length <= capacity.
  void commit(SeqId id, int64_t new_length);
  // Drops stored tokens past new_length (keeps the pages).
  void truncate(SeqId id, int64_t new_length);
  // Returns the pages past max(stored tokens, keep_tokens) to the pool.
  void release_unused(SeqId id, int64_t keep_tokens = 0);

  // Rows [begin, end) of a sequence as f32 [end-begin, row_width] (copied from the device for device caches).
  std::vector<float> read_rows(SeqId id, int64_t begin, int64_t end) const;
  // The first row in [begin, end) of a sequence (rows up to capacity(), stored or only written) that holds a
  // NaN or infinity, or -1 when all are finite. forward() checks the rows it wrote before it commits them.
  int64_t first_non_finite(SeqId id, int64_t begin, int64_t end) const;
  // Writes every slot that holds no stored token (unused tails and free pages) with `value`. Tests use NaN
  // to prove kernels never read them.
  void fill_unused(float value);

  int64_t row_bytes() const { return options_.row_width * dtype_size(options_.dtype); }
  int64_t page_bytes() const { return options_.page_size * row_bytes(); }
  // [num_pages, page_size, row_width] of dtype; device memory for device caches.
  void* storage();
  const void* storage() const;

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  const Sequence& find(SeqId id) const;
  Sequence& find(SeqId id);

  CacheOptions options_;
  std::unique_ptr<detail::Buffer> storage_;
  std::vector<int32_t> free_pages_;   // a stack: back() is handed out next
  std::map<SeqId, Sequence> sequences_;
  SeqId next_id_ = 0;
};

}  // namespace mla
