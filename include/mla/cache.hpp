// The paged latent cache: per token one row [RMSNorm(c) (d_c) | RoPE(k_pe) (d_r)], rope dims in pair order.
// Storage is [num_pages, page_size, row bytes]; each sequence owns a block table of page indices.
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

// The bytes of one cache row of `latent` (d_c) + `rope` (d_r) values.
//   F32, BF16: the d_c + d_r values in that type.
//   F8_E4M3:   "fp8_ds_mla", the layout of FlashMLA's FP8 kernels and vLLM, 656 bytes for 512 + 64:
//              [d_c float8 e4m3, zero-padded to a multiple of 16 bytes]
//              [ceil(d_c/128) fp32 scales, one per group of 128 latent values (the last group may be shorter)]
//              [d_r bf16, never quantised] [zero padding to a multiple of 16 bytes]
// Quantisation of group g: scale = amax(|c_i|, i in g) / 448 in fp32; each value is float_to_fp8_e4m3(c_i / scale)
// (an IEEE division, round to nearest even, saturating). A group whose scale is 0 (all zero, or an amax so small
// that amax/448 underflows) stores zeros and scale 0. Dequantised value: bf16(fp8 · scale), the value every
// kernel multiplies, so an FP8 cache computes exactly as a bf16 cache holding the dequantised rows.
struct RowLayout {
  DType dtype = DType::BF16;
  int64_t latent = 512, rope = 64;

  int64_t width() const { return latent + rope; }
  int64_t groups() const { return (latent + 127) / 128; }                      // F8_E4M3: scales per row
  int64_t scale_offset() const { return (latent + 15) / 16 * 16; }             // F8_E4M3: byte offsets
  int64_t rope_offset() const { return scale_offset() + 4 * groups(); }
  int64_t bytes() const {
    if (dtype == DType::F8_E4M3) return (rope_offset() + 2 * rope + 15) / 16 * 16;
    return width() * dtype_size(dtype);
  }
};

// One row of width() floats into layout's bytes at dst (quantised for F8_E4M3, rounded to nearest even for BF16),
// and back (dequantised as described above). The CUDA cache writer produces the same bytes from the same floats.
void store_row(const RowLayout& layout, const float* row, void* dst);
void load_row(const RowLayout& layout, const void* src, float* row);
// True when a stored row holds no NaN or infinity (scales, fp8 values and rope values for F8_E4M3).
bool row_is_finite(const RowLayout& layout, const void* src);

struct CacheOptions {
  int64_t num_pages = 0;
  int64_t page_size = 64;          // a power of two from 1 to 256
  int64_t row_width = 576;         // d_c + d_r
  DType dtype = DType::BF16;       // BF16, F32 for the f32 path, or F8_E4M3 (RowLayout)
  int64_t rope_width = 64;         // F8_E4M3: d_r, the last rope_width values of a row, kept in bf16
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

  // Rows [begin, end) of a sequence as f32 [end-begin, row_width] (copied from the device for device caches;
  // dequantised from an FP8 cache).
  std::vector<float> read_rows(SeqId id, int64_t begin, int64_t end) const;
  // The first row in [begin, end) of a sequence (rows up to capacity(), stored or only written) that holds a
  // NaN or infinity, or -1 when all are finite. forward() checks the rows it wrote before it commits them.
  int64_t first_non_finite(SeqId id, int64_t begin, int64_t end) const;
  // Writes every slot that holds no stored token (unused tails and free pages) with `value`. Tests use NaN
  // to prove kernels never read them.
  void fill_unused(float value);

  RowLayout row_layout() const {
    if (options_.dtype != DType::F8_E4M3) return {.dtype = options_.dtype, .latent = options_.row_width, .rope = 0};
    return {.dtype = options_.dtype, .latent = options_.row_width - options_.rope_width, .rope = options_.rope_width};
  }
  int64_t row_bytes() const { return row_layout().bytes(); }
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
