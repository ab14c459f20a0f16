// The fast CPU backend ("cpu"): GEMMs through the library in gemm.cpp, flash-style tiling with an online
// softmax, both cores through OpenMP. Weights and cache are float (f32 layer) or bf16 bits (bf16 layer); every
// product accumulates in fp32. Rounding points match reference.cpp so that the two agree to accumulation order.
// On a CPU without a native bf16 dot product (kernels.hpp, Isa) the bf16 layer keeps bf16 weights and cache but
// holds its activations as floats rounded to bf16 values: weights are widened inside the GEMMs (in registers for
// decode, once per call for prefill), cache rows as they are gathered, and the products are exactly those of the
// bf16 GEMMs.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "core/backend.hpp"
#include "cpu/common.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace mla::cpu {
namespace {

constexpr int64_t kQueryTile = 64;    // expanded path: queries per task
constexpr int64_t kKeyBlock = 256;    // keys streamed per step (absorbed path), the expanded path's smallest block
// The expanded path expands as many keys at once as fit this many bytes of K and V (whole kKeyBlocks, at least
// one): V2-Lite's whole 1024-token prompt in one block, so each tile does one GEMM of S and one of P·V over all the
// keys it sees instead of one per 256 keys, and the softmax needs no rescaling; V3 (128 heads) gets 256 keys.
constexpr int64_t kExpandedBytes = int64_t{64} << 20;

// Scratch that a GEMM or a conversion overwrites whole: a vector without the zero fill.
template <class T>
struct NoFill : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoFill<U>;
  };
  template <class U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class V>
  void construct(U* p, V&& v) {
    ::new (static_cast<void*>(p)) U(std::forward<V>(v));
  }
};
template <class T>
using Buf = std::vector<T, NoFill<T>>;

// Runs f(i0, i1) over [0, n) in chunks, over the threads unless already inside a parallel region or n is small.
// (Not an `if` clause: even a serialised parallel construct costs a team set-up, which adds up in inner loops.)
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, F&& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks <= 1 || omp_in_parallel()) {
    if (n > 0) f(0, n);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
}

// y = x as a GEMM operand of a layer that stores TW: bf16 bits, floats rounded to bf16 values (bf16 layer without
// a native bf16 dot product), or plain floats. y may be x when TA is float.
template <class TW, class TA>
void to_operand(const float* x, TA* y, int64_t n) {
  parallel_chunks(n, int64_t{1} << 16, [&](int64_t i0, int64_t i1) {
    if constexpr (std::is_same_v<TA, uint16_t>) to_bf16(x + i0, y + i0, i1 - i0);
    else if constexpr (std::is_same_v<TW, uint16_t>) round_bf16_values(x + i0, y + i0, i1 - i0);
    else if (x != y) std::copy(x + i0, x + i1, y + i0);
  });
}

template <class TW, class TA>
Buf<TA> operand(const float* x, int64_t n) {
  Buf<TA> y(static_cast<size_t>(n));
  to_operand<TW, TA>(x, y.data(), n);
  return y;
}

// TW: weights and cache, float (f32 layer) or bf16 bits (bf16 layer). TA: activations as GEMM operands, bf16 bits
// where the CPU multiplies bf16 natively, float otherwise.
template <class TW, class TA>
class FastLayer final : public detail::LayerImpl {
  static constexpr bool kBf16 = std::is_same_v<TW, uint16_t>;
  static constexpr bool kWidening = kBf16 && std::is_same_v<TA, float>;

 public:
  FastLayer(const LayerWeights& w, const LayerOptions&) : c_(w.config), k_(DerivedConstants::compute(w.config)) {
    auto conv = [](const Matrix& m) { return operand<TW, TW>(m.data.data(), static_cast<int64_t>(m.data.size())); };
    q_proj_ = conv(w.q_proj), q_a_ = conv(w.q_a_proj), q_b_ = conv(w.q_b_proj);
    kv_a_ = conv(w.kv_a_proj), kv_b_ = conv(w.kv_b_proj), o_ = conv(w.o_proj);
    q_a_norm_ = w.q_a_norm, kv_a_norm_ = w.kv_a_norm;
    q_bias_ = w.q_bias, kv_a_bias_ = w.kv_a_bias, o_bias_ = w.o_bias;
  }

  void forward(const detail::ForwardArgs& a) override {
    if (!kBf16 && a.cache_row.dtype == DType::F8_E4M3)  // attention.cpp refuses this combination first
      throw InvalidArgument("forward (cpu): an fp8 cache needs a bf16 layer");
    const int64_t N = a.total_tokens, D = c_.hidden_size, H = c_.num_heads, dqk = c_.qk_head_dim();
    check_finite(a.hidden, N, D);
    if (N == 0) return;
    const Buf<TA> x = operand<TW, TA>(a.hidden, N * D);

    // Queries [N, H, d_qk] and latent rows [N, W] of the new tokens.
    Buf<TA> q(static_cast<size_t>(N * H * dqk));
    project_queries(x.data(), N, a, q.data());
    store_latents(x.data(), N, a);

    Buf<TA> o(static_cast<size_t>(N * H * c_.v_head_dim));
    for (const detail::ChunkPlan& chunk : a.chunks) {
      if (chunk.num_tokens == 0) continue;
      if (chunk.path == Path::Absorbed) attend_absorbed(a, chunk, q.data(), o.data());
      else attend_expanded(a, chunk, q.data(), o.data());
    }
    gemm_nt(N, D, H * c_.v_head_dim, o.data(), H * c_.v_head_dim, o_.data(), H * c_.v_head_dim, a.out, D);
    add_bias(a.out, N, o_bias_);
  }

 private:
  static void add_bias(float* y, int64_t rows, const std::vector<float>& bias) {
    if (bias.empty()) return;
    const auto n = static_cast<int64_t>(bias.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) y[r * n + j] += bias[j];
  }

  void project_queries(const TA* x, int64_t N, const detail::ForwardArgs& a, TA* q) const {
    const int64_t D = c_.hidden_size, H = c_.num_heads, dqk = c_.qk_head_dim(), dn = c_.qk_nope_head_dim;
    Buf<float> qf(static_cast<size_t>(N * H * dqk));
    if (c_.has_q_lora()) {
      const int64_t dq = c_.q_lora_rank;
      Buf<float> qa(static_cast<size_t>(N * dq));
      gemm_nt(N, dq, D, x, D, q_a_.data(), D, qa.data(), dq);
      add_bias(qa.data(), N, q_bias_);
      parallel_chunks(N, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) rms_norm(&qa[r * dq], dq, q_a_norm_.data(), kLatentNormEps, &qa[r * dq]);
      });
      const Buf<TA> qa_t = operand<TW, TA>(qa.data(), N * dq);
      gemm_nt(N, H * dqk, dq, qa_t.data(), dq, q_b_.data(), dq, qf.data(), H * dqk);
    } else {
      gemm_nt(N, H * dqk, D, x, D, q_proj_.data(), D, qf.data(), H * dqk);
      add_bias(qf.data(), N, q_bias_);
    }
    if constexpr (kBf16) round_bf16_values(qf.data(), qf.data(), N * H * dqk);  // q enters rope as bf16
    // One angle table per token serves all heads.
    for (const detail::ChunkPlan& chunk : a.chunks)
      parallel_chunks(chunk.num_tokens, 64, [&](int64_t i0, int64_t i1) {
        std::vector<float> cos_a(k_.inv_freq.size()), sin_a(k_.inv_freq.size());
        for (int64_t i = i0; i < i1; ++i) {
          rope_angles(chunk.positions[i], k_, cos_a.data(), sin_a.data());
          for (int64_t h = 0; h < H; ++h)
            rope_apply(&qf[((chunk.first_row + i) * H + h) * dqk + dn], c_.qk_rope_head_dim, cos_a.data(),
                       sin_a.data());
        }
      });
    to_operand<TW, TA>(qf.data(), q, N * H * dqk);
  }

  void store_latents(const TA* x, int64_t N, const detail::ForwardArgs& a) const {
    const int64_t D = c_.hidden_size, W = c_.latent_dim(), dc = c_.kv_lora_rank;
    Buf<float> kv(static_cast<size_t>(N * W));
    gemm_nt(N, W, D, x, D, kv_a_.data(), D, kv.data(), W);
    add_bias(kv.data(), N, kv_a_bias_);
    for (const detail::ChunkPlan& chunk : a.chunks)
      parallel_chunks(chunk.num_tokens, 64, [&](int64_t i0, int64_t i1) {
        std::vector<float> cos_a(k_.inv_freq.size()), sin_a(k_.inv_freq.size());
        for (int64_t i = i0; i < i1; ++i) {
          float* row = &kv[(chunk.first_row + i) * W];
          rms_norm(row, dc, kv_a_norm_.data(), kLatentNormEps, row);
          rope_angles(chunk.positions[i], k_, cos_a.data(), sin_a.data());
          rope_apply(row + dc, c_.qk_rope_head_dim, cos_a.data(), sin_a.data());
          const int64_t slot = row_index(chunk.block_table, a.page_size, chunk.cached + i);
          if (fp8(a))
            store_row(a.cache_row, row, row_at(a.cache, a.cache_row, slot));  // from the f32 row
          else
            to_operand<TW, TW>(row, static_cast<TW*>(a.cache) + slot * W, W);
        }
      });
  }

  // True when the cache rows are fp8_ds_mla rows (bf16 layer only): every read dequantises them to
  // bf16(fp8 · scale), the values load_row gives, so the attention computes as over a bf16 cache holding them.
  static bool fp8(const detail::ForwardArgs& a) { return kBf16 && a.cache_row.dtype == DType::F8_E4M3; }

  // Copies cache rows [t0, t1) of a sequence into dst [t1-t0, W], widened to f32 in the widening layer
  // (dequantised from an fp8 cache, to bf16 bits or to floats).
  void gather(const detail::ForwardArgs& a, const detail::ChunkPlan& chunk, int64_t t0, int64_t t1, TA* dst) const {
    const int64_t W = c_.latent_dim();
    if constexpr (kBf16)
      if (fp8(a)) {
        for (int64_t t = t0; t < t1; ++t) {
          const void* row = row_at(a.cache, a.cache_row, row_index(chunk.block_table, a.page_size, t));
          if constexpr (std::is_same_v<TA, uint16_t>)
            fp8_row_to_bf16(a.cache_row, row, dst + (t - t0) * W);
          else
            fp8_row_to_float(a.cache_row, row, dst + (t - t0) * W);
        }
        return;
      }
    const TW* cache = static_cast<const TW*>(a.cache);
    for (int64_t t = t0; t < t1;) {
      const int64_t slot = row_index(chunk.block_table, a.page_size, t);
      const int64_t run = std::min(t1 - t, a.page_size - t % a.page_size);  // contiguous within a page
      if constexpr (kWidening) from_bf16(cache + slot * W, dst + (t - t0) * W, run * W);
      else std::copy_n(cache + slot * W, run * W, dst + (t - t0) * W);
      t += run;
    }
  }

  // An f32 copy of bf16 weights, converted over the threads.
  static Buf<float> widened(const Buf<uint16_t>& w) {
    constexpr int64_t kChunk = 1 << 14;
    const auto n = static_cast<int64_t>(w.size());
    Buf<float> f(w.size());
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += kChunk) from_bf16(&w[i], &f[i], std::min(kChunk, n - i));
    return f;
  }

  // Where online_softmax_step writes P: bf16 bits, floats rounded to bf16 values, or floats.
  static float softmax_into(const float* s, int64_t n, int64_t visible, float scale, float& m, float& l, TA* p) {
    if constexpr (std::is_same_v<TA, uint16_t>) return online_softmax_step(s, n, visible, scale, m, l, nullptr, p);
    else return online_softmax_step(s, n, visible, scale, m, l, p, nullptr, kBf16);
  }

  // Expanded form: per key block, K_nope and V for all heads = latent · kv_bᵀ (one GEMM), laid out per head as
  // K = [k_nope | k_rope] and V; then every (head, query tile) task updates its online softmax with S = q·Kᵀ (one
  // GEMM of width d_qk) over the keys the tile can see and O += P·V.
  void attend_expanded(const detail::ForwardArgs& a, const detail::ChunkPlan& chunk, const TA* q, TA* o) const {
    const int64_t H = c_.num_heads, dn = c_.qk_nope_head_dim, dr = c_.qk_rope_head_dim, dv = c_.v_head_dim;
    const int64_t dc = c_.kv_lora_rank, W = c_.latent_dim(), dqk = dn + dr, dkv = dn + dv;
    const int64_t n = chunk.num_tokens, L = chunk.cached + n;
    const int64_t tiles = (n + kQueryTile - 1) / kQueryTile;
    const TA* qc = q + chunk.first_row * H * dqk;
    const auto per_key = static_cast<int64_t>(H * (dkv * sizeof(float) + (dqk + dv) * sizeof(TA)));
    const int64_t block =
        std::min((L + kKeyBlock - 1) / kKeyBlock, std::max<int64_t>(1, kExpandedBytes / per_key / kKeyBlock)) *
        kKeyBlock;

    std::vector<float> acc(static_cast<size_t>(n * H * dv), 0.f);       // [n, H, dv]
    std::vector<float> m(static_cast<size_t>(n * H), -std::numeric_limits<float>::infinity()), l(m.size(), 0.f);
    Buf<TA> lat(static_cast<size_t>(block * W));
    Buf<float> kvf(static_cast<size_t>(block * H * dkv));  // [kb, H, dn + dv]
    Buf<TA> kq(static_cast<size_t>(block * H * dqk));      // [kb, H, dqk]
    Buf<TA> vv(static_cast<size_t>(block * H * dv));       // [kb, H, dv]
    // The widening layer expands several key blocks with an f32 copy of kv_b made once per call.
    Buf<float> kv_b_f32;
    if constexpr (kWidening)
      if (L > block) kv_b_f32 = widened(kv_b_);

    for (int64_t k0 = 0; k0 < L; k0 += block) {
      const int64_t kb = std::min(block, L - k0);
      gather(a, chunk, k0, k0 + kb, lat.data());
      if constexpr (kWidening) {
        if (!kv_b_f32.empty()) gemm_nt(kb, H * dkv, dc, lat.data(), W, kv_b_f32.data(), dc, kvf.data(), H * dkv);
        else gemm_nt(kb, H * dkv, dc, lat.data(), W, kv_b_.data(), dc, kvf.data(), H * dkv);
      } else {
        gemm_nt(kb, H * dkv, dc, lat.data(), W, kv_b_.data(), dc, kvf.data(), H * dkv);
      }
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < kb; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const float* e = &kvf[(t * H + h) * dkv];
          to_operand<TW, TA>(e, &kq[(t * H + h) * dqk], dn);
          std::copy_n(&lat[t * W + dc], dr, &kq[(t * H + h) * dqk + dn]);
          to_operand<TW, TA>(e + dn, &vv[(t * H + h) * dv], dv);
        }

#pragma omp parallel
      {
        Buf<float> s(static_cast<size_t>(kQueryTile * kb));
        Buf<TA> p(s.size());
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t tile = 0; tile < tiles; ++tile) {
            const int64_t i0 = tile * kQueryTile, qt = std::min(kQueryTile, n - i0);
            const int64_t seen = chunk.cached + i0 + qt - k0;  // keys of this block the tile's last query sees
            if (seen <= 0) continue;                          // the whole block is in this tile's future
            const int64_t kn = std::min(kb, (seen + 31) / 32 * 32);  // whole 32s: few distinct GEMM shapes
            const TA* qh = qc + (i0 * H + h) * dqk;
            gemm_nt(qt, kn, dqk, qh, H * dqk, &kq[h * dqk], H * dqk, s.data(), kn);
            for (int64_t r = 0; r < qt; ++r) {
              const int64_t i = i0 + r, visible = chunk.cached + i + 1 - k0;
              const float alpha = softmax_into(s.data() + r * kn, kn, visible, k_.softmax_scale, m[i * H + h],
                                               l[i * H + h], p.data() + r * kn);
              scale_inplace(&acc[(i * H + h) * dv], dv, alpha);
            }
            gemm_nn(qt, dv, kn, p.data(), kn, &vv[h * dv], H * dv, &acc[(i0 * H + h) * dv], H * dv, 1.f);
          }
      }
    }
    finish(acc.data(), l.data(), n * H, dv, o + chunk.first_row * H * dv);
  }

  // out[r] = operand(acc[r] / l[r]) for r in [0, rows), each row `width` wide.
  static void finish(const float* acc, const float* l, int64_t rows, int64_t width, TA* out) {
    parallel_chunks(rows, 256, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(static_cast<size_t>(width));
      for (int64_t r = r0; r < r1; ++r) {
        const float inv = 1.0f / l[r];
        for (int64_t j = 0; j < width; ++j) row[j] = acc[r * width + j] * inv;
        to_operand<TW, TA>(row.data(), out + r * width, width);
      }
    });
  }

  // The key blocks this thread takes from `next` (of `blocks`, kKeyBlock keys each) of the absorbed MQA of the
  // M rows qa [M, W] (row i·H + h), into its running state acc [M, dc], m [M], l [M]: logits and P·V as library
  // GEMMs (bf16 operands). Blocks are handed out as threads get free, not in fixed halves: the two cores of a
  // shared machine do not run at the same speed.
  void mqa_gemm(const detail::ForwardArgs& a, const detail::ChunkPlan& chunk, const TA* qa, int64_t M,
                std::atomic<int64_t>& next, int64_t blocks, float* acc, float* m, float* l) const {
    const int64_t H = c_.num_heads, dc = c_.kv_lora_rank, W = c_.latent_dim(), L = chunk.cached + chunk.num_tokens;
    Buf<TA> lat(static_cast<size_t>(kKeyBlock * W));
    Buf<float> s(static_cast<size_t>(M * kKeyBlock));
    Buf<TA> p(s.size());
    for (int64_t b; (b = next++) < blocks;) {
      const int64_t k0 = b * kKeyBlock, kb = std::min(kKeyBlock, L - k0);
      gather(a, chunk, k0, k0 + kb, lat.data());
      gemm_nt(M, kb, W, qa, W, lat.data(), W, s.data(), kb);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t visible = chunk.cached + r / H + 1 - k0;
        const float alpha =
            softmax_into(s.data() + r * kb, kb, visible, k_.softmax_scale, m[r], l[r], p.data() + r * kb);
        scale_inplace(acc + r * dc, dc, alpha);
      }
      gemm_nn(M, dc, kb, p.data(), kb, lat.data(), W, acc, dc, 1.f);
    }
  }

  // The same with f32 operands through mqa_block: the rows in groups of kMqaLanes lanes, queries and output
  // transposed per group, cache rows widened into 16-key panels as they are gathered.
  void mqa_lanes(const detail::ForwardArgs& a, const detail::ChunkPlan& chunk, const float* qa, int64_t M,
                 std::atomic<int64_t>& next, int64_t blocks, float* acc, float* m, float* l) const {
    constexpr int kL = kMqaLanes;
    const int64_t H = c_.num_heads, dc = c_.kv_lora_rank, W = c_.latent_dim(), L = chunk.cached + chunk.num_tokens;
    const int64_t groups = (M + kL - 1) / kL;
    std::vector<float> qT(static_cast<size_t>(groups * W * kL), 0.f);       // [groups, W, 16]
    std::vector<float> accT(static_cast<size_t>(groups * dc * kL), 0.f);    // [groups, dc, 16]
    std::vector<float> mg(static_cast<size_t>(groups * kL), -std::numeric_limits<float>::infinity());
    std::vector<float> lg(mg.size(), 0.f), s(kKeyBlock * kL);
    Buf<float> kvp(static_cast<size_t>(kKeyBlock * W));  // [kb / 16 panels, W, 16]
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < W; ++k) qT[((r / kL) * W + k) * kL + r % kL] = qa[r * W + k];
    int32_t visible[kL];
    const TW* rows[kL];
    const bool dequantise = fp8(a);
    const RowLayout& layout = a.cache_row;
    const auto row_bytes = static_cast<size_t>(dequantise ? layout.bytes() : W * static_cast<int64_t>(sizeof(TW)));
    const auto* cache = static_cast<const char*>(a.cache);
    for (int64_t b; (b = next++) < blocks;) {
      const int64_t k0 = b * kKeyBlock, kb = std::min(kKeyBlock, L - k0);
      for (int64_t t0 = 0; t0 < kb; t0 += kL) {  // gather and pack (widened) panels of 16 rows
        const int n_rows = static_cast<int>(std::min<int64_t>(kL, kb - t0));
        for (int i = 0; i < n_rows; ++i)
          rows[i] = reinterpret_cast<const TW*>(cache + row_index(chunk.block_table, a.page_size, k0 + t0 + i) *
                                                            static_cast<int64_t>(row_bytes));
        // The next panel's rows start coming from memory while this one is transposed.
        for (int64_t t = t0 + kL; t < std::min(kb, t0 + 2 * kL); ++t) {
          const char* row = cache + row_index(chunk.block_table, a.page_size, k0 + t) * static_cast<int64_t>(row_bytes);
          for (size_t at = 0; at < row_bytes; at += 64) __builtin_prefetch(row + at);
        }
        if constexpr (kBf16)
          if (dequantise) {  // dequantised as they are packed
            const void* raw[kL];
            std::copy_n(rows, n_rows, raw);
            mqa_pack_fp8(layout, raw, n_rows, &kvp[t0 * W]);
            continue;
          }
        mqa_pack(rows, n_rows, W, &kvp[t0 * W]);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int n_q = static_cast<int>(std::min<int64_t>(kL, M - g * kL));
        for (int r = 0; r < n_q; ++r)
          visible[r] = static_cast<int32_t>(std::clamp<int64_t>(chunk.cached + (g * kL + r) / H + 1 - k0, 0, kb));
        mqa_block({.qT = &qT[g * W * kL], .kv = kvp.data(), .d = W, .dv = dc, .keys = kb, .rows = n_q,
                   .visible = visible, .scale = k_.softmax_scale, .round_p = kBf16, .m = &mg[g * kL],
                   .l = &lg[g * kL], .accT = &accT[g * dc * kL], .s = s.data()});
      }
    }
    for (int64_t r = 0; r < M; ++r) {
      const int64_t g = r / kL, lane = r % kL;
      m[r] = mg[r], l[r] = lg[r];
      for (int64_t j = 0; j < dc; ++j) acc[r * dc + j] = accT[(g * dc + j) * kL + lane];
    }
  }

  // Absorbed form: q̂ = W_UKᵀ qn per head, then MQA of the n·H rows [q̂ | qr] over the latent rows, split over
  // the threads by key range (split-KV) and merged by log-sum-exp; finally o = W_UV ô per head.
  void attend_absorbed(const detail::ForwardArgs& a, const detail::ChunkPlan& chunk, const TA* q, TA* o) const {
    const int64_t H = c_.num_heads, dn = c_.qk_nope_head_dim, dr = c_.qk_rope_head_dim, dv = c_.v_head_dim;
    const int64_t dc = c_.kv_lora_rank, W = c_.latent_dim(), dqk = dn + dr, dkv = dn + dv;
    const int64_t n = chunk.num_tokens, L = chunk.cached + n, M = n * H;
    const TA* qc = q + chunk.first_row * H * dqk;

    // qa [n·H, W] = [q̂ | qr], row i·H + h. One head per task (each GEMM then runs in its thread).
    Buf<float> qhat(static_cast<size_t>(M * W));
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; ++h)
      gemm_nn(n, dc, dn, qc + h * dqk, H * dqk, kv_b_.data() + h * dkv * dc, dc, &qhat[h * W], H * W);
    Buf<TA> qa(static_cast<size_t>(M * W));
    for (int64_t r = 0; r < M; ++r) {
      to_operand<TW, TA>(&qhat[r * W], &qa[r * W], dc);
      std::copy_n(qc + r * dqk + dn, dr, &qa[r * W + dc]);
    }

    const int64_t blocks = (L + kKeyBlock - 1) / kKeyBlock;
    const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), blocks));
    std::vector<float> acc(static_cast<size_t>(threads * M * dc), 0.f);
    std::vector<float> m(static_cast<size_t>(threads * M), -std::numeric_limits<float>::infinity());
    std::vector<float> l(m.size(), 0.f);
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      if constexpr (std::is_same_v<TA, float>)
        mqa_lanes(a, chunk, qa.data(), M, next, blocks, &acc[t * M * dc], &m[t * M], &l[t * M]);
      else
        mqa_gemm(a, chunk, qa.data(), M, next, blocks, &acc[t * M * dc], &m[t * M], &l[t * M]);
    }
    // Merge the per-thread partial softmaxes: rescale each to the global max.
    for (int64_t r = 0; r < M; ++r) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < threads; ++t) mx = std::max(mx, m[t * M + r]);
      float lsum = 0.f;
      for (int t = 0; t < threads; ++t) {
        const float w = l[t * M + r] == 0.f ? 0.f : std::exp(m[t * M + r] - mx);
        lsum += l[t * M + r] * w;
        if (t == 0) scale_inplace(&acc[r * dc], dc, w);
        else
          for (int64_t j = 0; j < dc; ++j) acc[r * dc + j] += w * acc[(t * M + r) * dc + j];
      }
      l[r] = lsum;
    }
    Buf<TA> ohat(static_cast<size_t>(M * dc));
    finish(acc.data(), l.data(), M, dc, ohat.data());
    Buf<float> of(static_cast<size_t>(n * H * dv));
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; ++h)
      gemm_nt(n, dv, dc, ohat.data() + h * dc, H * dc, kv_b_.data() + (h * dkv + dn) * dc, dc, &of[h * dv], H * dv);
    to_operand<TW, TA>(of.data(), o + chunk.first_row * H * dv, n * H * dv);
  }

  Config c_;
  DerivedConstants k_;
  Buf<TW> q_proj_, q_a_, q_b_, kv_a_, kv_b_, o_;
  std::vector<float> q_a_norm_, kv_a_norm_, q_bias_, kv_a_bias_, o_bias_;
};

class FastBackend final : public HostBackend {
 public:
  std::string_view name() const override { return "cpu"; }
  std::unique_ptr<detail::LayerImpl> make_layer(const LayerWeights& w, const LayerOptions& o) const override {
    if (o.precision == Precision::F32) return std::make_unique<FastLayer<float, float>>(w, o);
    if (bf16_operands()) return std::make_unique<FastLayer<uint16_t, uint16_t>>(w, o);
    return std::make_unique<FastLayer<uint16_t, float>>(w, o);
  }
};

}  // namespace
}  // namespace mla::cpu

namespace mla::detail {
const Backend& cpu_backend() {
  static const cpu::FastBackend backend;
  return backend;
}
}  // namespace mla::detail
