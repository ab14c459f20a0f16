// The scalar reference of the layer's training forward and backward (mla/train.hpp), in double, one token and
// one head at a time, written to be read against ../../docs/training.md. The forward is the layer's prefill of
// whole sequences (cpu/reference.cpp without the cache); the backward applies the chain rule to each step in
// reverse, recomputing the attention probabilities from the saved log-sum-exp.
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "cpu/common.hpp"
#include "cpu/train_common.hpp"
#include "mla/error.hpp"
#include "mla/train.hpp"

namespace mla::train {
namespace {

// y[r] = Σ_c W[r, c] x[c] + b[r]   (W as stored in the checkpoint: [out, in]).
void linear(const Matrix& W, const double* x, const std::vector<float>& bias, double* y) {
  for (int64_t r = 0; r < W.rows; ++r) {
    const float* w = W.row(r);
    double acc = 0;
    for (int64_t c = 0; c < W.cols; ++c) acc += static_cast<double>(w[c]) * x[c];
    y[r] = acc + (bias.empty() ? 0.0 : static_cast<double>(bias[r]));
  }
}

// The backward of linear for one token: dW += dy xᵀ, db += dy, dx += Wᵀ dy.
void linear_backward(const Matrix& W, const double* x, const double* dy, std::vector<double>& dW,
                     std::vector<double>* db, double* dx) {
  for (int64_t r = 0; r < W.rows; ++r) {
    const float* w = W.row(r);
    double* g = dW.data() + r * W.cols;
    for (int64_t c = 0; c < W.cols; ++c) {
      g[c] += dy[r] * x[c];
      if (dx) dx[c] += static_cast<double>(w[c]) * dy[r];
    }
    if (db) (*db)[static_cast<size_t>(r)] += dy[r];
  }
}

// y = γ ⊙ x / r with r = sqrt(mean(x²) + ε).
double rms_scale(const double* x, int64_t n) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return std::sqrt(ss / static_cast<double>(n) + static_cast<double>(kLatentNormEps));
}
void rms_norm(const double* x, int64_t n, const std::vector<float>& gamma, double* y) {
  const double r = rms_scale(x, n);
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<double>(gamma[static_cast<size_t>(i)]) * (x[i] / r);
}
// With u = x / r: dγ += dy ⊙ u, du = dy ⊙ γ, dx = (du − u · mean(du ⊙ u)) / r.
void rms_norm_backward(const double* x, int64_t n, const std::vector<float>& gamma, const double* dy, double* dx,
                       std::vector<double>& dgamma) {
  const double r = rms_scale(x, n);
  double dot = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double u = x[i] / r, du = dy[i] * static_cast<double>(gamma[static_cast<size_t>(i)]);
    dgamma[static_cast<size_t>(i)] += dy[i] * u;
    dot += du * u;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double u = x[i] / r, du = dy[i] * static_cast<double>(gamma[static_cast<size_t>(i)]);
    dx[i] = (du - u * dot / static_cast<double>(n)) / r;
  }
}

// RoPE is a rotation (times the YaRN magnitude) of each adjacent pair, with the layer's fp32 angles: y = R x in
// forward, dx = Rᵀ dy in backward.
struct Rotation {
  std::vector<float> cos_a, sin_a;
  Rotation(int64_t position, const DerivedConstants& k) : cos_a(k.inv_freq.size()), sin_a(k.inv_freq.size()) {
    cpu::rope_angles(position, k, cos_a.data(), sin_a.data());
  }
  void apply(double* x, bool transpose) const {
    for (size_t i = 0; i < cos_a.size(); ++i) {
      const double a = x[2 * i], b = x[2 * i + 1], c = cos_a[i], s = transpose ? -sin_a[i] : sin_a[i];
      x[2 * i] = a * c - b * s;
      x[2 * i + 1] = a * s + b * c;
    }
  }
};

std::vector<double> zeros(int64_t n) { return std::vector<double>(static_cast<size_t>(n), 0.0); }
Matrix to_matrix(const Matrix& like, const std::vector<double>& g) {
  Matrix m;
  if (like.empty()) return m;
  m.rows = like.rows, m.cols = like.cols;
  m.data.assign(g.begin(), g.end());
  return m;
}
std::vector<float> to_floats(const std::vector<double>& g) { return {g.begin(), g.end()}; }

}  // namespace

ForwardResult forward_reference(const LayerWeights& w, std::span<const float> hidden,
                                std::span<const int32_t> cu_seqlens, std::span<const int64_t> positions) {
  const Config& c = w.config;
  const DerivedConstants k = DerivedConstants::compute(c);
  const int64_t D = c.hidden_size, H = c.num_heads, dq = c.q_lora_rank, dc = c.kv_lora_rank;
  const int64_t dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim, dqk = dn + dr, dkv = dn + dv;
  constexpr const char* op = "train::forward_reference";
  std::vector<int64_t> pos = detail::check_forward_args(c, hidden, cu_seqlens, positions, op);
  const int64_t T = static_cast<int64_t>(pos.size());

  ForwardResult res;
  Saved& s = res.saved;
  s.tokens = T;
  s.cu_seqlens.assign(cu_seqlens.begin(), cu_seqlens.end());
  s.positions = std::move(pos);
  s.x.assign(hidden.begin(), hidden.end());
  if (c.has_q_lora()) s.qa = zeros(T * dq), s.qa_normed = zeros(T * dq);
  s.q = zeros(T * H * dqk), s.c = zeros(T * dc), s.c_normed = zeros(T * dc), s.k_rope = zeros(T * dr);
  s.kv = zeros(T * H * dkv), s.lse = zeros(T * H), s.o = zeros(T * H * dv);

  // Per token: queries (rope rotated), the normed latent, the rotated rope key, and K_nope, V of every head.
  std::vector<double> ckv(static_cast<size_t>(dc + dr));
  for (int64_t t = 0; t < T; ++t) {
    const double* x = s.x.data() + t * D;
    double* q = s.q.data() + t * H * dqk;
    if (c.has_q_lora()) {
      linear(w.q_a_proj, x, w.q_bias, s.qa.data() + t * dq);
      rms_norm(s.qa.data() + t * dq, dq, w.q_a_norm, s.qa_normed.data() + t * dq);
      linear(w.q_b_proj, s.qa_normed.data() + t * dq, {}, q);
    } else {
      linear(w.q_proj, x, w.q_bias, q);
    }
    const Rotation rot(s.positions[static_cast<size_t>(t)], k);
    for (int64_t h = 0; h < H; ++h) rot.apply(q + h * dqk + dn, false);
    linear(w.kv_a_proj, x, w.kv_a_bias, ckv.data());
    std::copy(ckv.begin(), ckv.begin() + dc, s.c.begin() + t * dc);
    rms_norm(ckv.data(), dc, w.kv_a_norm, s.c_normed.data() + t * dc);
    std::copy(ckv.begin() + dc, ckv.end(), s.k_rope.begin() + t * dr);
    rot.apply(s.k_rope.data() + t * dr, false);
    linear(w.kv_b_proj, s.c_normed.data() + t * dc, {}, s.kv.data() + t * H * dkv);
  }

  // Causal softmax attention within each sequence: query i sees keys j <= i.
  const double scale = k.softmax_scale;
  std::vector<double> logit;
  for (size_t b = 0; b + 1 < cu_seqlens.size(); ++b)
    for (int64_t i = cu_seqlens[b]; i < cu_seqlens[b + 1]; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const double* qi = s.q.data() + (i * H + h) * dqk;
        logit.assign(static_cast<size_t>(i - cu_seqlens[b] + 1), 0.0);
        double mx = -INFINITY;
        for (int64_t j = cu_seqlens[b]; j <= i; ++j) {
          const double* kn = s.kv.data() + (j * H + h) * dkv;
          const double* kr = s.k_rope.data() + j * dr;
          double dot = 0;
          for (int64_t e = 0; e < dn; ++e) dot += qi[e] * kn[e];
          for (int64_t e = 0; e < dr; ++e) dot += qi[dn + e] * kr[e];
          logit[static_cast<size_t>(j - cu_seqlens[b])] = scale * dot;
          mx = std::max(mx, scale * dot);
        }
        double sum = 0;
        for (double l : logit) sum += std::exp(l - mx);
        const double lse = mx + std::log(sum);
        s.lse[static_cast<size_t>(i * H + h)] = lse;
        double* o = s.o.data() + (i * H + h) * dv;
        for (int64_t j = cu_seqlens[b]; j <= i; ++j) {
          const double p = std::exp(logit[static_cast<size_t>(j - cu_seqlens[b])] - lse);
          const double* v = s.kv.data() + (j * H + h) * dkv + dn;
          for (int64_t e = 0; e < dv; ++e) o[e] += p * v[e];
        }
      }

  res.out.resize(static_cast<size_t>(T * D));
  std::vector<double> y(static_cast<size_t>(D));
  for (int64_t t = 0; t < T; ++t) {
    linear(w.o_proj, s.o.data() + t * H * dv, w.o_bias, y.data());
    for (int64_t e = 0; e < D; ++e)
      res.out[static_cast<size_t>(t * D + e)] = static_cast<float>(y[static_cast<size_t>(e)]);
  }
  return res;
}

BackwardResult backward_reference(const LayerWeights& w, const Saved& s, std::span<const float> d_out) {
  const Config& c = w.config;
  const DerivedConstants k = DerivedConstants::compute(c);
  const int64_t D = c.hidden_size, H = c.num_heads, dq = c.q_lora_rank, dc = c.kv_lora_rank;
  const int64_t dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim, dqk = dn + dr, dkv = dn + dv;
  const int64_t T = s.tokens;
  detail::check_backward_args(c, T, s.x.size(), d_out, "train::backward_reference");

  // Gradients in double, shaped like the weights.
  auto like = [](const Matrix& m) { return zeros(m.rows * m.cols); };
  std::vector<double> g_q = like(w.q_proj), g_qa = like(w.q_a_proj), g_qb = like(w.q_b_proj);
  std::vector<double> g_kva = like(w.kv_a_proj), g_kvb = like(w.kv_b_proj), g_o = like(w.o_proj);
  std::vector<double> g_qa_norm = zeros(static_cast<int64_t>(w.q_a_norm.size()));
  std::vector<double> g_kv_norm = zeros(static_cast<int64_t>(w.kv_a_norm.size()));
  std::vector<double> g_qbias = zeros(static_cast<int64_t>(w.q_bias.size()));
  std::vector<double> g_kvbias = zeros(static_cast<int64_t>(w.kv_a_bias.size()));
  std::vector<double> g_obias = zeros(static_cast<int64_t>(w.o_bias.size()));
  std::vector<double> dx = zeros(T * D);

  // y = o_proj · o + b.
  std::vector<double> d_o = zeros(T * H * dv), dy(static_cast<size_t>(D));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < D; ++e) dy[static_cast<size_t>(e)] = d_out[static_cast<size_t>(t * D + e)];
    linear_backward(w.o_proj, s.o.data() + t * H * dv, dy.data(), g_o, w.o_bias.empty() ? nullptr : &g_obias,
                    d_o.data() + t * H * dv);
  }

  // Attention: P_ij = exp(s_ij − lse_i), dV_j += P_ij dO_i, dS_ij = P_ij (dO_i·V_j − dO_i·O_i), and the logits
  // s_ij = τ (q_nope·k_nope + q_rope·k_rope) pass dS on to q, K_nope and the shared rope key.
  const double scale = k.softmax_scale;
  std::vector<double> d_q = zeros(T * H * dqk), d_kv = zeros(T * H * dkv), d_krope = zeros(T * dr);
  for (size_t b = 0; b + 1 < s.cu_seqlens.size(); ++b)
    for (int64_t i = s.cu_seqlens[b]; i < s.cu_seqlens[b + 1]; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const double* qi = s.q.data() + (i * H + h) * dqk;
        const double* doi = d_o.data() + (i * H + h) * dv;
        const double* oi = s.o.data() + (i * H + h) * dv;
        double* dqi = d_q.data() + (i * H + h) * dqk;
        double delta = 0;
        for (int64_t e = 0; e < dv; ++e) delta += doi[e] * oi[e];
        for (int64_t j = s.cu_seqlens[b]; j <= i; ++j) {
          const double* kn = s.kv.data() + (j * H + h) * dkv;
          const double* v = kn + dn;
          const double* kr = s.k_rope.data() + j * dr;
          double dot = 0, dp = 0;
          for (int64_t e = 0; e < dn; ++e) dot += qi[e] * kn[e];
          for (int64_t e = 0; e < dr; ++e) dot += qi[dn + e] * kr[e];
          for (int64_t e = 0; e < dv; ++e) dp += doi[e] * v[e];
          const double p = std::exp(scale * dot - s.lse[static_cast<size_t>(i * H + h)]);
          const double ds = p * (dp - delta) * scale;  // d(loss)/d(q·k)
          double* dkn = d_kv.data() + (j * H + h) * dkv;
          double* dvj = dkn + dn;
          double* dkr = d_krope.data() + j * dr;
          for (int64_t e = 0; e < dv; ++e) dvj[e] += p * doi[e];
          for (int64_t e = 0; e < dn; ++e) dqi[e] += ds * kn[e], dkn[e] += ds * qi[e];
          for (int64_t e = 0; e < dr; ++e) dqi[dn + e] += ds * kr[e], dkr[e] += ds * qi[dn + e];
        }
      }

  // Per token, the projections in reverse.
  std::vector<double> d_c(static_cast<size_t>(dc)), d_ckv(static_cast<size_t>(dc + dr)),
      ckv(static_cast<size_t>(dc + dr));
  std::vector<double> d_qa_n(static_cast<size_t>(std::max<int64_t>(dq, 0))), d_qa(d_qa_n.size());
  for (int64_t t = 0; t < T; ++t) {
    const double* x = s.x.data() + t * D;
    double* dxt = dx.data() + t * D;
    const Rotation rot(s.positions[static_cast<size_t>(t)], k);

    // kv = kv_b · c_normed; c_normed = RMSNorm(c); k_rope = R · kv_a[dc:]; [c | k_pe] = kv_a · x + b.
    std::fill(d_c.begin(), d_c.end(), 0.0);
    linear_backward(w.kv_b_proj, s.c_normed.data() + t * dc, d_kv.data() + t * H * dkv, g_kvb, nullptr, d_c.data());
    rms_norm_backward(s.c.data() + t * dc, dc, w.kv_a_norm, d_c.data(), d_ckv.data(), g_kv_norm);
    std::copy(d_krope.begin() + t * dr, d_krope.begin() + (t + 1) * dr, d_ckv.begin() + dc);
    rot.apply(d_ckv.data() + dc, true);
    linear_backward(w.kv_a_proj, x, d_ckv.data(), g_kva, w.kv_a_bias.empty() ? nullptr : &g_kvbias, dxt);

    // q: the rope part back through R, then q_b · RMSNorm(q_a · x + b) or q_proj · x + b.
    double* dqt = d_q.data() + t * H * dqk;
    for (int64_t h = 0; h < H; ++h) rot.apply(dqt + h * dqk + dn, true);
    if (c.has_q_lora()) {
      std::fill(d_qa_n.begin(), d_qa_n.end(), 0.0);
      linear_backward(w.q_b_proj, s.qa_normed.data() + t * dq, dqt, g_qb, nullptr, d_qa_n.data());
      rms_norm_backward(s.qa.data() + t * dq, dq, w.q_a_norm, d_qa_n.data(), d_qa.data(), g_qa_norm);
      linear_backward(w.q_a_proj, x, d_qa.data(), g_qa, w.q_bias.empty() ? nullptr : &g_qbias, dxt);
    } else {
      linear_backward(w.q_proj, x, dqt, g_q, w.q_bias.empty() ? nullptr : &g_qbias, dxt);
    }
  }

  BackwardResult res;
  res.d_hidden = to_floats(dx);
  LayerGradients& g = res.grads;
  g.q_proj = to_matrix(w.q_proj, g_q), g.q_a_proj = to_matrix(w.q_a_proj, g_qa),
  g.q_b_proj = to_matrix(w.q_b_proj, g_qb);
  g.kv_a_proj = to_matrix(w.kv_a_proj, g_kva), g.kv_b_proj = to_matrix(w.kv_b_proj, g_kvb);
  g.o_proj = to_matrix(w.o_proj, g_o);
  g.q_a_norm = to_floats(g_qa_norm), g.kv_a_norm = to_floats(g_kv_norm);
  g.q_bias = to_floats(g_qbias), g.kv_a_bias = to_floats(g_kvbias), g.o_bias = to_floats(g_obias);
  return res;
}

}  // namespace mla::train
