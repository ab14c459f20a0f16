// The one small interface every backend implements. Callers of the public API never see it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "mla/attention.hpp"
#include "mla/cache.hpp"
#include "mla/dtype.hpp"
#include "mla/ops.hpp"
#include "mla/weights.hpp"

namespace mla::detail {

// A buffer in a backend's memory (the page pool, staging for host data).
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual void copy_to_host(int64_t offset_bytes, int64_t bytes, void* dst) const = 0;
  virtual void copy_from_host(int64_t offset_bytes, int64_t bytes, const void* src) = 0;
};

// One chunk of new tokens, planned by Attention::forward before the backend runs.
struct ChunkPlan {
  int64_t first_row = 0;            // index of its first token in hidden/out
  int64_t num_tokens = 0;
  int64_t cached = 0;               // tokens already in the cache; the new rows go to [cached, cached+num_tokens)
  const int64_t* positions = nullptr;   // [num_tokens], host
  const int32_t* block_table = nullptr; // [ceil((cached+num_tokens)/page_size)] page indices, host
  Path path = Path::Expanded;       // resolved: Expanded or Absorbed
};

struct ForwardArgs {
  std::span<const ChunkPlan> chunks;
  int64_t total_tokens = 0;
  const float* hidden = nullptr;    // [total_tokens, D]
  float* out = nullptr;             // [total_tokens, D]
  void* cache = nullptr;            // page pool storage
  int64_t page_size = 0;
  int64_t num_pages = 0;            // pages in the pool
  RowLayout cache_row;              // dtype and byte layout of the pool's rows
};

class LayerImpl {
 public:
  virtual ~LayerImpl() = default;
  // Writes the chunks' latent rows into the cache, then their outputs. Must throw before touching the cache
  // when the inputs are unusable (non-finite hidden states). Called concurrently from several threads (each
  // with its own cache and buffers) when callers share one Attention: an implementation either keeps no
  // mutable state across calls (the CPU layers) or serialises its calls (the CUDA layer's workspaces).
  virtual void forward(const ForwardArgs& args) = 0;
  // True when forward itself refuses non-finite cache rows and outputs (throwing before it commits either), so
  // that Attention::forward need not read them back: the CUDA layer checks them on the device.
  virtual bool checks_finite_rows() const { return false; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  // True when the backend computes on host memory (hidden/out pointers are host pointers).
  virtual bool host_memory() const = 0;
  virtual std::unique_ptr<Buffer> allocate(int64_t bytes) const = 0;
  // Copies `bytes` at src in this backend's memory (a forward's output) to host memory: forward() checks the
  // output is finite before it commits the cache rows.
  virtual void copy_to_host(const void* src, int64_t bytes, void* dst) const = 0;
  virtual std::unique_ptr<LayerImpl> make_layer(const LayerWeights& weights, const LayerOptions& options) const = 0;
  virtual void decode_attention(const DecodeParams& params) const = 0;
  // Plan/run decode: the schedule's shape fields are filled in by the caller (src/core/ops.cpp).
  virtual DecodeSchedule plan_decode_attention(const DecodeParams& params) const = 0;
  virtual void decode_attention(const DecodeParams& params, const DecodeSchedule& schedule, void* workspace,
                                void* stream, bool splits_ready) const = 0;
  virtual void split_decode_attention(const DecodeParams& params, const DecodeSchedule& schedule, void* workspace,
                                      void* stream) const = 0;
  virtual void prefill_attention(const PrefillParams& params, void* stream) const = 0;
  virtual void merge_attention(const MergeParams& params, void* stream) const = 0;
  // Shape fields only (pointers may be unset).
  virtual int64_t prefill_attention_backward_workspace_bytes(const PrefillBackwardParams& params) const = 0;
  virtual void prefill_attention_backward(const PrefillBackwardParams& params, void* stream) const = 0;
};

// Throws mla::InvalidArgument naming the available backends for an unknown or unavailable name.
const Backend& find_backend(std::string_view name);
std::vector<const Backend*> all_backends();

// Host memory for the CPU backends (64-byte aligned, zero-initialised).
std::unique_ptr<Buffer> allocate_host(int64_t bytes);

}  // namespace mla::detail
