// Runs a layer over a whole [B, T] batch the way a serving engine would feed it: one shot, in chunks, or
// prefill-then-decode. `mla forward`, the tests and the Python package use it.
#pragma once

#include <cstdint>
#include <vector>

#include "mla/attention.hpp"

namespace mla {

struct RunOptions {
  int64_t chunk = 0;          // > 0: feed each sequence's tokens in chunks of this many (one call per chunk round)
  int64_t decode_after = -1;  // >= 0: prefill this many tokens (in chunks if chunk > 0), then one token per call
  int64_t page_size = 64;
  uint64_t page_order_seed = 0;  // see CacheOptions
  bool poison_unused = false;    // write NaN into every unused cache slot before each call
};

struct RunResult {
  std::vector<float> output;  // [B, T, D]
  std::vector<float> latent;  // [B, T, d_c + d_r], the cache rows as stored, read back as f32
  int64_t calls = 0;          // forward() calls made
};

// hidden [B, T, D] f32 host memory, positions [B, T] or null (0..T-1). B sequences in one cache sized for
// B x T tokens; every call carries the next piece of every sequence. B and T must be at least 1 (an empty
// batch or empty sequences throw InvalidArgument naming batch or tokens), and a row the layer cannot compute
// finitely throws (see Attention::forward). Sizes that cannot be allocated throw OutOfMemory.
RunResult run_sequences(Attention& layer, const float* hidden, const int64_t* positions, int64_t batch,
                        int64_t tokens, const RunOptions& options = {});

}  // namespace mla
