#include "mla/cache.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <new>
#include <random>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <utility>

#include "core/backend.hpp"
#include "mla/error.hpp"

namespace mla {

void store_row(const RowLayout& layout, const float* row, void* dst) {
  auto* out = static_cast<std::byte*>(dst);
  if (layout.dtype == DType::F32) {
    std::memcpy(out, row, static_cast<size_t>(layout.width()) * 4);
    return;
  }
  auto put_bf16 = [](std::byte* at, const float* x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t b = float_to_bf16(x[j]);
      std::memcpy(at + 2 * j, &b, 2);
    }
  };
  if (layout.dtype == DType::BF16) {
    put_bf16(out, row, layout.width());
    return;
  }
  std::memset(out, 0, static_cast<size_t>(layout.bytes()));
  for (int64_t g = 0; g < layout.groups(); ++g) {
    const int64_t j0 = 128 * g, j1 = std::min(layout.latent, j0 + 128);
    float amax = 0.f;
    for (int64_t j = j0; j < j1; ++j) amax = std::max(amax, std::fabs(row[j]));  // NaN-blind; NaN stays below
    bool nan = false;
    for (int64_t j = j0; j < j1; ++j) nan |= std::isnan(row[j]);
    const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 448.0f;
    if (scale != 0.f)  // zero (or NaN-free underflow): zeros stay; NaN or infinity: stored, so the row reads as such
      for (int64_t j = j0; j < j1; ++j) out[j] = static_cast<std::byte>(float_to_fp8_e4m3(row[j] / scale));
    std::memcpy(out + layout.scale_offset() + 4 * g, &scale, 4);
  }
  put_bf16(out + layout.rope_offset(), row + layout.latent, layout.rope);
}

void load_row(const RowLayout& layout, const void* src, float* row) {
  const auto* in = static_cast<const std::byte*>(src);
  if (layout.dtype == DType::F32) {
    std::memcpy(row, in, static_cast<size_t>(layout.width()) * 4);
    return;
  }
  auto get_bf16 = [](const std::byte* at, float* x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      uint16_t b;
      std::memcpy(&b, at + 2 * j, 2);
      x[j] = bf16_to_float(b);
    }
  };
  if (layout.dtype == DType::BF16) {
    get_bf16(in, row, layout.width());
    return;
  }
  for (int64_t j = 0; j < layout.latent; ++j) {
    float scale;
    std::memcpy(&scale, in + layout.scale_offset() + 4 * (j / 128), 4);
    row[j] = round_bf16(fp8_e4m3_to_float(static_cast<uint8_t>(in[j])) * scale);
  }
  get_bf16(in + layout.rope_offset(), row + layout.latent, layout.rope);
}

bool row_is_finite(const RowLayout& layout, const void* src) {
  std::vector<float> row(static_cast<size_t>(layout.width()));
  load_row(layout, src, row.data());
  bool finite = true;
  for (float x : row) finite &= std::isfinite(x);
  if (layout.dtype == DType::F8_E4M3)  // a saturated value times an infinite scale is caught above; NaN bytes too
    for (int64_t g = 0; g < layout.groups(); ++g) {
      float scale;
      std::memcpy(&scale, static_cast<const std::byte*>(src) + layout.scale_offset() + 4 * g, 4);
      finite &= std::isfinite(scale);
    }
  return finite;
}

LatentCache::LatentCache(const CacheOptions& options) : options_(options) {
  const int64_t p = options.page_size;
  if (p < 1 || p > 256 || !std::has_single_bit(static_cast<uint64_t>(p)))
    throw InvalidArgument("cache: page_size must be a power of two from 1 to 256, got " + std::to_string(p));
  if (options.num_pages < 1 || options.num_pages > (int64_t{1} << 31) - 1)
    throw InvalidArgument("cache: num_pages must be from 1 to 2^31-1, got " + std::to_string(options.num_pages));
  if (options.row_width < 1)
    throw InvalidArgument("cache: row_width must be positive, got " + std::to_string(options.row_width));
  if (options.dtype != DType::BF16 && options.dtype != DType::F32 && options.dtype != DType::F8_E4M3)
    throw InvalidArgument("cache: dtype must be BF16, F32 or F8_E4M3, got " + std::string(dtype_name(options.dtype)));
  if (options.dtype == DType::F8_E4M3 && (options.rope_width < 0 || options.rope_width >= options.row_width))
    throw InvalidArgument("cache: an F8_E4M3 cache needs rope_width in [0, row_width), got rope_width " +
                          std::to_string(options.rope_width) + " of row_width " + std::to_string(options.row_width));
  // num_pages · page_size · row bytes, checked: unchecked, 2^26 · 256 · 2^28 · 4 wrapped to 0 bytes and
  // fill_unused() then wrote far past the allocation. (A row_width past 2^40 exceeds the limit on its own, and
  // bounding it first keeps row_bytes() from overflowing.)
  const auto too_large = [&] {
    return InvalidArgument("cache: num_pages (" + std::to_string(options.num_pages) + ") x page_size (" +
                           std::to_string(p) + ") x row_width (" + std::to_string(options.row_width) + ") in " +
                           std::string(dtype_name(options.dtype)) + " exceeds the " + std::to_string(kMaxCacheBytes) +
                           "-byte limit of one page pool");
  };
  if (options.row_width > (int64_t{1} << 40)) throw too_large();
  int64_t bytes = row_bytes();
  for (int64_t f : {p, options.num_pages})
    if (__builtin_mul_overflow(bytes, f, &bytes) || bytes > kMaxCacheBytes) throw too_large();
  try {
    storage_ = detail::find_backend(options.device).allocate(bytes);
    free_pages_.resize(static_cast<size_t>(options.num_pages));
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("cache: cannot allocate the page pool of num_pages (" + std::to_string(options.num_pages) +
                      ") x page_size (" + std::to_string(p) + ") x row_width (" + std::to_string(options.row_width) +
                      ") = " + std::to_string(bytes) + " bytes on '" + options.device + "'");
  }
  // A stack handed out from the back: reversed so that page 0 goes first.
  std::iota(free_pages_.rbegin(), free_pages_.rend(), 0);
  if (options.page_order_seed != 0) {
    std::mt19937_64 rng(options.page_order_seed);
    std::shuffle(free_pages_.begin(), free_pages_.end(), rng);
  }
}

LatentCache::~LatentCache() = default;
LatentCache::LatentCache(LatentCache&&) noexcept = default;
LatentCache& LatentCache::operator=(LatentCache&&) noexcept = default;

SeqId LatentCache::add_sequence() {
  SeqId id = next_id_++;
  sequences_.emplace(id, Sequence{});
  return id;
}

const LatentCache::Sequence& LatentCache::find(SeqId id) const {
  if (auto it = sequences_.find(id); it != sequences_.end()) return it->second;
  throw InvalidArgument("cache: no sequence with id " + std::to_string(id));
}

LatentCache::Sequence& LatentCache::find(SeqId id) {
  return const_cast<Sequence&>(std::as_const(*this).find(id));
}

void LatentCache::free_sequence(SeqId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) throw InvalidArgument("cache: no sequence with id " + std::to_string(id));
  // Pages go back so that the first page of the freed sequence is handed out first.
  free_pages_.insert(free_pages_.end(), it->second.pages.rbegin(), it->second.pages.rend());
  sequences_.erase(it);
}

bool LatentCache::contains(SeqId id) const {
  return sequences_.count(id) > 0;
}

std::vector<SeqId> LatentCache::sequences() const {
  std::vector<SeqId> ids;
  for (const auto& e : sequences_) ids.push_back(e.first);
  return ids;
}

int64_t LatentCache::length(SeqId id) const { return find(id).length; }

int64_t LatentCache::capacity(SeqId id) const {
  return static_cast<int64_t>(find(id).pages.size()) * options_.page_size;
}

std::span<const int32_t> LatentCache::block_table(SeqId id) const { return find(id).pages; }

void LatentCache::reserve(std::span<const SeqId> ids, std::span<const int64_t> extra) {
  if (ids.size() != extra.size()) throw InvalidArgument("cache: reserve needs one count per sequence");
  // Per distinct sequence, in the order first listed: the tokens it must hold (sequences listed twice
  // accumulate). A hash map, not a scan per entry: a batch of 150000 sequences took 43 s quadratically.
  const int64_t pool_tokens = options_.num_pages * options_.page_size;  // < 2^39: sums below cannot overflow
  std::vector<std::pair<SeqId, int64_t>> want;
  std::unordered_map<SeqId, size_t> slot;
  slot.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (extra[i] < 0)
      throw InvalidArgument("cache: cannot reserve a negative number of tokens (" + std::to_string(extra[i]) +
                            " for sequence " + std::to_string(ids[i]) + ")");
    const Sequence& s = find(ids[i]);
    auto [it, fresh] = slot.try_emplace(ids[i], want.size());
    if (fresh) want.emplace_back(ids[i], s.length);
    int64_t& tokens = want[it->second].second;
    if (extra[i] > pool_tokens - tokens)
      throw OutOfPages("cache: out of pages: sequence " + std::to_string(ids[i]) + " would hold more than the " +
                       std::to_string(pool_tokens) + " tokens of the whole pool (" + std::to_string(extra[i]) +
                       " more requested); nothing was stored");
    tokens += extra[i];
  }
  std::vector<int64_t> need(want.size());
  int64_t total = 0;
  for (size_t k = 0; k < want.size(); ++k) {
    const int64_t pages = (want[k].second + options_.page_size - 1) / options_.page_size;
    need[k] = std::max<int64_t>(0, pages - static_cast<int64_t>(find(want[k].first).pages.size()));
    total += need[k];  // each <= 2^31 pages, at most 2^31 distinct sequences: fits
  }
  if (total > pages_free())
    throw OutOfPages("cache: out of pages: the request needs " + std::to_string(total) + " more pages of " +
                     std::to_string(options_.page_size) + " tokens, only " + std::to_string(pages_free()) +
                     " of " + std::to_string(pages_total()) + " are free; nothing was stored");
  for (size_t k = 0; k < want.size(); ++k) {
    Sequence& s = find(want[k].first);
    for (int64_t j = 0; j < need[k]; ++j) {
      s.pages.push_back(free_pages_.back());
      free_pages_.pop_back();
    }
  }
}

void LatentCache::commit(SeqId id, int64_t new_length) {
  Sequence& s = find(id);
  if (new_length < s.length || new_length > capacity(id))
    throw InvalidArgument("cache: commit of sequence " + std::to_string(id) + " to length " +
                          std::to_string(new_length) + " outside [" + std::to_string(s.length) + ", " +
                          std::to_string(capacity(id)) + "]");
  s.length = new_length;
}

void LatentCache::truncate(SeqId id, int64_t new_length) {
  Sequence& s = find(id);
  if (new_length < 0 || new_length > s.length)
    throw InvalidArgument("cache: cannot truncate sequence " + std::to_string(id) + " of length " +
                          std::to_string(s.length) + " to " + std::to_string(new_length));
  s.length = new_length;
}

void LatentCache::release_unused(SeqId id, int64_t keep_tokens) {
  Sequence& s = find(id);
  const int64_t tokens = std::max(s.length, keep_tokens);
  const auto keep = static_cast<size_t>((tokens + options_.page_size - 1) / options_.page_size);
  while (s.pages.size() > keep) {
    free_pages_.push_back(s.pages.back());
    s.pages.pop_back();
  }
}

std::vector<float> LatentCache::read_rows(SeqId id, int64_t begin, int64_t end) const {
  const Sequence& s = find(id);
  if (begin < 0 || end < begin || end > s.length)
    throw InvalidArgument("cache: rows [" + std::to_string(begin) + ", " + std::to_string(end) +
                          ") of sequence " + std::to_string(id) + " of length " + std::to_string(s.length));
  const int64_t w = options_.row_width;
  std::vector<float> out(static_cast<size_t>((end - begin) * w));
  // One copy per run of rows inside a page (one device transfer each for device caches).
  std::vector<std::byte> run_bytes(static_cast<size_t>(page_bytes()));
  for (int64_t t = begin; t < end;) {
    const int64_t page = s.pages[static_cast<size_t>(t / options_.page_size)];
    const int64_t run = std::min(end - t, options_.page_size - t % options_.page_size);
    storage_->copy_to_host((page * options_.page_size + t % options_.page_size) * row_bytes(), run * row_bytes(),
                           run_bytes.data());
    for (int64_t r = 0; r < run; ++r)
      load_row(row_layout(), run_bytes.data() + r * row_bytes(), out.data() + (t - begin + r) * w);
    t += run;
  }
  return out;
}

int64_t LatentCache::first_non_finite(SeqId id, int64_t begin, int64_t end) const {
  const Sequence& s = find(id);
  const int64_t cap = capacity(id);
  if (begin < 0 || end < begin || end > cap)
    throw InvalidArgument("cache: rows [" + std::to_string(begin) + ", " + std::to_string(end) + ") of sequence " +
                          std::to_string(id) + " with room for " + std::to_string(cap));
  const int64_t w = options_.row_width;
  const RowLayout layout = row_layout();
  // One copy per run of rows inside a page (one device transfer each for device caches), one pass over it.
  std::vector<std::byte> run_bytes(static_cast<size_t>(std::min(end - begin, options_.page_size) * row_bytes()));
  for (int64_t t = begin; t < end;) {
    const int64_t page = s.pages[static_cast<size_t>(t / options_.page_size)];
    const int64_t run = std::min(end - t, options_.page_size - t % options_.page_size);
    storage_->copy_to_host((page * options_.page_size + t % options_.page_size) * row_bytes(), run * row_bytes(),
                           run_bytes.data());
    for (int64_t r = 0; r < run; ++r) {
      bool finite = true;
      if (options_.dtype == DType::F32) {
        const auto* row = reinterpret_cast<const float*>(run_bytes.data()) + r * w;
        for (int64_t j = 0; j < w; ++j) finite &= std::isfinite(row[j]);
      } else if (options_.dtype == DType::BF16) {
        const auto* row = reinterpret_cast<const uint16_t*>(run_bytes.data()) + r * w;
        for (int64_t j = 0; j < w; ++j) finite &= (row[j] & 0x7f80) != 0x7f80;  // exponent all ones: inf or NaN
      } else {
        finite = row_is_finite(layout, run_bytes.data() + r * row_bytes());
      }
      if (!finite) return t + r;
    }
    t += run;
  }
  return -1;
}

void LatentCache::fill_unused(float value) {
  std::vector<std::byte> row(static_cast<size_t>(row_bytes()));
  const std::vector<float> values(static_cast<size_t>(options_.row_width), value);
  store_row(row_layout(), values.data(), row.data());
  std::vector<bool> used(static_cast<size_t>(options_.num_pages * options_.page_size), false);
  for (const auto& [id, s] : sequences_)
    for (int64_t t = 0; t < s.length; ++t)
      used[static_cast<size_t>(s.pages[static_cast<size_t>(t / options_.page_size)] * options_.page_size +
                               t % options_.page_size)] = true;
  for (size_t slot = 0; slot < used.size(); ++slot)
    if (!used[slot]) storage_->copy_from_host(static_cast<int64_t>(slot) * row_bytes(), row_bytes(), row.data());
}

void* LatentCache::storage() { return storage_->data(); }
const void* LatentCache::storage() const { return storage_->data(); }

}  // namespace mla
