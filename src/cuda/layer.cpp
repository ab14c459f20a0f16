#include "cuda/layer.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/device_memory.hpp"
#include "cuda/common/elementwise.hpp"
#include "cuda/common/gemm.hpp"
#include "mla/parallel.hpp"

namespace mla::cuda {
namespace {

// Round-to-nearest-even bf16 bits (the host copy of the weights; same rounding as the CPU backends).
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = float_to_bf16(x[i]);
  return y;
}

// MLA_CUDA_GRAPHS=0 turns graph replay off. Read at every forward, so one process can time both.
bool graphs_enabled() {
  const char* v = std::getenv("MLA_CUDA_GRAPHS");
  return !(v && std::strcmp(v, "0") == 0);
}

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

template <class V>
DeviceArray upload(const V& host) {
  DeviceArray d(std::max<int64_t>(1, static_cast<int64_t>(host.size() * sizeof(host[0]))));
  if (!host.empty())
    MLA_CUDA_CHECK(cudaMemcpy(d.get(), host.data(), host.size() * sizeof(host[0]), cudaMemcpyHostToDevice));
  return d;
}

class CudaLayer final : public detail::LayerImpl {
 public:
  CudaLayer(const LayerWeights& w, const LayerOptions& o)
      : c_(w.config), k_(DerivedConstants::compute(w.config)),
        dt_(o.precision == Precision::F32 ? DType::F32 : DType::BF16), comm_(o.communicator) {
    check_device("layer");  // the weights are uploaded to the current device
    auto weight = [&](const Matrix& m) {
      return dt_ == DType::F32 ? upload(m.data) : upload(to_bf16(m.data));
    };
    // With query compression, q_a_proj and kv_a_proj_with_mqa both read the hidden states: they are stacked into
    // one [d_q + d_c + d_r, D] weight and run as one GEMM (at decode they are memory-bound GEMVs, and two small
    // ones each pay a split-K reduction and a tail).
    if (w.config.has_q_lora()) {
      Matrix a_proj{w.q_a_proj.rows + w.kv_a_proj.rows, w.q_a_proj.cols, w.q_a_proj.data};
      a_proj.data.insert(a_proj.data.end(), w.kv_a_proj.data.begin(), w.kv_a_proj.data.end());
      a_proj_ = weight(a_proj);
    } else {
      q_proj_ = weight(w.q_proj), kv_a_ = weight(w.kv_a_proj);
    }
    q_b_ = weight(w.q_b_proj), kv_b_ = weight(w.kv_b_proj), o_weight_ = weight(w.o_proj);
    q_a_norm_ = upload(w.q_a_norm), kv_a_norm_ = upload(w.kv_a_norm), inv_freq_ = upload(k_.inv_freq);
    has_q_bias_ = !w.q_bias.empty(), has_kv_bias_ = !w.kv_a_bias.empty(), has_o_bias_ = !w.o_bias.empty();
    q_bias_ = upload(w.q_bias), kv_a_bias_ = upload(w.kv_a_bias), o_bias_ = upload(w.o_bias);
    int device = 0;
    MLA_CUDA_CHECK(cudaGetDevice(&device));
    MLA_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
    flag_host_.reserve(sizeof(unsigned long long));
    // A/B timing only: MLA_CUDA_LAYER_COPY=1 restores the fp32 query round trip and the K/V copies.
    const char* copy = std::getenv("MLA_CUDA_LAYER_COPY");
    copy_glue_ = copy && std::strcmp(copy, "1") == 0;
  }

  ~CudaLayer() override {
    drop_graph();
    for (const auto& [device, stream] : streams_) {
      cudaStreamSynchronize(stream);  // a forward that threw may have left work behind
      cudaStreamDestroy(stream);
    }
  }

  // A decode-only forward whose key (graph_key) equals the previous forward's is captured into a CUDA graph
  // and replayed while the key stays the same: a V3 decode step is ~17 short kernels, and their launch cost
  // is most of the step. The first forward of a key runs eagerly, growing every workspace and planning every
  // GEMM, so that the capture allocates nothing. The staged upload is the graph's first node: a replay copies
  // what stage() has just written into the pinned block. The error check stays outside the graph.
  //
  // Threads: every workspace below, the staging block, the streams and the captured graph belong to the layer,
  // so concurrent forwards (threads sharing one Attention, each with its own cache) are serialised here.
  // Non-finite cache rows and outputs are found on the device (store_latents, check_rows_finite) and refused
  // through the error flag, so the core does not read them back.
  bool checks_finite_rows() const override { return true; }

  void forward(const detail::ForwardArgs& a) override {
    std::lock_guard lock(forward_mutex_);
    const int64_t N = a.total_tokens, D = c_.hidden_size;
    if (a.cache_row.dtype != dt_ && !(a.cache_row.dtype == DType::F8_E4M3 && dt_ == DType::BF16))
      throw InvalidArgument("forward (cuda): cache dtype does not match the layer's precision");
    if (N == 0) return;
    const int device = check_device("forward");
    cudaStream_t stream = stream_for(device);

    // A forward that threw after its upload was issued (a kernel or GEMM refused a shape) did not reach the
    // synchronisation below: wait for that copy before the staging buffer is rewritten.
    if (upload_pending_) {
      MLA_CUDA_CHECK(cudaStreamSynchronize(pending_stream_));
      upload_pending_ = false;
    }
    const int64_t staged_bytes = stage(a);

    enum class Mode { Eager, Capture, Replay } mode = Mode::Eager;
    std::optional<GraphKey> key;
    if (!graphs_enabled()) {
      drop_graph();
    } else if (decode_only_) {
      key = graph_key(a, device);
      if (exec_ && *key == graph_key_) {
        mode = Mode::Replay;
      } else {
        drop_graph();
        if (last_key_ == key) mode = Mode::Capture;
      }
    }
    last_key_.reset();

    pending_stream_ = stream;
    upload_pending_ = true;
    if (mode == Mode::Eager) enqueue(a, staged_bytes, stream);
    if (mode == Mode::Capture) capture(a, staged_bytes, stream, *key);
    if (mode != Mode::Eager) MLA_CUDA_CHECK(cudaGraphLaunch(exec_, stream));
    if (key) {
      // What this forward grew belongs to its key: the next forward of the same shape sees that generation.
      key->shape.back() = generation_;
      last_key_ = std::move(key);
    }

    // The one synchronisation of a forward (the error check needs it). It also retires the upload, so the next
    // forward may rewrite the staging buffer.
    const auto* flag = staged_.get<unsigned long long>();
    MLA_CUDA_CHECK(cudaMemcpyAsync(flag_host_.get(), flag, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
    MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
    upload_pending_ = false;
    const unsigned long long bad = *flag_host_.get<unsigned long long>();
    if (bad != ~0ull && bad >= kBadLatentRow) {
      const bool latent = bad < kBadOutputRow;
      const int64_t row = static_cast<int64_t>(bad & (kBadLatentRow - 1));
      throw InvalidArgument(std::string("forward: the ") + (latent ? "cache row" : "output row") +
                            " of hidden_states row " + std::to_string(row) +
                            " is not finite: the hidden states overflow the layer's projections; nothing was stored");
    }
    if (bad != ~0ull) {
      float value = 0.f;
      MLA_CUDA_CHECK(cudaMemcpy(&value, a.hidden + bad, sizeof(float), cudaMemcpyDeviceToHost));
      const auto r = static_cast<int64_t>(bad) / D, j = static_cast<int64_t>(bad) % D;
      throw InvalidArgument("forward: hidden_states[" + std::to_string(r) + ", " + std::to_string(j) + "] is " +
                            std::to_string(value) + " (not finite); nothing was stored");
    }
  }

 private:
  // One attention launch: a run of consecutive absorbed chunks with the same token count (one decode call), or
  // one expanded chunk.
  struct Launch {
    size_t begin = 0, end = 0;  // chunks [begin, end)
    int64_t max_pages = 0;      // block-table row length (expanded: the chunk's pages)
    int64_t table = 0;          // byte offset of its block tables in the staged block
    DecodePlan plan;            // absorbed launches
  };
  static constexpr int64_t kFlagBytes = sizeof(unsigned long long);

  // Packs everything the kernels read from the host into staging_, for enqueue() to upload with one copy:
  //   [error flag = ~0 | positions i64 [N] | cache slots i64 [N] | per launch, 16-byte aligned: block tables]
  // where an absorbed launch has [count, max_pages] tables (zero past each sequence's pages) then its [count]
  // sequence lengths. The flag's initial value rides on the copy instead of a cudaMemsetAsync. Fills
  // launches_ (with the decode plans), any_absorbed_ and decode_only_; returns the bytes to upload.
  //
  // Rewriting staging_ here is safe although the copy from it is asynchronous (pinned memory): the previous
  // forward's copy has completed, because that forward either reached its closing cudaStreamSynchronize or
  // threw with upload_pending_ set, and forward() then synchronises before calling this.
  int64_t stage(const detail::ForwardArgs& a) {
    const int64_t N = a.total_tokens, P = a.page_size;
    const std::span<const detail::ChunkPlan> chunks = a.chunks;
    auto pages = [&](const detail::ChunkPlan& ch) { return (ch.cached + ch.num_tokens + P - 1) / P; };
    launches_.clear();
    int64_t bytes = kFlagBytes + 2 * N * 8;
    for (size_t i = 0; i < chunks.size();) {
      const detail::ChunkPlan& first = chunks[i];
      if (first.num_tokens == 0) {
        ++i;
        continue;
      }
      Launch l;
      l.begin = i, l.end = i + 1;
      int64_t entries = 0;
      if (first.path == Path::Expanded) {
        l.max_pages = pages(first);
        entries = l.max_pages;
      } else {
        while (l.end < chunks.size() && chunks[l.end].path == Path::Absorbed &&
               chunks[l.end].num_tokens == first.num_tokens)
          ++l.end;
        for (size_t c = l.begin; c < l.end; ++c) l.max_pages = std::max(l.max_pages, pages(chunks[c]));
        const auto count = static_cast<int64_t>(l.end - l.begin);
        entries = count * l.max_pages + count;
      }
      l.table = (bytes + 15) / 16 * 16;
      bytes = l.table + entries * 4;
      if (first.path != Path::Expanded) l.plan = plan_decode(decode_shape(a, l), num_sms_);
      launches_.push_back(l);
      i = l.end;
    }
    grow(staging_, bytes);
    grow(staged_, staging_.bytes());  // the pinned block's geometric growth: a decode loop reallocates neither

    char* host = staging_.get<char>();
    *reinterpret_cast<unsigned long long*>(host) = ~0ull;
    auto* positions = reinterpret_cast<int64_t*>(host + kFlagBytes);
    int64_t* slots = positions + N;
    any_absorbed_ = false;
    decode_only_ = true;
    for (const detail::ChunkPlan& ch : chunks) {
      for (int64_t i = 0; i < ch.num_tokens; ++i) {
        const int64_t t = ch.cached + i;
        positions[ch.first_row + i] = ch.positions[i];
        slots[ch.first_row + i] = int64_t{ch.block_table[t / P]} * P + t % P;
      }
      any_absorbed_ |= ch.path == Path::Absorbed && ch.num_tokens > 0;
      decode_only_ &= ch.path == Path::Absorbed || ch.num_tokens == 0;
    }
    for (const Launch& l : launches_) {
      auto* table = reinterpret_cast<int32_t*>(host + l.table);
      if (chunks[l.begin].path == Path::Expanded) {
        std::copy_n(chunks[l.begin].block_table, l.max_pages, table);
        continue;
      }
      const auto count = static_cast<int64_t>(l.end - l.begin);
      std::fill_n(table, count * l.max_pages, 0);
      for (size_t c = l.begin; c < l.end; ++c) {
        const auto b = static_cast<int64_t>(c - l.begin);
        std::copy_n(chunks[c].block_table, pages(chunks[c]), table + b * l.max_pages);
        table[count * l.max_pages + b] = static_cast<int32_t>(chunks[c].cached + chunks[c].num_tokens);
      }
    }
    return bytes;
  }

  // The shape of an absorbed launch's decode call (what its plan depends on); attend() adds the pointers.
  DecodeParams decode_shape(const detail::ForwardArgs& a, const Launch& l) const {
    DecodeParams d;
    d.batch = static_cast<int64_t>(l.end - l.begin), d.s_q = a.chunks[l.begin].num_tokens, d.h_q = c_.num_heads;
    d.head_dim = c_.latent_dim(), d.head_dim_v = c_.kv_lora_rank;
    d.page_size = a.page_size, d.num_pages = a.num_pages, d.max_pages = l.max_pages, d.dtype = dt_;
    d.fp8_kv_cache = a.cache_row.dtype == DType::F8_E4M3;
    d.softmax_scale = k_.softmax_scale;
    d.causal = true;
    return d;
  }

  // Everything that fixes the launch sequence and every kernel parameter, i.e. all a replay cannot change: the
  // staged upload's contents (positions, slots, block tables, lengths) are the only inputs that may differ
  // between two forwards with equal keys. The allocation generation is last (forward() updates it).
  struct GraphKey {
    std::vector<int64_t> shape;
    std::string kernels;  // the decode plans' kernels: MLA_CUDA_DISABLE_SM90 may change them between calls
    bool operator==(const GraphKey&) const = default;
  };
  GraphKey graph_key(const detail::ForwardArgs& a, int device) const {
    GraphKey k;
    k.shape = {device,
               a.total_tokens,
               a.page_size,
               a.num_pages,
               address(a.hidden),
               address(a.out),
               address(a.cache),
               static_cast<int64_t>(a.chunks.size())};
    for (const detail::ChunkPlan& ch : a.chunks) {
      k.shape.insert(k.shape.end(), {ch.num_tokens, static_cast<int64_t>(ch.path), ch.first_row});
      if (ch.path == Path::Expanded) k.shape.push_back(ch.cached);  // a kernel parameter on that path
    }
    for (const Launch& l : launches_) {
      k.shape.insert(k.shape.end(), {static_cast<int64_t>(l.begin), static_cast<int64_t>(l.end), l.max_pages, l.table});
      k.kernels += l.plan.kernel + ";";
    }
    k.shape.push_back(generation_);
    return k;
  }

  // Every buffer grows through here. A reallocation moves an address that a captured graph may hold, so it
  // bumps the generation (part of the key); during a capture it would be a cudaMalloc inside the capture,
  // which cannot happen (the eager forward of the same key grew everything) and is refused if it ever does.
  template <class Array>
  void grow(Array& array, int64_t bytes) {
    if (bytes <= array.bytes()) return;
    if (capturing_) throw Error("forward (cuda): a workspace would grow inside a CUDA graph capture");
    generation_ += array.reserve(bytes) ? 1 : 0;
  }

  // The layer's own blocking stream on `device` (so it still orders with the legacy default stream, which the
  // cache's and callers' copies use); capture needs a stream other than the legacy one.
  cudaStream_t stream_for(int device) {
    for (const auto& [d, s] : streams_)
      if (d == device) return s;
    cudaStream_t s = nullptr;
    MLA_CUDA_CHECK(cudaStreamCreate(&s));
    streams_.emplace_back(device, s);
    return s;
  }

  // Records enqueue() into exec_. A failure is an error, never a silent eager fallback: every call on the
  // decode path is capturable, so a failure means something changed that must be fixed.
  void capture(const detail::ForwardArgs& a, int64_t staged_bytes, cudaStream_t stream, const GraphKey& key) {
    check_graph_call("cudaStreamBeginCapture", cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
    auto abandon = [&] {
      capturing_ = false;
      cudaGraph_t partial = nullptr;
      cudaStreamEndCapture(stream, &partial);  // leaves the stream usable
      if (partial) cudaGraphDestroy(partial);
      cudaGetLastError();  // the failed call's error must not surface at an unrelated later launch check
    };
    try {
      enqueue(a, staged_bytes, stream);
    } catch (const InvalidArgument&) {
      abandon();
      throw;
    } catch (const Error& e) {  // a CUDA or cuBLASLt call refused under capture: say where it happened
      abandon();
      throw Error(std::string(kCaptureFailed) + e.what());
    } catch (...) {
      abandon();
      throw;
    }
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    check_graph_call("cudaStreamEndCapture", cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);  // the executable graph does not need it
    check_graph_call("cudaGraphInstantiate", e);
    exec_ = exec;
    graph_key_ = key;
  }

  static void check_graph_call(const char* call, cudaError_t e) {
    if (e == cudaSuccess) return;
    cudaGetLastError();
    throw Error(std::string(kCaptureFailed) + call + ": " + cudaGetErrorString(e));
  }
  static constexpr const char* kCaptureFailed = "forward (cuda): capturing the decode step in a CUDA graph failed: ";

  void drop_graph() {
    if (exec_) cudaGraphExecDestroy(exec_);  // a graph still in flight is freed when it completes
    exec_ = nullptr;
  }

  // Everything a forward puts on the stream up to the output commit: the staged upload, then every kernel and
  // GEMM. Also what a capture records, so nothing here may allocate (see grow()) or synchronise.
  void enqueue(const detail::ForwardArgs& a, int64_t staged_bytes, cudaStream_t stream) {
    const int64_t N = a.total_tokens, D = c_.hidden_size, H = c_.num_heads, W = c_.latent_dim();
    const int64_t dn = c_.qk_nope_head_dim, dr = c_.qk_rope_head_dim, dv = c_.v_head_dim, dc = c_.kv_lora_rank;
    const int64_t dqk = dn + dr, es = dtype_size(dt_);
    MLA_CUDA_CHECK(cudaMemcpyAsync(staged_.get(), staging_.get(), static_cast<size_t>(staged_bytes),
                                   cudaMemcpyHostToDevice, stream));
    char* staged = staged_.get<char>();
    auto* flag = reinterpret_cast<unsigned long long*>(staged);
    const auto* positions = reinterpret_cast<const int64_t*>(staged + kFlagBytes);
    const int64_t* slots = positions + N;

    // x = dtype(hidden), with the non-finite check.
    grow(x_, N * D * es);
    convert_checked(a.hidden, x_.get(), dt_, N * D, flag, stream);

    // Queries [N, H, d_qk] (rope dims rotated); the absorbed query's rope tail goes to qa [N, H, W] too.
    // Without a bias to add before rounding, the q GEMM writes q in dtype directly (the same rounding point)
    // and only the rope dims are touched afterwards: no fp32 [N, H·d_qk] round trip.
    const bool q_bias = !c_.has_q_lora() && has_q_bias_;
    const bool q_f32 = q_bias || copy_glue_;
    if (q_f32) grow(q32_, N * H * dqk * 4);
    grow(q_, N * H * dqk * es);
    void* q_out = q_f32 ? q32_.get() : q_.get();
    const DType q_type = q_f32 ? DType::F32 : dt_;
    if (any_absorbed_) grow(qa_, N * H * W * es);
    if (c_.has_q_lora()) {
      const int64_t dq = c_.q_lora_rank;
      grow(a32_, N * (dq + W) * 4);
      grow(qat_, N * dq * es);
      linear(x_.get(), N, D, a_proj_.get(), dq + W, a32_.get(), DType::F32, stream);  // [N, d_q | d_c + d_r]
      rms_norm_rows(a32_.get<float>(), dq + W, has_q_bias_ ? q_bias_.get<float>() : nullptr, q_a_norm_.get<float>(),
                    kLatentNormEps, N, dq, qat_.get(), dt_, stream);
      linear(qat_.get(), N, dq, q_b_.get(), H * dqk, q_out, q_type, stream);
    } else {
      linear(x_.get(), N, D, q_proj_.get(), H * dqk, q_out, q_type, stream);
    }
    QueryFinish qf;
    qf.q_f32 = q_f32 ? q32_.get<float>() : nullptr;
    qf.bias = q_bias ? q_bias_.get<float>() : nullptr;
    qf.positions = positions;
    qf.tokens = N, qf.heads = H, qf.d_nope = dn, qf.d_rope = dr;
    qf.q = q_.get();
    qf.qa = any_absorbed_ ? qa_.get() : nullptr;
    qf.row_width = W, qf.d_c = dc;
    qf.dtype = dt_;
    qf.rope = {inv_freq_.get<float>(), k_.rope_magnitude};
    finish_queries(qf, stream);

    // Latent rows → cache (skipped entirely on the device when the flag is set).
    LatentStore ls;
    if (c_.has_q_lora()) {
      ls.kv = a32_.get<float>() + c_.q_lora_rank, ls.ld_kv = c_.q_lora_rank + W;  // the stacked GEMM's tail
    } else {
      grow(a32_, N * W * 4);
      linear(x_.get(), N, D, kv_a_.get(), W, a32_.get(), DType::F32, stream);
      ls.kv = a32_.get<float>(), ls.ld_kv = W;
    }
    ls.bias = has_kv_bias_ ? kv_a_bias_.get<float>() : nullptr;
    ls.gamma = kv_a_norm_.get<float>();
    ls.positions = positions, ls.slots = slots, ls.error_flag = flag;
    ls.tokens = N, ls.d_c = dc, ls.d_rope = dr;
    ls.cache = a.cache, ls.dtype = a.cache_row.dtype, ls.fp8 = Fp8Row::of(a.cache_row), ls.eps = kLatentNormEps;
    ls.rope = qf.rope;
    store_latents(ls, stream);

    grow(o_, N * H * dv * es);
    attend(a, stream);

    // y = o · o_projᵀ into a workspace, then out = y (+ bias) only when the flag is clear: a rejected batch
    // leaves the caller's out as it was. The bias rides on that pass, so it costs no pass of its own.
    grow(y_, N * D * 4);
    linear(o_.get(), N, H * dv, o_weight_.get(), D, y_.get(), DType::F32, stream);
    // Tensor parallelism: y holds this rank's heads' share of o_proj; the sum over ranks is the layer's y. In
    // fp32 (N·D·4 bytes), the rounding point of the single-GPU layer; in place, on this stream (so inside the
    // decode step's CUDA graph). The bias below is then added once.
    if (comm_) comm_->all_reduce_sum(y_.get(), y_.get(), N * D, DType::F32, stream);
    check_rows_finite(y_.get<float>(), has_o_bias_ ? o_bias_.get<float>() : nullptr, N, D, flag, stream);
    commit_rows(y_.get<float>(), has_o_bias_ ? o_bias_.get<float>() : nullptr, flag, N, D, a.out, stream);
  }

  // The current device; with a communicator, it must be the rank's (its weights, caches and peers live there).
  int check_device(const char* op) const {
    int device = 0;
    MLA_CUDA_CHECK(cudaGetDevice(&device));
    if (comm_ && device != comm_->device())
      throw InvalidArgument(std::string(op) + " (cuda): tensor-parallel rank " + std::to_string(comm_->rank()) +
                            " runs on device " + std::to_string(comm_->device()) + ", but the current device is " +
                            std::to_string(device) + " (cudaSetDevice first)");
    return device;
  }

  // y [rows, out] = x [rows, in] · Wᵀ with W [out, in] in the layer's dtype.
  void linear(const void* x, int64_t rows, int64_t in, const void* w, int64_t out, void* y, DType y_type,
              cudaStream_t stream) {
    GemmArgs g;
    g.m = rows, g.n = out, g.k = in;
    g.a = x, g.lda = in;
    g.b = w, g.ldb = in, g.b_transposed = true;
    g.c = y, g.ldc = out;
    g.ab_type = dt_, g.c_type = y_type;
    gemm_.run(g, stream);
  }

  void attend(const detail::ForwardArgs& a, cudaStream_t stream) {
    const int64_t H = c_.num_heads, W = c_.latent_dim(), dn = c_.qk_nope_head_dim, dr = c_.qk_rope_head_dim;
    const int64_t dv = c_.v_head_dim, dc = c_.kv_lora_rank, dqk = dn + dr, dkv = dn + dv, es = dtype_size(dt_);
    const char* kv_b = kv_b_.get<char>();
    for (const Launch& l : launches_) {
      const detail::ChunkPlan& first = a.chunks[l.begin];
      const auto* tables = reinterpret_cast<const int32_t*>(staged_.get<char>() + l.table);
      if (first.path == Path::Expanded) {
        expanded(a, first, tables, stream);
        continue;
      }
      // A run of consecutive absorbed chunks with the same token count: one decode launch.
      const int64_t count = static_cast<int64_t>(l.end - l.begin), n = first.num_tokens, rows = count * n;
      const int64_t row0 = first.first_row, max_pages = l.max_pages;

      // q̂_h [rows, d_c] = qn_h [rows, d_n] · W_UK^h (W_UK^h is [d_n, d_c] row-major): into qa[:, h, :d_c].
      GemmArgs g;
      g.m = rows, g.n = dc, g.k = dn, g.batch = H;
      g.a = q_.get<char>() + row0 * H * dqk * es, g.lda = H * dqk, g.stride_a = dqk;
      g.b = kv_b, g.ldb = dc, g.stride_b = dkv * dc, g.b_transposed = false;
      g.c = qa_.get<char>() + row0 * H * W * es, g.ldc = H * W, g.stride_c = W;
      g.ab_type = dt_, g.c_type = dt_;
      gemm_.run(g, stream);

      grow(ohat_, a.total_tokens * H * dc * es);
      DecodeParams d = decode_shape(a, l);
      d.q = g.c;
      d.kv_cache = a.cache;
      d.block_table = tables;
      d.cache_seqlens = tables + count * max_pages;
      d.out = ohat_.get<char>() + row0 * H * dc * es;
      // The workspace grows here rather than inside run_decode, so that the generation sees it.
      grow(decode_ws_, l.plan.workspace_bytes);
      run_decode(d, l.plan, l.plan.workspace_bytes > 0 ? decode_ws_.get() : nullptr, stream);

      // o_h [rows, d_v] = ô_h [rows, d_c] · W_UV^hᵀ (W_UV^h is [d_v, d_c] row-major).
      GemmArgs u;
      u.m = rows, u.n = dv, u.k = dc, u.batch = H;
      u.a = d.out, u.lda = H * dc, u.stride_a = dc;
      u.b = kv_b + dn * dc * es, u.ldb = dc, u.stride_b = dkv * dc, u.b_transposed = true;
      u.c = o_.get<char>() + row0 * H * dv * es, u.ldc = H * dv, u.stride_c = dv;
      u.ab_type = dt_, u.c_type = dt_;
      gemm_.run(u, stream);
    }
  }

  // Expanded form for one chunk: K, V of every head expanded from the sequence's latent rows, then causal
  // attention of the chunk's queries over all of them.
  void expanded(const detail::ForwardArgs& a, const detail::ChunkPlan& ch, const int32_t* block_table,
                cudaStream_t stream) {
    const int64_t H = c_.num_heads, W = c_.latent_dim(), dn = c_.qk_nope_head_dim, dr = c_.qk_rope_head_dim;
    const int64_t dv = c_.v_head_dim, dc = c_.kv_lora_rank, dqk = dn + dr, dkv = dn + dv, es = dtype_size(dt_);
    const int64_t n = ch.num_tokens, L = ch.cached + n;
    grow(lat_, L * W * es);
    gather_rows(a.cache, block_table, a.page_size, L, W, lat_.get(), dt_, stream, a.cache_row.dtype,
                Fp8Row::of(a.cache_row));
    // [L, H·(d_n + d_v)] = lat[:, :d_c] · kv_bᵀ, rounded to the element type (the CPU's rounding point).
    grow(kvx_, L * H * dkv * es);
    GemmArgs g;
    g.m = L, g.n = H * dkv, g.k = dc;
    g.a = lat_.get(), g.lda = W;
    g.b = kv_b_.get(), g.ldb = dc, g.b_transposed = true;
    g.c = kvx_.get(), g.ldc = H * dkv;
    g.ab_type = dt_, g.c_type = dt_;
    gemm_.run(g, stream);

    const int32_t cu_q[2] = {0, static_cast<int32_t>(n)}, cu_k[2] = {0, static_cast<int32_t>(L)};
    PrefillParams p;
    p.batch = 1, p.num_heads = H, p.head_dim_qk = dqk, p.head_dim_v = dv;
    p.total_q = n, p.total_k = L, p.dtype = dt_;
    p.cu_seqlens_q = cu_q, p.cu_seqlens_k = cu_k;
    p.q = q_.get<char>() + ch.first_row * H * dqk * es;
    p.softmax_scale = k_.softmax_scale;
    p.causal = true;
    p.out = o_.get<char>() + ch.first_row * H * dv * es;
    if (!copy_glue_ && prefill_is_fast(p) && dn == 128 && dc % 8 == 0 && W % 8 == 0) {  // d_nope: kStridedSplit
      // The fast kernels read K_nope and V in place from kvx [L, H, d_n + d_v] and the shared rope key from
      // the latent rows lat [L, W] at column d_c: no [L, H, 192] / [L, H, 128] copies.
      PrefillLayout lay;
      lay.k = kvx_.get(), lay.k_row = H * dkv, lay.k_head = dkv, lay.k_split = static_cast<int>(dn);
      lay.k_tail = lat_.get<char>() + dc * es, lay.k_tail_row = W, lay.k_tail_head = 0;
      lay.v = kvx_.get<char>() + dn * es, lay.v_row = H * dkv, lay.v_head = dkv;
      run_prefill(p, stream, &lay);
      return;
    }
    grow(kx_, L * H * dqk * es);
    grow(vx_, L * H * dv * es);
    split_expanded(kvx_.get(), lat_.get(), W, dc, L, H, dn, dr, dv, kx_.get(), vx_.get(), dt_, stream);
    p.k = kx_.get(), p.v = vx_.get();
    run_prefill(p, stream);
  }

  std::mutex forward_mutex_;  // see forward(): one forward at a time owns the members below
  Config c_;
  DerivedConstants k_;
  DType dt_;
  const Communicator* comm_;  // tensor parallelism: the o_proj all-reduce; null for a single-GPU layer
  int num_sms_ = 0;
  Gemm gemm_;
  DeviceArray q_proj_, a_proj_, q_b_, kv_a_, kv_b_, o_weight_;  // a_proj_: q_a and kv_a stacked
  DeviceArray q_a_norm_, kv_a_norm_, inv_freq_, q_bias_, kv_a_bias_, o_bias_;
  bool has_q_bias_ = false, has_kv_bias_ = false, has_o_bias_ = false;
  bool copy_glue_ = false;
  // Workspaces, grown on demand.
  DeviceArray x_, a32_, qat_, q32_, q_, qa_, o_, ohat_, lat_, kvx_, kx_, vx_, y_, decode_ws_;
  // The per-forward upload (see stage()): host side, device side, and the flag's way back.
  PinnedArray staging_, flag_host_;
  DeviceArray staged_;
  std::vector<Launch> launches_;
  bool any_absorbed_ = false, decode_only_ = false;  // of the forward being run (stage())
  bool upload_pending_ = false;                      // a copy from staging_ may still be in flight...
  cudaStream_t pending_stream_ = nullptr;            // ...on this stream
  // CUDA graph replay (see forward()).
  std::vector<std::pair<int, cudaStream_t>> streams_;  // (device, stream), created on first use
  int64_t generation_ = 0;                             // reallocations of any buffer above
  bool capturing_ = false;
  std::optional<GraphKey> last_key_;  // the previous forward's, when it could be captured
  GraphKey graph_key_;                // what exec_ was captured for
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace

std::unique_ptr<detail::LayerImpl> make_cuda_layer(const LayerWeights& weights, const LayerOptions& options) {
  return std::make_unique<CudaLayer>(weights, options);
}

}  // namespace mla::cuda
