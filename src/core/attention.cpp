#include "mla/attention.hpp"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <new>
#include <stdexcept>

#include "core/backend.hpp"
#include "mla/error.hpp"
#include "mla/parallel.hpp"

namespace mla {

std::string_view path_name(Path p) {
  switch (p) {
    case Path::Auto: return "auto";
    case Path::Expanded: return "expanded";
    case Path::Absorbed: return "absorbed";
  }
  return "?";
}

std::string_view precision_name(Precision p) { return p == Precision::F32 ? "f32" : "bf16"; }
std::string_view cache_dtype_name(CacheDtype d) { return d == CacheDtype::FP8 ? "fp8" : "auto"; }

std::vector<std::string> available_devices() {
  std::vector<std::string> names;
  for (const detail::Backend* b : detail::all_backends()) names.emplace_back(b->name());
  return names;
}

Path choose_path(const Config& config, int64_t new_tokens, int64_t context) {
  const CostModel m = CostModel::of(config);
  const double n = static_cast<double>(new_tokens), L = static_cast<double>(context);
  const double pairs = n * (L - n) + n * (n + 1) / 2;  // causal (query, key) pairs
  const double expanded = m.expand_flops_per_key * L + m.expanded_attention_flops_per_pair * pairs;
  const double absorbed = m.absorb_flops_per_token * n + m.absorbed_attention_flops_per_pair * pairs;
  return absorbed <= expanded ? Path::Absorbed : Path::Expanded;
}

struct Attention::Shared {
  std::mutex mutex;
  std::vector<Path> last_paths;
};

Attention::Attention(const LayerWeights& weights, const LayerOptions& options)
    : options_(options), shared_(std::make_unique<Shared>()) {
  weights.validate();
  if (options.cache_dtype == CacheDtype::FP8 && options.precision != Precision::BF16)
    throw InvalidArgument("layer: cache_dtype fp8 needs precision bf16, got " +
                          std::string(precision_name(options.precision)));
  if (const Communicator* comm = options.communicator) {
    if (options.device != "cuda")
      throw InvalidArgument("layer: tensor parallelism (LayerOptions::communicator) needs device \"cuda\", got \"" +
                            options.device + "\"");
    LayerWeights shard;
    if (weights.heads.world == 1) {  // the whole layer: this rank keeps its heads
      shard = weights.shard_heads(comm->rank(), comm->world());
      shard.o_bias = weights.o_bias;  // added once, after the all-reduce, on every rank
    } else {  // loaded with a HeadShard: must be this rank's
      if (weights.heads.rank != comm->rank() || weights.heads.world != comm->world())
        throw InvalidArgument("layer: the weights hold the heads of rank " + std::to_string(weights.heads.rank) +
                              " of " + std::to_string(weights.heads.world) + ", but the communicator is rank " +
                              std::to_string(comm->rank()) + " of " + std::to_string(comm->world()));
      shard = weights;
      if (!weights.o_bias_layer.empty()) shard.o_bias = weights.o_bias_layer;
    }
    impl_ = detail::find_backend(options.device).make_layer(shard, options);
  } else {
    impl_ = detail::find_backend(options.device).make_layer(weights, options);
  }
  config_ = weights.config;
  // With a communicator the layer is the whole layer's (its output is), also when it was given a shard.
  if (options.communicator) config_.num_heads *= weights.heads.world;
}

Attention::~Attention() = default;
Attention::Attention(Attention&&) noexcept = default;
Attention& Attention::operator=(Attention&&) noexcept = default;

DType Attention::cache_dtype() const {
  if (options_.cache_dtype == CacheDtype::FP8) return DType::F8_E4M3;
  return options_.precision == Precision::F32 ? DType::F32 : DType::BF16;
}

LatentCache Attention::make_cache(int64_t num_pages, int64_t page_size, uint64_t page_order_seed) const {
  CacheOptions o;
  o.num_pages = num_pages;
  o.page_size = page_size;
  o.row_width = config_.latent_dim();
  o.rope_width = config_.qk_rope_head_dim;
  o.dtype = cache_dtype();
  o.device = options_.device;
  o.page_order_seed = page_order_seed;
  return LatentCache(o);
}

std::vector<Path> Attention::last_paths() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->last_paths;
}

namespace {

std::string str(int64_t v) { return std::to_string(v); }

// Σ num_tokens, reading nothing but the counts: each must be non-negative and the sum must fit (counts of
// [2^63-1, 2^63-1, 3] wrapped to 1 and passed for one row), and no more tokens than the whole pool can hold.
// Only then may a chunk's positions be read: a count checked later let an earlier chunk read far past its array.
int64_t checked_total(std::span<const SequenceChunk> batch, const LatentCache& cache) {
  int64_t total = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceChunk& c = batch[i];
    if (c.num_tokens < 0)
      throw InvalidArgument("forward: num_tokens of chunk " + str(static_cast<int64_t>(i)) + " (sequence " +
                            str(c.seq) + ") is " + str(c.num_tokens) + ", a negative token count");
    if (__builtin_add_overflow(total, c.num_tokens, &total))
      throw InvalidArgument("forward: num_tokens add up to more than 2^63-1 at chunk " +
                            str(static_cast<int64_t>(i)) + " (sequence " + str(c.seq) + ", " + str(c.num_tokens) +
                            " tokens)");
  }
  const int64_t pool = cache.pages_total() * cache.options().page_size;
  if (total > pool)
    throw OutOfPages("forward: out of pages: num_tokens add up to " + str(total) + ", more than the " + str(pool) +
                     " tokens the whole cache holds; nothing was stored");
  return total;
}

// Ids known to the cache, each at most once (sorted copy: O(B log B); a scan per chunk took 43 s for 150000).
void check_ids(std::span<const SequenceChunk> batch, const LatentCache& cache) {
  std::vector<SeqId> ids;
  ids.reserve(batch.size());
  for (const SequenceChunk& c : batch) {
    if (!cache.contains(c.seq)) throw InvalidArgument("forward: no sequence " + str(c.seq) + " in the cache");
    ids.push_back(c.seq);
  }
  std::sort(ids.begin(), ids.end());
  if (auto it = std::adjacent_find(ids.begin(), ids.end()); it != ids.end())
    throw InvalidArgument("forward: sequence " + str(*it) + " appears twice in one batch");
}

bool row_finite(const float* row, int64_t n) {
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) finite &= std::isfinite(row[j]);
  return finite;
}

}  // namespace

std::vector<Path> Attention::forward(std::span<const SequenceChunk> batch, const float* hidden, float* out,
                                     LatentCache& cache) {
  const CacheOptions& co = cache.options();
  const DType want = cache_dtype();
  if (co.device != options_.device)
    throw InvalidArgument("forward: the cache lives on '" + co.device + "' but the layer on '" + options_.device + "'");
  if (co.row_width != config_.latent_dim())
    throw InvalidArgument("forward: cache rows are " + std::to_string(co.row_width) + " wide, the layer needs " +
                          std::to_string(config_.latent_dim()) + " (kv_lora_rank + qk_rope_head_dim)");
  if (co.dtype != want)
    throw InvalidArgument("forward: a " + std::string(precision_name(options_.precision)) + " layer with cache_dtype " +
                          std::string(cache_dtype_name(options_.cache_dtype)) + " needs a " +
                          std::string(dtype_name(want)) + " cache, got " + std::string(dtype_name(co.dtype)));
  if (co.dtype == DType::F8_E4M3 && co.rope_width != config_.qk_rope_head_dim)
    throw InvalidArgument("forward: the fp8 cache keeps the last " + std::to_string(co.rope_width) +
                          " values of a row in bf16, the layer's rope part is " +
                          std::to_string(config_.qk_rope_head_dim) + " (qk_rope_head_dim)");

  // Validate every chunk before anything is stored: counts first, then ids, then what the positions hold.
  const int64_t total = checked_total(batch, cache);
  check_ids(batch, cache);
  for (const SequenceChunk& c : batch)
    if (c.positions)
      for (int64_t i = 0; i < c.num_tokens; ++i)
        if (c.positions[i] < 0)
          throw InvalidArgument("forward: sequence " + std::to_string(c.seq) + " has negative position " +
                                std::to_string(c.positions[i]) + " at token " + std::to_string(i));
  if (total > 0 && (!hidden || !out)) throw InvalidArgument("forward: hidden and out must not be null");

  try {
    std::vector<SeqId> ids(batch.size());
    std::vector<int64_t> counts(batch.size());
    std::vector<int64_t> before(batch.size()), capacity_before(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      ids[i] = batch[i].seq;
      counts[i] = batch[i].num_tokens;
      before[i] = cache.length(batch[i].seq);
      capacity_before[i] = cache.capacity(batch[i].seq);
    }
    std::vector<std::vector<int64_t>> default_positions(batch.size());
    std::vector<detail::ChunkPlan> plans(batch.size());
    std::vector<Path> paths(batch.size());

    cache.reserve(ids, counts);  // throws OutOfPages with nothing changed
    try {
      int64_t row = 0;
      for (size_t i = 0; i < batch.size(); ++i) {
        const SequenceChunk& c = batch[i];
        detail::ChunkPlan& p = plans[i];
        p.first_row = row;
        p.num_tokens = c.num_tokens;
        p.cached = before[i];
        p.positions = c.positions;
        if (!p.positions) {
          default_positions[i].resize(static_cast<size_t>(c.num_tokens));
          for (int64_t t = 0; t < c.num_tokens; ++t) default_positions[i][t] = before[i] + t;
          p.positions = default_positions[i].data();
        }
        p.block_table = cache.block_table(c.seq).data();
        p.path = options_.path == Path::Auto ? choose_path(config_, c.num_tokens, before[i] + c.num_tokens)
                                             : options_.path;
        paths[i] = p.path;
        row += c.num_tokens;
      }
      detail::ForwardArgs args;
      args.chunks = plans;
      args.total_tokens = total;
      args.hidden = hidden;
      args.out = out;
      args.cache = cache.storage();
      args.page_size = co.page_size;
      args.num_pages = co.num_pages;
      args.cache_row = cache.row_layout();
      impl_->forward(args);

      // Finite inputs can still overflow the projections (3e38 does): refuse to store or return such rows.
      // One pass over the new cache rows, one over the output.
      // (The CUDA layer does both on the device and throws from forward: impl_->checks_finite_rows().)
      if (!impl_->checks_finite_rows()) {
        for (size_t i = 0; i < batch.size(); ++i) {
          const SequenceChunk& c = batch[i];
          if (const int64_t t = cache.first_non_finite(c.seq, before[i], before[i] + c.num_tokens); t >= 0)
            throw InvalidArgument("forward: the cache row of sequence " + str(c.seq) + ", token " + str(t - before[i]) +
                                  " of the chunk (hidden_states row " + str(plans[i].first_row + t - before[i]) +
                                  ") is not finite: the hidden states overflow the layer's projections; nothing "
                                  "was stored");
        }
        const int64_t D = config_.hidden_size;
        std::vector<float> staged;
        const float* host_out = out;
        const detail::Backend& backend = detail::find_backend(options_.device);
        if (!backend.host_memory() && total > 0) {
          staged.resize(static_cast<size_t>(total * D));
          backend.copy_to_host(out, total * D * static_cast<int64_t>(sizeof(float)), staged.data());
          host_out = staged.data();
        }
        for (size_t i = 0; i < batch.size(); ++i)
          for (int64_t t = 0; t < batch[i].num_tokens; ++t) {
            const int64_t r = plans[i].first_row + t;
            if (!row_finite(host_out + r * D, D))
              throw InvalidArgument("forward: out row " + str(r) + " (sequence " + str(batch[i].seq) + ", token " +
                                    str(t) + " of the chunk) is not finite: the hidden states overflow the layer; "
                                    "nothing was stored");
          }
      }
    } catch (...) {
      // Only the pages this call reserved go back: pages the caller reserved beforehand stay with the sequence.
      for (size_t i = 0; i < ids.size(); ++i) cache.release_unused(ids[i], capacity_before[i]);
      throw;
    }
    for (size_t i = 0; i < batch.size(); ++i) cache.commit(batch[i].seq, before[i] + batch[i].num_tokens);
    {
      std::lock_guard lock(shared_->mutex);
      shared_->last_paths = paths;
    }
    return paths;
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("forward: cannot allocate the working memory for num_tokens adding up to " + str(total) +
                      " over " + str(static_cast<int64_t>(batch.size())) + " sequences; nothing was stored");
  } catch (const std::length_error&) {
    throw OutOfMemory("forward: num_tokens adding up to " + str(total) + " over " +
                      str(static_cast<int64_t>(batch.size())) + " sequences is more than can be allocated; nothing "
                      "was stored");
  }
}

std::vector<Path> Attention::forward_host(std::span<const SequenceChunk> batch, const float* hidden, float* out,
                                          LatentCache& cache) {
  const detail::Backend& backend = detail::find_backend(options_.device);
  if (backend.host_memory()) return forward(batch, hidden, out, cache);
  const int64_t total = checked_total(batch, cache);  // before the staging buffers are sized from it
  int64_t bytes = 0;
  if (__builtin_mul_overflow(total, config_.hidden_size * static_cast<int64_t>(sizeof(float)), &bytes))
    throw InvalidArgument("forward: num_tokens adding up to " + str(total) + " rows of hidden_size " +
                          str(config_.hidden_size) + " overflow a byte count");
  bytes = std::max<int64_t>(bytes, 4);
  auto din = backend.allocate(bytes), dout = backend.allocate(bytes);
  if (total > 0) din->copy_from_host(0, bytes, hidden);
  std::vector<Path> paths =
      forward(batch, static_cast<const float*>(din->data()), static_cast<float*>(dout->data()), cache);
  if (total > 0) dout->copy_to_host(0, bytes, out);
  return paths;
}

const Config& Attention::config() const { return config_; }

}  // namespace mla
