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
class Communicator;  // mla/parallel.hpp

// Expanded: per-head K and V are expanded from the latent rows (prefill-shaped work, compute-bound).
// Absorbed: queries are absorbed into the latent space, MQA over the 576-wide rows (decode-shaped work).
// Auto: per sequence, whichever costs fewer FLOPs for its new tokens and context (see choose_path).
enum class Path { Auto, Expanded, Absorbed };

// F32: f32 weights, activations and cache. BF16: bf16 weights, activations and cache; fp32 accumulation
// and fp32 softmax everywhere.
enum class Precision { F32, BF16 };

// How the layer's cache stores rows. Auto: in the precision's element type (bf16 or f32). FP8: the fp8_ds_mla layout
// (RowLayout in cache.hpp: 656 bytes a token for V3 instead of 1152), BF16 layers only; the kernels read the
// dequantised values bf16(fp8 · scale) and compute as over a bf16 cache.
enum class CacheDtype { Auto, FP8 };

struct LayerOptions {
  std::string device = "cpu";      // "cpu" (fast), "cpu-reference" (scalar loops), "cuda"
  Precision precision = Precision::BF16;
  Path path = Path::Auto;
  CacheDtype cache_dtype = CacheDtype::Auto;
  // Tensor parallelism over heads ("cuda" only; docs/parallel.md): this layer is rank r = communicator->rank() of
  // W = communicator->world(). Give it the whole layer's weights (it keeps heads [H·r/W, H·(r+1)/W):
  // LayerWeights::shard_heads; W must divide H), or rank r's slice read by LayerWeights::load(dir, layer,
  // HeadShard{r, W}) (its heads must be the communicator's rank and world, else mla::InvalidArgument), with the
  // replicated q_a / kv_a projections and norms. config() is the whole layer's either way. The layer sums the
  // ranks' o_proj partials with an NCCL all-reduce inside forward(), adding o_proj's bias once after the sum, so
  // every rank's out is the whole layer's output and every rank's cache the whole layer's rows. Every rank must
  // make the same calls (same batches, same hidden states) with device communicator->device() current; a rank
  // that throws before its all-reduce (bad arguments) leaves the others waiting in it. Not owned: it must
  // outlive the layer.
  const Communicator* communicator = nullptr;
};

// New tokens of one sequence in a batch.
struct SequenceChunk {
  SeqId seq = 0;
  int64_t num_tokens = 0;                // may be 0
  const int64_t* positions = nullptr;    // [num_tokens] host memory; null: length(seq) + i
};

// Threads: one Attention may be used by several threads at once as long as no two concurrent calls share a
// LatentCache (each thread its own cache; a LatentCache is not thread-safe). That is what serving engines do:
// one layer object, one cache per worker. The CPU layers keep no mutable state across calls, so concurrent
// forwards run in parallel (each with its own OpenMP team) and give bit for bit the results of the same calls
// made one after another. The CUDA layer owns its workspaces and CUDA graph, so its forwards are serialised by
// a mutex inside the layer. Construction, moving and destruction must not overlap any call.
class Attention {
 public:
  Attention(const LayerWeights& weights, const LayerOptions& options = {});
  ~Attention();
  Attention(Attention&&) noexcept;
  Attention& operator=(Attention&&) noexcept;

  const Config& config() const;
  const LayerOptions& options() const { return options_; }
  // The dtype of this layer's cache rows: F32 or BF16 (the precision), or F8_E4M3 (cache_dtype FP8).
  DType cache_dtype() const;

  // A cache whose rows, dtype (options().cache_dtype) and device match this layer.
  LatentCache make_cache(int64_t num_pages, int64_t page_size = 64, uint64_t page_order_seed = 0) const;

  // hidden: [Σ num_tokens, D] f32, the chunks' rows in batch order; out: the same shape. Both in the layer's
  // device memory (host memory for the CPU backends). Appends each chunk's latent rows to its sequence,
  // then attends causally (query i of a chunk sees cache index <= length_before + i). Returns the path each
  // chunk used.
  //
  // Validates everything before it changes anything, and reads a chunk's positions only once every token count
  // is known to be non-negative with a sum that fits: ids, duplicates, counts, positions, room in the cache,
  // finite inputs. The new cache rows and the outputs are checked finite before the rows are committed (a
  // finite but huge input, 3e38 say, overflows the projections): on any error the cache is as it was, its
  // stored rows, lengths and pages unchanged, and the message names the sequence and row.
  std::vector<Path> forward(std::span<const SequenceChunk> batch, const float* hidden, float* out, LatentCache& cache);

  // The same with hidden and out in host memory whatever the device (staged through device buffers).
  std::vector<Path> forward_host(std::span<const SequenceChunk> batch, const float* hidden, float* out,
                                 LatentCache& cache);

  // The paths of the most recent successful forward() of any thread, one per chunk (a copy). Threads sharing
  // the layer should use forward()'s return value instead.
  std::vector<Path> last_paths() const;

 private:
  struct Shared;  // the little state calls share: last_paths under a mutex
  LayerOptions options_;
  Config config_;
  std::unique_ptr<detail::LayerImpl> impl_;
  std::unique_ptr<Shared> shared_;
};

// The cheaper path for `new_tokens` queries over `context` keys (context includes the new tokens).
Path choose_path(const Config& config, int64_t new_tokens, int64_t context);

std::string_view path_name(Path p);
std::string_view precision_name(Precision p);
std::string_view cache_dtype_name(CacheDtype d);  // "auto", "fp8"
// The backends compiled into this build and usable on this machine, e.g. {"cpu", "cpu-reference"}.
std::vector<std::string> available_devices();

}  // namespace mla
