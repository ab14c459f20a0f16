#include "mla/attention.hpp"

#include <algorithm>

#include "core/backend.hpp"
#include "mla/error.hpp"

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

Attention::Attention(const LayerWeights& weights, const LayerOptions& options) : options_(options) {
  weights.validate();
  impl_ = detail::find_backend(options.device).make_layer(weights, options);
  config_ = weights.config;
}

Attention::~Attention() = default;
Attention::Attention(Attention&&) noexcept = default;
Attention& Attention::operator=(Attention&&) noexcept = default;

LatentCache Attention::make_cache(int64_t num_pages, int64_t page_size, uint64_t page_order_seed) const {
  CacheOptions o;
  o.num_pages = num_pages;
  o.page_size = page_size;
  o.row_width = config_.latent_dim();
  o.dtype = options_.precision == Precision::F32 ? DType::F32 : DType::BF16;
  o.device = options_.device;
  o.page_order_seed = page_order_seed;
  return LatentCache(o);
}

void Attention::forward(std::span<const SequenceChunk> batch, const float* hidden, float* out, LatentCache& cache) {
  const CacheOptions& co = cache.options();
  const DType want = options_.precision == Precision::F32 ? DType::F32 : DType::BF16;
  if (co.device != options_.device)
    throw InvalidArgument("forward: the cache lives on '" + co.device + "' but the layer on '" + options_.device + "'");
  if (co.row_width != config_.latent_dim())
    throw InvalidArgument("forward: cache rows are " + std::to_string(co.row_width) + " wide, the layer needs " +
                          std::to_string(config_.latent_dim()) + " (kv_lora_rank + qk_rope_head_dim)");
  if (co.dtype != want)
    throw InvalidArgument("forward: a " + std::string(precision_name(options_.precision)) + " layer needs a " +
                          std::string(dtype_name(want)) + " cache, got " + std::string(dtype_name(co.dtype)));

  // Validate every chunk before anything is stored.
  std::vector<SeqId> ids;
  std::vector<int64_t> counts;
  int64_t total = 0;
  for (const SequenceChunk& c : batch) {
    if (!cache.contains(c.seq)) throw InvalidArgument("forward: no sequence " + std::to_string(c.seq) + " in the cache");
    if (std::find(ids.begin(), ids.end(), c.seq) != ids.end())
      throw InvalidArgument("forward: sequence " + std::to_string(c.seq) + " appears twice in one batch");
    if (c.num_tokens < 0) throw InvalidArgument("forward: negative token count for sequence " + std::to_string(c.seq));
    if (c.positions)
      for (int64_t i = 0; i < c.num_tokens; ++i)
        if (c.positions[i] < 0)
          throw InvalidArgument("forward: sequence " + std::to_string(c.seq) + " has negative position " +
                                std::to_string(c.positions[i]) + " at token " + std::to_string(i));
    ids.push_back(c.seq);
    counts.push_back(c.num_tokens);
    total += c.num_tokens;
  }
  if (total > 0 && (!hidden || !out)) throw InvalidArgument("forward: hidden and out must not be null");

  std::vector<std::vector<int64_t>> default_positions(batch.size());
  std::vector<detail::ChunkPlan> plans(batch.size());
  std::vector<int64_t> before(batch.size()), capacity_before(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    before[i] = cache.length(batch[i].seq);
    capacity_before[i] = cache.capacity(batch[i].seq);
  }
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
      p.path = options_.path == Path::Auto ? choose_path(config_, c.num_tokens, before[i] + c.num_tokens) : options_.path;
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
    args.cache_dtype = co.dtype;
    impl_->forward(args);
  } catch (...) {
    // Only the pages this call reserved go back: pages the caller reserved beforehand stay with the sequence.
    for (size_t i = 0; i < ids.size(); ++i) cache.release_unused(ids[i], capacity_before[i]);
    throw;
  }
  for (size_t i = 0; i < batch.size(); ++i) cache.commit(batch[i].seq, before[i] + batch[i].num_tokens);
  last_paths_ = std::move(paths);
}

void Attention::forward_host(std::span<const SequenceChunk> batch, const float* hidden, float* out,
                             LatentCache& cache) {
  const detail::Backend& backend = detail::find_backend(options_.device);
  if (backend.host_memory()) return forward(batch, hidden, out, cache);
  int64_t total = 0;
  for (const SequenceChunk& c : batch) total += std::max<int64_t>(c.num_tokens, 0);
  const int64_t bytes = std::max<int64_t>(total * config_.hidden_size * static_cast<int64_t>(sizeof(float)), 4);
  auto din = backend.allocate(bytes), dout = backend.allocate(bytes);
  if (total > 0) din->copy_from_host(0, bytes, hidden);
  forward(batch, static_cast<const float*>(din->data()), static_cast<float*>(dout->data()), cache);
  if (total > 0) dout->copy_to_host(0, bytes, out);
}

const Config& Attention::config() const { return config_; }

}  // namespace mla
