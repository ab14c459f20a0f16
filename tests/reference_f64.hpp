// An independent float64 implementation of /work/shared/MLA_SPEC.md sections 1-5 (one full prefill of one
// sequence), written from the spec and sharing no code with src/. It has deliberately wrong variants that the
// negative-control tests use to prove that the golden comparison can tell them apart.
//
// As the goldens do (transformers in float64): the RoPE angle is fp32(p)·fp32(ω) rounded to fp32 and cos/sin
// are fp32; the softmax is computed in fp32 from float64 logits; everything else is float64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

#include "mla/config.hpp"
#include "mla/weights.hpp"

namespace mla::testing {

enum class Variant {
  Correct,
  HalfSplitRope,   // rotates (x_j, x_{j + d_r/2}) instead of adjacent pairs
  LayerNorm,       // subtracts the mean in the latent norms
  Tau576,          // softmax scale from the absorbed width d_c + d_r (576 on real models) instead of d_qk
  ConfigEps,       // latent norms use rms_norm_eps instead of 1e-6
};

inline const char* variant_name(Variant v) {
  switch (v) {
    case Variant::Correct: return "correct";
    case Variant::HalfSplitRope: return "half-split-rope";
    case Variant::LayerNorm: return "layernorm";
    case Variant::Tau576: return "tau-576";
    case Variant::ConfigEps: return "config-eps";
  }
  return "?";
}

struct RopeTables {
  std::vector<float> inv_freq;   // fp32, d_r/2
  double magnitude = 1.0;        // A
  double tau = 0.0;              // softmax scale
};

inline double ref_mscale(double s, double x) { return s <= 1.0 ? 1.0 : 0.1 * x * std::log(s) + 1.0; }

// Section 3 "YaRN", computed here from the formulas (fp32 frequencies as the spec asks).
inline RopeTables ref_rope_tables(const Config& c, Variant variant = Variant::Correct) {
  RopeTables t;
  const int64_t dr = c.qk_rope_head_dim, half = dr / 2;
  const double width = variant == Variant::Tau576 ? static_cast<double>(c.kv_lora_rank + c.qk_rope_head_dim)
                                                  : static_cast<double>(c.qk_head_dim());
  t.tau = 1.0 / std::sqrt(width);
  t.inv_freq.resize(static_cast<size_t>(half));
  const float theta = static_cast<float>(c.rope.theta);
  std::vector<float> base(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    base[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(dr));
  if (c.rope.type != RopeType::Yarn) {
    t.inv_freq = base;
    return t;
  }
  const RopeParams& r = c.rope;
  const double s = r.factor;
  auto corr = [&](double rot) {
    return static_cast<double>(dr) * std::log(r.original_max_position / (2.0 * std::numbers::pi * rot)) /
           (2.0 * std::log(r.theta));
  };
  double lo = std::max(std::floor(corr(r.beta_fast)), 0.0);
  double hi = std::min(std::ceil(corr(r.beta_slow)), static_cast<double>(dr - 1));
  if (lo == hi) hi += 0.001;
  // The fp32 evaluation order of transformers' _compute_yarn_parameters. It matters: at p = 150000 (golden
  // `long-positions`) one ulp of ω moves the angle by ~1e-2 rad, and the algebraically equal
  // ω⁰(1 − ρ) + (ω⁰/s)ρ of the spec misses that golden's cache rows by 3e-5.
  for (int64_t i = 0; i < half; ++i) {
    const float pos_freq = std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(dr));
    const float extrapolation = 1.0f / pos_freq;
    const float interpolation = 1.0f / (static_cast<float>(s) * pos_freq);
    float rho = (static_cast<float>(i) - static_cast<float>(lo)) / (static_cast<float>(hi) - static_cast<float>(lo));
    rho = std::clamp(rho, 0.0f, 1.0f);
    const float keep = 1.0f - rho;
    t.inv_freq[i] = interpolation * (1.0f - keep) + extrapolation * keep;
  }
  if (r.mscale != 0.0 && r.mscale_all_dim != 0.0)
    t.magnitude = ref_mscale(s, r.mscale) / ref_mscale(s, r.mscale_all_dim);
  else
    t.magnitude = ref_mscale(s, 1.0);
  if (r.mscale_all_dim != 0.0) {
    const double m = ref_mscale(s, r.mscale_all_dim);
    t.tau *= m * m;
  }
  return t;
}

struct RefResult {
  std::vector<double> output;  // [T, D]
  std::vector<double> latent;  // [T, d_c + d_r]
};

namespace ref_detail {

inline std::vector<double> matvec(const Matrix& W, const double* x) {
  std::vector<double> y(static_cast<size_t>(W.rows), 0.0);
  for (int64_t r = 0; r < W.rows; ++r) {
    const float* w = W.row(r);
    double acc = 0;
    for (int64_t c = 0; c < W.cols; ++c) acc += static_cast<double>(w[c]) * x[c];
    y[r] = acc;
  }
  return y;
}

inline void norm(double* x, int64_t n, const std::vector<float>& gamma, double eps, bool layernorm) {
  double mean = 0;
  if (layernorm) {
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= static_cast<double>(n);
  }
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = gamma[i] * ((x[i] - mean) * inv);
}

inline void rope(double* x, int64_t dr, int64_t position, const RopeTables& t, bool half_split) {
  const float p = static_cast<float>(position);
  std::vector<double> y(x, x + dr);
  for (int64_t i = 0; i < dr / 2; ++i) {
    const float angle = p * t.inv_freq[i];
    const double c = static_cast<double>(std::cos(angle)) * t.magnitude;
    const double s = static_cast<double>(std::sin(angle)) * t.magnitude;
    const int64_t a = half_split ? i : 2 * i, b = half_split ? i + dr / 2 : 2 * i + 1;
    y[a] = x[a] * c - x[b] * s;
    y[b] = x[a] * s + x[b] * c;
  }
  std::copy(y.begin(), y.end(), x);
}

}  // namespace ref_detail

// One sequence: hidden [T, D], positions [T]; causal by index (query i sees keys 0..i).
inline RefResult reference_forward(const LayerWeights& w, const float* hidden, const int64_t* positions, int64_t T,
                                   Variant variant = Variant::Correct) {
  using namespace ref_detail;
  const Config& c = w.config;
  const int64_t D = c.hidden_size, H = c.num_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  const int64_t dv = c.v_head_dim, dc = c.kv_lora_rank, dqk = dn + dr, Wd = dc + dr;
  const RopeTables tables = ref_rope_tables(c, variant);
  const double eps = variant == Variant::ConfigEps ? c.rms_norm_eps : 1e-6;
  const bool ln = variant == Variant::LayerNorm, half = variant == Variant::HalfSplitRope;
  auto add = [](std::vector<double>& y, const std::vector<float>& b) {
    for (size_t i = 0; i < b.size(); ++i) y[i] += b[i];
  };

  RefResult r;
  r.latent.assign(static_cast<size_t>(T * Wd), 0.0);
  r.output.assign(static_cast<size_t>(T * D), 0.0);
  std::vector<double> q(static_cast<size_t>(T * H * dqk));       // rotated
  std::vector<double> kn(static_cast<size_t>(T * H * dn)), v(static_cast<size_t>(T * H * dv));
  std::vector<double> x(static_cast<size_t>(D));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < D; ++j) x[j] = hidden[t * D + j];
    std::vector<double> qt;
    if (c.has_q_lora()) {
      std::vector<double> qa = matvec(w.q_a_proj, x.data());
      add(qa, w.q_bias);
      norm(qa.data(), c.q_lora_rank, w.q_a_norm, eps, ln);
      qt = matvec(w.q_b_proj, qa.data());
    } else {
      qt = matvec(w.q_proj, x.data());
      add(qt, w.q_bias);
    }
    for (int64_t h = 0; h < H; ++h) rope(qt.data() + h * dqk + dn, dr, positions[t], tables, half);
    std::copy(qt.begin(), qt.end(), q.begin() + t * H * dqk);

    std::vector<double> z = matvec(w.kv_a_proj, x.data());
    add(z, w.kv_a_bias);
    norm(z.data(), dc, w.kv_a_norm, eps, ln);
    rope(z.data() + dc, dr, positions[t], tables, half);
    std::copy(z.begin(), z.end(), r.latent.begin() + t * Wd);
    const std::vector<double> kv = matvec(w.kv_b_proj, z.data());  // uses the first d_c columns only
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < dn; ++j) kn[(t * H + h) * dn + j] = kv[h * (dn + dv) + j];
      for (int64_t j = 0; j < dv; ++j) v[(t * H + h) * dv + j] = kv[h * (dn + dv) + dn + j];
    }
  }

  std::vector<double> o(static_cast<size_t>(H * dv));
  std::vector<float> p(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const double* qi = &q[(i * H + h) * dqk];
      float mx = -INFINITY;
      for (int64_t t = 0; t <= i; ++t) {
        double dot = 0;
        for (int64_t j = 0; j < dn; ++j) dot += qi[j] * kn[(t * H + h) * dn + j];
        for (int64_t j = 0; j < dr; ++j) dot += qi[dn + j] * r.latent[t * Wd + dc + j];
        p[t] = static_cast<float>(tables.tau * dot);   // fp32 softmax
        mx = std::max(mx, p[t]);
      }
      float sum = 0;
      for (int64_t t = 0; t <= i; ++t) sum += (p[t] = std::exp(p[t] - mx));
      for (int64_t j = 0; j < dv; ++j) {
        double acc = 0;
        for (int64_t t = 0; t <= i; ++t) acc += static_cast<double>(p[t] / sum) * v[(t * H + h) * dv + j];
        o[h * dv + j] = acc;
      }
    }
    std::vector<double> y = matvec(w.o_proj, o.data());
    add(y, w.o_bias);
    std::copy(y.begin(), y.end(), r.output.begin() + i * D);
  }
  return r;
}

// ‖a − b‖ / ‖b‖ with a float64 reference.
inline double rel_error_f64(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

inline double rel_error_f64(const std::vector<double>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

}  // namespace mla::testing
