#include "mla/run.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#include "mla/error.hpp"

namespace mla {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

// a · b for the sizes below, or InvalidArgument naming the shape.
int64_t checked_mul(int64_t a, int64_t b, int64_t batch, int64_t tokens, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r))
    throw InvalidArgument("run: hidden_states of batch " + str(batch) + " x tokens " + str(tokens) + " overflow " +
                          what);
  return r;
}

RunResult run(Attention& layer, const float* hidden, const int64_t* positions, int64_t batch, int64_t tokens,
              const RunOptions& opt);

}  // namespace

RunResult run_sequences(Attention& layer, const float* hidden, const int64_t* positions, int64_t batch,
                        int64_t tokens, const RunOptions& opt) {
  // Every size below is derived from batch and tokens, which the caller's hidden_states hold: an empty sequence
  // or an empty batch is refused by name (a [150000, 0, D] tensor of zero bytes reserved a 2.4 GB cache).
  if (batch < 1)
    throw InvalidArgument("run: batch (hidden_states.shape[0]) must be at least 1, got " + str(batch));
  if (tokens < 1)
    throw InvalidArgument("run: tokens (hidden_states.shape[1]) must be at least 1, got " + str(tokens) +
                          ": every sequence needs a token");
  if (!hidden) throw InvalidArgument("run: hidden_states must not be null");
  try {
    return run(layer, hidden, positions, batch, tokens, opt);
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("run: cannot allocate the cache and outputs for hidden_states of batch " + str(batch) +
                      " x tokens " + str(tokens));
  } catch (const std::length_error&) {
    throw OutOfMemory("run: hidden_states of batch " + str(batch) + " x tokens " + str(tokens) +
                      " are more than can be allocated");
  }
}

namespace {

RunResult run(Attention& layer, const float* hidden, const int64_t* positions, int64_t batch, int64_t tokens,
              const RunOptions& opt) {
  const Config& c = layer.config();
  const int64_t D = c.hidden_size, W = c.latent_dim();
  if (opt.chunk < 0) throw InvalidArgument("run: chunk must not be negative, got " + str(opt.chunk));
  if (opt.page_size < 1) throw InvalidArgument("run: page_size must be positive, got " + std::to_string(opt.page_size));
  if (opt.decode_after < -1)
    throw InvalidArgument("run: decode_after must be -1 (no decode) or a token count, got " +
                          std::to_string(opt.decode_after));
  if (opt.decode_after > tokens)
    throw InvalidArgument("run: decode_after " + std::to_string(opt.decode_after) + " exceeds the " +
                          std::to_string(tokens) + " tokens");
  const int64_t rows = checked_mul(batch, tokens, batch, tokens, "a token count");
  checked_mul(rows, std::max(D, W), batch, tokens, "an element count");
  const int64_t pages_per_seq = (tokens + opt.page_size - 1) / opt.page_size;
  if (pages_per_seq > ((int64_t{1} << 31) - 1) / batch)
    throw InvalidArgument("run: hidden_states of batch " + str(batch) + " x tokens " + str(tokens) + " need " +
                          "more than 2^31-1 cache pages of page_size " + str(opt.page_size));
  LatentCache cache = layer.make_cache(batch * pages_per_seq, opt.page_size, opt.page_order_seed);
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
  r.output.assign(static_cast<size_t>(rows * D), std::numeric_limits<float>::quiet_NaN());
  const int64_t prefill = opt.decode_after >= 0 ? opt.decode_after : tokens;
  int64_t done = 0;
  std::vector<float> in, out;
  while (done < tokens) {
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
  }
  r.latent.resize(static_cast<size_t>(rows * W));
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<float> stored = cache.read_rows(ids[b], 0, tokens);
    std::copy(stored.begin(), stored.end(), r.latent.begin() + b * tokens * W);
  }
  return r;
}

}  // namespace
}  // namespace mla
