// The fast CPU path of the training forward and backward (mla/train.hpp): train_reference.cpp's computation in
// float32 with fp32 accumulation. Every projection is one GEMM over all T tokens, and its backward two more
// (dX = dY·W, dW = dYᵀ·X) through the oneDNN wrappers of gemm.hpp; RMSNorm, RoPE and their backward are row loops
// over the OpenMP threads; the attention is train_attention.cpp. Reductions over the tokens (the norms' and the
// biases' gradients) are summed in fixed chunks of rows, in order, so they do not depend on the thread count.
#include "mla/train.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "cpu/common.hpp"
#include "cpu/gemm.hpp"
#include "cpu/train_attention.hpp"
#include "cpu/train_common.hpp"

namespace mla::train {
namespace {

using cpu::gemm_nn;
using cpu::gemm_nt;
using cpu::gemm_tn;

constexpr int64_t kRowChunk = 64;  // rows per partial sum of a reduction over the tokens

std::vector<float> floats(int64_t n) { return std::vector<float>(static_cast<size_t>(n)); }

// A gradient shaped like the weight `like` (empty when the layer has no such weight); a GEMM fills it.
Matrix shaped(const Matrix& like) {
  Matrix m;
  if (like.empty()) return m;
  m.rows = like.rows, m.cols = like.cols;
  m.data.resize(like.data.size());
  return m;
}

void add_bias(float* y, int64_t rows, int64_t ld, const std::vector<float>& bias) {
  if (bias.empty()) return;
  const auto n = static_cast<int64_t>(bias.size());
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) y[r * ld + j] += bias[static_cast<size_t>(j)];
}

// Σ over the rows of f(chunk's first row, past its last row, partial [n]) for chunks of kRowChunk rows, each chunk
// adding into its own partial; the partials are summed in chunk order.
template <class F>
std::vector<float> sum_over_rows(int64_t rows, int64_t n, F&& f) {
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  std::vector<float> partial(static_cast<size_t>(chunks * n), 0.f), sum(static_cast<size_t>(n), 0.f);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) f(ch * kRowChunk, std::min(rows, (ch + 1) * kRowChunk), &partial[ch * n]);
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t j = 0; j < n; ++j) sum[static_cast<size_t>(j)] += partial[static_cast<size_t>(ch * n + j)];
  return sum;
}

// The bias gradient: Σ_t dy[t, 0..n), dy with row stride ld.
std::vector<float> column_sums(const float* dy, int64_t rows, int64_t n, int64_t ld) {
  return sum_over_rows(rows, n, [&](int64_t r0, int64_t r1, float* acc) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < n; ++j) acc[j] += dy[r * ld + j];
  });
}

// y = γ ⊙ x / r per row of [rows, n], r = sqrt(mean(x²) + ε), as cpu::rms_norm (statistics in fp32).
void rms_norm_rows(const float* x, int64_t rows, int64_t n, const std::vector<float>& gamma, float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) cpu::rms_norm(x + r * n, n, gamma.data(), kLatentNormEps, y + r * n);
}

// The backward of rms_norm_rows for dy [rows, n]: with u = x / r, dγ = Σ_rows dy ⊙ u (returned) and
// dx = (dy⊙γ − u · mean(dy⊙γ⊙u)) / r, written to dx with row stride ldx.
std::vector<float> rms_norm_backward_rows(const float* x, int64_t rows, int64_t n, const std::vector<float>& gamma,
                                          const float* dy, float* dx, int64_t ldx) {
  return sum_over_rows(rows, n, [&](int64_t r0, int64_t r1, float* d_gamma) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * n;
      const float* dyr = dy + r * n;
      float ss = 0.f;
      for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + kLatentNormEps);
      float dot = 0.f;  // Σ du ⊙ u
      for (int64_t i = 0; i < n; ++i) {
        const float u = xr[i] * inv;
        d_gamma[i] += dyr[i] * u;
        dot += dyr[i] * gamma[static_cast<size_t>(i)] * u;
      }
      const float mean = dot / static_cast<float>(n);
      for (int64_t i = 0; i < n; ++i)
        dx[r * ldx + i] = (dyr[i] * gamma[static_cast<size_t>(i)] - xr[i] * inv * mean) * inv;
    }
  });
}

// RoPE's transpose: dx = Rᵀ dy for each adjacent pair (R is a rotation times the YaRN magnitude), in place.
void rope_transpose(float* x, int64_t dim, const float* cos_a, const float* sin_a) {
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * cos_a[i] + b * sin_a[i];
    x[2 * i + 1] = b * cos_a[i] - a * sin_a[i];
  }
}

// Runs f(t, cos, sin) for every token t with its position's rope angles, over the threads.
template <class F>
void for_each_token_angles(const std::vector<int64_t>& positions, const DerivedConstants& k, F&& f) {
  const auto T = static_cast<int64_t>(positions.size());
#pragma omp parallel
  {
    std::vector<float> cos_a(k.inv_freq.size()), sin_a(k.inv_freq.size());
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      cpu::rope_angles(positions[static_cast<size_t>(t)], k, cos_a.data(), sin_a.data());
      f(t, cos_a.data(), sin_a.data());
    }
  }
}

cpu::train::AttentionShape attention_shape(const Config& c, const DerivedConstants& k,
                                           const std::vector<int32_t>& cu_seqlens) {
  return {.cu_seqlens = cu_seqlens.data(),
          .batch = static_cast<int64_t>(cu_seqlens.size()) - 1,
          .heads = c.num_heads,
          .d_n = c.qk_nope_head_dim,
          .d_r = c.qk_rope_head_dim,
          .d_v = c.v_head_dim,
          .scale = k.softmax_scale};
}

// The saved state's sizes against the config and its token count: backward reads every array whole, and a state
// assembled by hand (the Python operators rebuild it from tensors) must not make it read past one.
void check_saved(const Config& c, const SavedF32& s) {
  constexpr const char* op = "train::backward";
  const int64_t T = s.tokens, H = c.num_heads, dq = c.has_q_lora() ? c.q_lora_rank : 0, dc = c.kv_lora_rank;
  const int64_t dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim;
  detail::check_lengths(s.cu_seqlens, T, op);
  const std::pair<const char*, int64_t> sizes[] = {{"positions", static_cast<int64_t>(s.positions.size())},
                                                   {"qa", static_cast<int64_t>(s.qa.size())},
                                                   {"qa_normed", static_cast<int64_t>(s.qa_normed.size())},
                                                   {"q", static_cast<int64_t>(s.q.size())},
                                                   {"c", static_cast<int64_t>(s.c.size())},
                                                   {"c_normed", static_cast<int64_t>(s.c_normed.size())},
                                                   {"k_rope", static_cast<int64_t>(s.k_rope.size())},
                                                   {"kv", static_cast<int64_t>(s.kv.size())},
                                                   {"lse", static_cast<int64_t>(s.lse.size())},
                                                   {"o", static_cast<int64_t>(s.o.size())}};
  const int64_t want[] = {T,     T * dq,    T * dq, T * H * (dn + dr), T * dc, T * dc, T * dr, T * H * (dn + dv),
                          T * H, T * H * dv};
  for (size_t i = 0; i < std::size(want); ++i)
    if (sizes[i].second != want[i])
      throw InvalidArgument(std::string(op) + ": saved." + sizes[i].first + " has " + std::to_string(sizes[i].second) +
                            " values, the config and " + std::to_string(T) + " tokens need " + std::to_string(want[i]) +
                            " (is `saved` from this layer?)");
}

}  // namespace

ForwardResultF32 forward(const LayerWeights& w, std::span<const float> hidden, std::span<const int32_t> cu_seqlens,
                         std::span<const int64_t> positions) {
  const Config& c = w.config;
  const DerivedConstants k = DerivedConstants::compute(c);
  const int64_t D = c.hidden_size, H = c.num_heads, dq = c.q_lora_rank, dc = c.kv_lora_rank;
  const int64_t dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim, dqk = dn + dr, dkv = dn + dv;
  std::vector<int64_t> pos = detail::check_forward_args(c, hidden, cu_seqlens, positions, "train::forward");
  const auto T = static_cast<int64_t>(pos.size());

  ForwardResultF32 res;
  SavedF32& s = res.saved;
  s.tokens = T;
  s.cu_seqlens.assign(cu_seqlens.begin(), cu_seqlens.end());
  s.positions = std::move(pos);
  s.x.assign(hidden.begin(), hidden.end());

  // q [T, H·d_qk] = q_b · RMSNorm(q_a · x + b), or q_proj · x + b.
  s.q = floats(T * H * dqk);
  if (c.has_q_lora()) {
    s.qa = floats(T * dq), s.qa_normed = floats(T * dq);
    gemm_nt(T, dq, D, s.x.data(), D, w.q_a_proj.data.data(), D, s.qa.data(), dq);
    add_bias(s.qa.data(), T, dq, w.q_bias);
    rms_norm_rows(s.qa.data(), T, dq, w.q_a_norm, s.qa_normed.data());
    gemm_nt(T, H * dqk, dq, s.qa_normed.data(), dq, w.q_b_proj.data.data(), dq, s.q.data(), H * dqk);
  } else {
    gemm_nt(T, H * dqk, D, s.x.data(), D, w.q_proj.data.data(), D, s.q.data(), H * dqk);
    add_bias(s.q.data(), T, H * dqk, w.q_bias);
  }

  // [c | k_pe] [T, d_c + d_r] = kv_a · x + b; then the normed latent, and both rope parts rotated.
  std::vector<float> ckv = floats(T * (dc + dr));
  gemm_nt(T, dc + dr, D, s.x.data(), D, w.kv_a_proj.data.data(), D, ckv.data(), dc + dr);
  add_bias(ckv.data(), T, dc + dr, w.kv_a_bias);
  s.c = floats(T * dc), s.c_normed = floats(T * dc), s.k_rope = floats(T * dr);
  for_each_token_angles(s.positions, k, [&](int64_t t, const float* cos_a, const float* sin_a) {
    const float* row = &ckv[t * (dc + dr)];
    std::copy_n(row, dc, &s.c[t * dc]);
    cpu::rms_norm(row, dc, w.kv_a_norm.data(), kLatentNormEps, &s.c_normed[t * dc]);
    std::copy_n(row + dc, dr, &s.k_rope[t * dr]);
    cpu::rope_apply(&s.k_rope[t * dr], dr, cos_a, sin_a);
    for (int64_t h = 0; h < H; ++h) cpu::rope_apply(&s.q[(t * H + h) * dqk + dn], dr, cos_a, sin_a);
  });
  // kv [T, H·(d_n + d_v)] = kv_b · c_normed
  s.kv = floats(T * H * dkv);
  gemm_nt(T, H * dkv, dc, s.c_normed.data(), dc, w.kv_b_proj.data.data(), dc, s.kv.data(), H * dkv);

  s.o = floats(T * H * dv), s.lse = floats(T * H);
  cpu::train::attention_forward({.shape = attention_shape(c, k, s.cu_seqlens),
                                 .q = s.q.data(),
                                 .kv = s.kv.data(),
                                 .k_rope = s.k_rope.data(),
                                 .o = s.o.data(),
                                 .lse = s.lse.data()});

  // out [T, D] = o_proj · o + b
  res.out = floats(T * D);
  gemm_nt(T, D, H * dv, s.o.data(), H * dv, w.o_proj.data.data(), H * dv, res.out.data(), D);
  add_bias(res.out.data(), T, D, w.o_bias);
  return res;
}

BackwardResult backward(const LayerWeights& w, const SavedF32& s, std::span<const float> d_out) {
  const Config& c = w.config;
  const DerivedConstants k = DerivedConstants::compute(c);
  const int64_t D = c.hidden_size, H = c.num_heads, dq = c.q_lora_rank, dc = c.kv_lora_rank;
  const int64_t dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim, dqk = dn + dr, dkv = dn + dv;
  const int64_t T = s.tokens;
  detail::check_backward_args(c, T, s.x.size(), d_out, "train::backward");
  check_saved(c, s);

  BackwardResult res;
  LayerGradients& g = res.grads;
  g.q_proj = shaped(w.q_proj), g.q_a_proj = shaped(w.q_a_proj), g.q_b_proj = shaped(w.q_b_proj);
  g.kv_a_proj = shaped(w.kv_a_proj), g.kv_b_proj = shaped(w.kv_b_proj), g.o_proj = shaped(w.o_proj);

  // out = o_proj · o + b: d_o [T, H·d_v] = d_out · W_o, dW_o = d_outᵀ · o.
  std::vector<float> d_o = floats(T * H * dv);
  gemm_nn(T, H * dv, D, d_out.data(), D, w.o_proj.data.data(), H * dv, d_o.data(), H * dv);
  gemm_tn(D, H * dv, T, d_out.data(), D, s.o.data(), H * dv, g.o_proj.data.data(), H * dv);
  if (!w.o_bias.empty()) g.o_bias = column_sums(d_out.data(), T, D, D);

  std::vector<float> d_q = floats(T * H * dqk), d_kv = floats(T * H * dkv), d_krope = floats(T * dr);
  cpu::train::attention_backward({.shape = attention_shape(c, k, s.cu_seqlens),
                                  .q = s.q.data(),
                                  .kv = s.kv.data(),
                                  .k_rope = s.k_rope.data(),
                                  .o = s.o.data(),
                                  .lse = s.lse.data(),
                                  .d_o = d_o.data(),
                                  .d_q = d_q.data(),
                                  .d_kv = d_kv.data(),
                                  .d_k_rope = d_krope.data()});

  // kv = kv_b · c_normed: d_cn [T, d_c] = d_kv · W_kvb, dW_kvb = d_kvᵀ · c_normed.
  std::vector<float> d_cn = floats(T * dc);
  gemm_nn(T, dc, H * dkv, d_kv.data(), H * dkv, w.kv_b_proj.data.data(), dc, d_cn.data(), dc);
  gemm_tn(H * dkv, dc, T, d_kv.data(), H * dkv, s.c_normed.data(), dc, g.kv_b_proj.data.data(), dc);

  // d[c | k_pe] [T, d_c + d_r]: the latent through kv_a_layernorm, the rope key through Rᵀ; the queries' rope
  // parts through Rᵀ as well, in place.
  std::vector<float> d_ckv = floats(T * (dc + dr));
  g.kv_a_norm = rms_norm_backward_rows(s.c.data(), T, dc, w.kv_a_norm, d_cn.data(), d_ckv.data(), dc + dr);
  for_each_token_angles(s.positions, k, [&](int64_t t, const float* cos_a, const float* sin_a) {
    float* dk = &d_ckv[t * (dc + dr) + dc];
    std::copy_n(&d_krope[t * dr], dr, dk);
    rope_transpose(dk, dr, cos_a, sin_a);
    for (int64_t h = 0; h < H; ++h) rope_transpose(&d_q[(t * H + h) * dqk + dn], dr, cos_a, sin_a);
  });

  // [c | k_pe] = kv_a · x + b: dW_kva = d_ckvᵀ · x, d_hidden = d_ckv · W_kva (the queries' share is added below).
  gemm_tn(dc + dr, D, T, d_ckv.data(), dc + dr, s.x.data(), D, g.kv_a_proj.data.data(), D);
  if (!w.kv_a_bias.empty()) g.kv_a_bias = column_sums(d_ckv.data(), T, dc + dr, dc + dr);
  res.d_hidden = floats(T * D);
  gemm_nn(T, D, dc + dr, d_ckv.data(), dc + dr, w.kv_a_proj.data.data(), D, res.d_hidden.data(), D);

  if (c.has_q_lora()) {
    // q = q_b · qa_normed, qa_normed = RMSNorm(qa), qa = q_a · x + b.
    std::vector<float> d_qan = floats(T * dq), d_qa = floats(T * dq);
    gemm_nn(T, dq, H * dqk, d_q.data(), H * dqk, w.q_b_proj.data.data(), dq, d_qan.data(), dq);
    gemm_tn(H * dqk, dq, T, d_q.data(), H * dqk, s.qa_normed.data(), dq, g.q_b_proj.data.data(), dq);
    g.q_a_norm = rms_norm_backward_rows(s.qa.data(), T, dq, w.q_a_norm, d_qan.data(), d_qa.data(), dq);
    gemm_tn(dq, D, T, d_qa.data(), dq, s.x.data(), D, g.q_a_proj.data.data(), D);
    if (!w.q_bias.empty()) g.q_bias = column_sums(d_qa.data(), T, dq, dq);
    gemm_nn(T, D, dq, d_qa.data(), dq, w.q_a_proj.data.data(), D, res.d_hidden.data(), D, 1.f);
  } else {
    // q = q_proj · x + b.
    gemm_tn(H * dqk, D, T, d_q.data(), H * dqk, s.x.data(), D, g.q_proj.data.data(), D);
    if (!w.q_bias.empty()) g.q_bias = column_sums(d_q.data(), T, H * dqk, H * dqk);
    gemm_nn(T, D, H * dqk, d_q.data(), H * dqk, w.q_proj.data.data(), D, res.d_hidden.data(), D, 1.f);
  }
  return res;
}

}  // namespace mla::train
