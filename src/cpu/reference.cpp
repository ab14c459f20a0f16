// The scalar reference backend ("cpu-reference"): plain loops and float accumulation, one token and one head
// at a time, written to be read against ../../docs/mla.md. Every fast path is tested against it.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/backend.hpp"
#include "cpu/common.hpp"

namespace mla::cpu {
namespace {

// y[rows] = W[rows, cols] x + b.
void linear(const Matrix& W, const float* x, const std::vector<float>& bias, float* y) {
  for (int64_t r = 0; r < W.rows; ++r) {
    const float* w = W.row(r);
    float acc = 0.f;
    for (int64_t c = 0; c < W.cols; ++c) acc += w[c] * x[c];
    y[r] = acc + (bias.empty() ? 0.f : bias[r]);
  }
}

class ReferenceLayer final : public detail::LayerImpl {
 public:
  ReferenceLayer(const LayerWeights& weights, const LayerOptions& options)
      : w_(weights), k_(DerivedConstants::compute(weights.config)), bf16_(options.precision == Precision::BF16) {
    if (bf16_)
      for (Matrix* m : {&w_.q_proj, &w_.q_a_proj, &w_.q_b_proj, &w_.kv_a_proj, &w_.kv_b_proj, &w_.o_proj})
        round_to_bf16(m->data.data(), static_cast<int64_t>(m->data.size()));
  }

  void forward(const detail::ForwardArgs& a) override {
    const Config& c = w_.config;
    check_finite(a.hidden, a.total_tokens, c.hidden_size);
    for (const detail::ChunkPlan& chunk : a.chunks) forward_chunk(a, chunk);
  }

 private:
  void round(float* x, int64_t n) const {
    if (bf16_) round_to_bf16(x, n);
  }

  // q for one token: [H, d_qk] with the rope part rotated.
  std::vector<float> query(const float* x, int64_t position) const {
    const Config& c = w_.config;
    std::vector<float> q(static_cast<size_t>(c.num_heads * c.qk_head_dim()));
    if (c.has_q_lora()) {
      std::vector<float> qa(static_cast<size_t>(c.q_lora_rank));
      linear(w_.q_a_proj, x, w_.q_bias, qa.data());
      rms_norm(qa.data(), c.q_lora_rank, w_.q_a_norm.data(), kLatentNormEps, qa.data());
      round(qa.data(), c.q_lora_rank);
      linear(w_.q_b_proj, qa.data(), {}, q.data());
    } else {
      linear(w_.q_proj, x, w_.q_bias, q.data());
    }
    round(q.data(), static_cast<int64_t>(q.size()));
    for (int64_t h = 0; h < c.num_heads; ++h) {
      float* qr = q.data() + h * c.qk_head_dim() + c.qk_nope_head_dim;
      rope_pairs(qr, c.qk_rope_head_dim, position, k_);
      round(qr, c.qk_rope_head_dim);
    }
    return q;
  }

  // The cache row [RMSNorm(c) | RoPE(k_pe)] of one token.
  std::vector<float> latent_row(const float* x, int64_t position) const {
    const Config& c = w_.config;
    std::vector<float> row(static_cast<size_t>(c.latent_dim()));
    linear(w_.kv_a_proj, x, w_.kv_a_bias, row.data());
    rms_norm(row.data(), c.kv_lora_rank, w_.kv_a_norm.data(), kLatentNormEps, row.data());
    rope_pairs(row.data() + c.kv_lora_rank, c.qk_rope_head_dim, position, k_);
    return row;
  }

  void forward_chunk(const detail::ForwardArgs& a, const detail::ChunkPlan& chunk) const {
    const Config& c = w_.config;
    const int64_t D = c.hidden_size, H = c.num_heads, W = c.latent_dim();
    const int64_t n = chunk.num_tokens, L = chunk.cached + n;
    std::vector<float> x(static_cast<size_t>(D));
    std::vector<std::vector<float>> q(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(a.hidden + (chunk.first_row + i) * D, D, x.data());
      round(x.data(), D);
      q[i] = query(x.data(), chunk.positions[i]);
      const std::vector<float> row = latent_row(x.data(), chunk.positions[i]);
      store_row(a.cache_row, row.data(),
                row_at(a.cache, a.cache_row, row_index(chunk.block_table, a.page_size, chunk.cached + i)));
    }
    // Every key of the sequence, as stored (bf16-rounded in a bf16 cache, dequantised from an fp8 one).
    std::vector<float> keys(static_cast<size_t>(L * W));
    for (int64_t t = 0; t < L; ++t)
      load_row(a.cache_row, row_at(a.cache, a.cache_row, row_index(chunk.block_table, a.page_size, t)),
               keys.data() + t * W);

    std::vector<float> o(static_cast<size_t>(H * c.v_head_dim));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t visible = chunk.cached + i + 1;  // bottom-right causal: cache index <= cached + i
      for (int64_t h = 0; h < H; ++h) {
        float* oh = o.data() + h * c.v_head_dim;
        if (chunk.path == Path::Absorbed)
          attend_absorbed(q[i].data() + h * c.qk_head_dim(), keys.data(), visible, h, oh);
        else
          attend_expanded(q[i].data() + h * c.qk_head_dim(), keys.data(), visible, h, oh);
      }
      linear(w_.o_proj, o.data(), w_.o_bias, a.out + (chunk.first_row + i) * D);
    }
  }

  // W_UK^h is rows h(d_n+d_v) + [0, d_n) of kv_b_proj; W_UV^h the next d_v rows.
  const float* uk(int64_t h, int64_t j) const {
    const Config& c = w_.config;
    return w_.kv_b_proj.row(h * (c.qk_nope_head_dim + c.v_head_dim) + j);
  }
  const float* uv(int64_t h, int64_t j) const {
    const Config& c = w_.config;
    return w_.kv_b_proj.row(h * (c.qk_nope_head_dim + c.v_head_dim) + c.qk_nope_head_dim + j);
  }

  // Softmax over `logits` (fp32, max-subtracted); returns Σ p, leaves p (bf16-rounded on the bf16 path, as
  // it enters the P·V product) in place.
  float softmax_weights(std::vector<float>& logits) const {
    const float m = *std::max_element(logits.begin(), logits.end());
    float sum = 0.f;
    for (float& l : logits) {
      l = std::exp(l - m);
      sum += l;
      if (bf16_) l = round_bf16(l);
    }
    return sum;
  }

  // Section 3 of the spec: per-head keys and values expanded from the latent rows.
  void attend_expanded(const float* q, const float* keys, int64_t visible, int64_t h, float* o) const {
    const Config& c = w_.config;
    const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dc = c.kv_lora_rank;
    const int64_t W = c.latent_dim();
    std::vector<float> logits(static_cast<size_t>(visible)), kn(static_cast<size_t>(dn)), v(static_cast<size_t>(dv));
    for (int64_t t = 0; t < visible; ++t) {
      const float* row = keys + t * W;
      float dot = 0.f;
      for (int64_t j = 0; j < dn; ++j) {
        float k = 0.f;
        for (int64_t e = 0; e < dc; ++e) k += uk(h, j)[e] * row[e];
        dot += q[j] * (bf16_ ? round_bf16(k) : k);
      }
      for (int64_t j = 0; j < dr; ++j) dot += q[dn + j] * row[dc + j];
      logits[t] = k_.softmax_scale * dot;
    }
    const float sum = softmax_weights(logits);
    std::fill(o, o + dv, 0.f);
    for (int64_t t = 0; t < visible; ++t) {
      const float* row = keys + t * W;
      for (int64_t j = 0; j < dv; ++j) {
        float val = 0.f;
        for (int64_t e = 0; e < dc; ++e) val += uv(h, j)[e] * row[e];
        o[j] += logits[t] * (bf16_ ? round_bf16(val) : val);
      }
    }
    for (int64_t j = 0; j < dv; ++j) o[j] /= sum;
    round(o, dv);
  }

  // Section 4: q̂ = W_UKᵀ qn, MQA over the latent rows, o = W_UV ô.
  void attend_absorbed(const float* q, const float* keys, int64_t visible, int64_t h, float* o) const {
    const Config& c = w_.config;
    const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dc = c.kv_lora_rank;
    const int64_t W = c.latent_dim();
    std::vector<float> qhat(static_cast<size_t>(dc), 0.f), ohat(static_cast<size_t>(dc), 0.f);
    for (int64_t j = 0; j < dn; ++j)
      for (int64_t e = 0; e < dc; ++e) qhat[e] += q[j] * uk(h, j)[e];
    round(qhat.data(), dc);
    std::vector<float> logits(static_cast<size_t>(visible));
    for (int64_t t = 0; t < visible; ++t) {
      const float* row = keys + t * W;
      float dot = 0.f;
      for (int64_t e = 0; e < dc; ++e) dot += qhat[e] * row[e];
      for (int64_t j = 0; j < dr; ++j) dot += q[dn + j] * row[dc + j];
      logits[t] = k_.softmax_scale * dot;
    }
    const float sum = softmax_weights(logits);
    for (int64_t t = 0; t < visible; ++t)
      for (int64_t e = 0; e < dc; ++e) ohat[e] += logits[t] * keys[t * W + e];
    for (float& v : ohat) v /= sum;
    round(ohat.data(), dc);
    for (int64_t j = 0; j < dv; ++j) {
      float acc = 0.f;
      for (int64_t e = 0; e < dc; ++e) acc += uv(h, j)[e] * ohat[e];
      o[j] = acc;
    }
    round(o, dv);
  }

  LayerWeights w_;
  DerivedConstants k_;
  bool bf16_;
};

class ReferenceBackend final : public HostBackend {
 public:
  std::string_view name() const override { return "cpu-reference"; }
  std::unique_ptr<detail::LayerImpl> make_layer(const LayerWeights& w, const LayerOptions& o) const override {
    return std::make_unique<ReferenceLayer>(w, o);
  }
  void prefill_attention_backward(const PrefillBackwardParams& p, void* /*stream*/) const override {
    cpu::prefill_attention_backward_reference(p);
  }
};

}  // namespace
}  // namespace mla::cpu

namespace mla::detail {
const Backend& cpu_reference_backend() {
  static const cpu::ReferenceBackend backend;
  return backend;
}
}  // namespace mla::detail
