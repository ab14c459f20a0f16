// One MLA attention layer over a batch of sequences that share a paged latent cache.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mla/cache.hpp"
#include "mla/config.hpp"
#include "mla/weights.hpp"

namespace mla {

namespace detail {
class LayerImpl;
}

// Expanded: per-head K and V are expanded from the latent rows (prefill-shaped work, compute-bound).
// Absorbed: queries are absorbed into the latent space, MQA over the 576-wide rows (decode-shaped work).
// Auto: per sequence, whichever costs fewer FLOPs for its new tokens and context (see choose_path).
enum class Path { Auto, Expanded, Absorbed };

// F32: f32 weights, activations and cache. BF16: bf16 weights, activations and cache; fp32 accumulation
// and fp32 softmax everywhere.
enum class Precision { F32, BF16 };

struct LayerOptions {
  std::string device = "cpu";      // "cpu" (fast), "cpu-reference" (scalar loops), "cuda"
  Precision precision = Precision::BF16;
  Path path = Path::Auto;
};

// New tokens of one sequence in a batch.
struct SequenceChunk {
  SeqId seq = 0;
  int64_t num_tokens = 0;                // may be 0
  const int64_t* positions = nullptr;    // [num_tokens] host memory; null: length(seq) + i
};

class Attention {
 public:
  Attention(const LayerWeights& weights, const LayerOptions& options = {});
  ~Attention();
  Attention(Attention&&) noexcept;
  Attention& operator=(Attention&&) noexcept;

  const Config& config() const;
  const LayerOptions& options() const { return options_; }

  // A cache whose rows, dtype and device match this layer.
  LatentCache make_cache(int64_t num_pages, int64_t page_size = 64, uint64_t page_order_seed = 0) const;

  // hidden: [Σ num_tokens, D] f32, the chunks' rows in batch order; out: the same shape. Both in the layer's
  // device memory (host memory for the CPU backends). Appends each chunk's latent rows to its sequence,
  // then attends causally (query i of a chunk sees cache index <= length_before + i). Validates everything
  // (ids, duplicates, room in the cache, finite inputs) before it changes anything; on error the cache is
  // as it was.
  void forward(std::span<const SequenceChunk> batch, const float* hidden, float* out, LatentCache& cache);

  // The same with hidden and out in host memory whatever the device (staged through device buffers).
  void forward_host(std::span<const SequenceChunk> batch, const float* hidden, float* out, LatentCache& cache);

  // The paths the last successful forward() used, one per chunk.
  const std::vector<Path>& last_paths() const { return last_paths_; }

 private:
  LayerOptions options_;
  Config config_;
  std::unique_ptr<detail::LayerImpl> impl_;
  std::vector<Path> last_paths_;
};

// The cheaper path for `new_tokens` queries over `context` keys (context includes the new tokens).
Path choose_path(const Config& config, int64_t new_tokens, int64_t context);

std::string_view path_name(Path p);
std::string_view precision_name(Precision p);
// The backends compiled into this build and usable on this machine, e.g. {"cpu", "cpu-reference"}.
std::vector<std::string> available_devices();

}  // namespace mla
