#include "mla/run.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "mla/error.hpp"

namespace mla {

RunResult run_sequences(Attention& layer, const float* hidden, const int64_t* positions, int64_t batch,
                        int64_t tokens, const RunOptions& opt) {
  const Config& c = layer.config();
  const int64_t D = c.hidden_size, W = c.latent_dim();
  if (batch < 0 || tokens < 0) throw InvalidArgument("run: batch and tokens must not be negative");
  if (opt.chunk < 0) throw InvalidArgument("run: chunk must not be negative");
  if (opt.page_size < 1) throw InvalidArgument("run: page_size must be positive, got " + std::to_string(opt.page_size));
  if (opt.decode_after < -1)
    throw InvalidArgument("run: decode_after must be -1 (no decode) or a token count, got " +
                          std::to_string(opt.decode_after));
  if (opt.decode_after > tokens)
    throw InvalidArgument("run: decode_after " + std::to_string(opt.decode_after) + " exceeds the " +
                          std::to_string(tokens) + " tokens");
  const int64_t pages_per_seq = std::max<int64_t>(1, (tokens + opt.page_size - 1) / opt.page_size);
  LatentCache cache = layer.make_cache(std::max<int64_t>(1, batch * pages_per_seq), opt.page_size, opt.page_order_seed);
  std::vector<SeqId> ids;
  for (int64_t b = 0; b < batch; ++b) ids.push_back(cache.add_sequence());

  std::vector<int64_t> default_positions;
  if (!positions) {
    default_positions.resize(static_cast<size_t>(batch * tokens));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < tokens; ++t) default_positions[b * tokens + t] = t;
    positions = default_positions.data();
  }

  RunResult r;
  r.output.assign(static_cast<size_t>(batch * tokens * D), std::numeric_limits<float>::quiet_NaN());
  const int64_t prefill = opt.decode_after >= 0 ? opt.decode_after : tokens;
  int64_t done = 0;
  std::vector<float> in, out;
  while (done < tokens || (tokens == 0 && r.calls == 0)) {
    // With tokens == 0 one call of empty chunks still runs (step 0): it exercises the empty-batch path.
    const int64_t step = done < prefill ? std::min(prefill - done, opt.chunk > 0 ? opt.chunk : prefill)
                                        : std::min<int64_t>(1, tokens - done);
    // One call carries the same piece of every sequence, packed [b][i].
    in.resize(static_cast<size_t>(batch * step * D));
    for (int64_t b = 0; b < batch; ++b)
      std::copy_n(hidden + (b * tokens + done) * D, step * D, in.data() + b * step * D);
    std::vector<SequenceChunk> chunks;
    for (int64_t b = 0; b < batch; ++b) chunks.push_back({ids[b], step, positions + b * tokens + done});
    if (opt.poison_unused) cache.fill_unused(std::numeric_limits<float>::quiet_NaN());
    out.assign(in.size(), 0.f);
    layer.forward_host(chunks, in.data(), out.data(), cache);
    for (int64_t b = 0; b < batch; ++b)
      std::copy_n(out.data() + b * step * D, step * D, r.output.data() + (b * tokens + done) * D);
    done += step;
    ++r.calls;
    if (tokens == 0) break;
  }
  r.latent.resize(static_cast<size_t>(batch * tokens * W));
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<float> rows = cache.read_rows(ids[b], 0, tokens);
    std::copy(rows.begin(), rows.end(), r.latent.begin() + b * tokens * W);
  }
  return r;
}

}  // namespace mla
