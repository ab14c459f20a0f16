// Pieces both CPU backends share: the latent-row math that must be identical on every path, the page
// addressing of the cache, and the backend plumbing.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "core/backend.hpp"
#include "cpu/ops.hpp"
#include "mla/config.hpp"
#include "mla/dtype.hpp"
#include "mla/error.hpp"

namespace mla::cpu {

// y = γ ⊙ x / sqrt(mean(x²) + ε), statistics in fp32.
inline void rms_norm(const float* x, int64_t n, const float* gamma, float eps, float* y) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = gamma[i] * (x[i] * inv);
}

// cos and sin of fp32(p)·ω_i for the d_r/2 pairs, scaled by A. The angle is rounded to fp32 and cos/sin are the
// accurate libm ones (never fast-math: at p ≈ 1.5e5 the fast ones are badly off).
inline void rope_angles(int64_t position, const DerivedConstants& k, float* cos_a, float* sin_a) {
  const auto p = static_cast<float>(position);
  for (size_t i = 0; i < k.inv_freq.size(); ++i) {
    const float angle = p * k.inv_freq[i];
    cos_a[i] = std::cos(angle) * k.rope_magnitude;
    sin_a[i] = std::sin(angle) * k.rope_magnitude;
  }
}

// Adjacent-pair RoPE in place with precomputed angles: pair i = (x[2i], x[2i+1]).
inline void rope_apply(float* x, int64_t dim, const float* cos_a, const float* sin_a) {
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * cos_a[i] - b * sin_a[i];
    x[2 * i + 1] = a * sin_a[i] + b * cos_a[i];
  }
}

// Both in one, for one vector at one position.
inline void rope_pairs(float* x, int64_t dim, int64_t position, const DerivedConstants& k) {
  std::vector<float> cos_a(k.inv_freq.size()), sin_a(k.inv_freq.size());
  rope_angles(position, k, cos_a.data(), sin_a.data());
  rope_apply(x, dim, cos_a.data(), sin_a.data());
}

inline void round_to_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// Address of cache row t of a sequence: page block_table[t / P], slot t % P.
inline int64_t row_index(const int32_t* block_table, int64_t page_size, int64_t t) {
  return static_cast<int64_t>(block_table[t / page_size]) * page_size + t % page_size;
}

// Row `index` of a page pool of rows laid out as `layout`.
inline void* row_at(void* cache, const RowLayout& layout, int64_t index) {
  return static_cast<std::byte*>(cache) + index * layout.bytes();
}
inline const void* row_at(const void* cache, const RowLayout& layout, int64_t index) {
  return static_cast<const std::byte*>(cache) + index * layout.bytes();
}

// Throws before anything is stored when an input row holds NaN or infinity.
inline void check_finite(const float* hidden, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j)
      if (!std::isfinite(hidden[r * width + j]))
        throw InvalidArgument("forward: hidden_states[" + std::to_string(r) + ", " + std::to_string(j) +
                              "] is " + std::to_string(hidden[r * width + j]) + " (not finite); nothing was stored");
}

// What both CPU backends share: host memory and the kernel ops of cpu/ops.cpp. Each adds its name and layer.
class HostBackend : public detail::Backend {
 public:
  bool host_memory() const override { return true; }
  std::unique_ptr<detail::Buffer> allocate(int64_t bytes) const override { return detail::allocate_host(bytes); }
  void copy_to_host(const void* src, int64_t bytes, void* dst) const override {
    if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
  void decode_attention(const DecodeParams& p) const override { cpu::decode_attention(p); }
  DecodeSchedule plan_decode_attention(const DecodeParams& p) const override { return cpu::plan_decode_attention(p); }
  void decode_attention(const DecodeParams& p, const DecodeSchedule&, void*, void*, bool) const override {
    cpu::decode_attention(p);
  }
  void split_decode_attention(const DecodeParams&, const DecodeSchedule&, void*, void*) const override {}
  void prefill_attention(const PrefillParams& p, void* /*stream*/) const override { cpu::prefill_attention(p); }
  void merge_attention(const MergeParams& p, void* /*stream*/) const override { cpu::merge_attention(p); }
  int64_t prefill_attention_backward_workspace_bytes(const PrefillBackwardParams&) const override { return 0; }
  // The fast path; "cpu-reference" overrides it with the scalar one.
  void prefill_attention_backward(const PrefillBackwardParams& p, void* /*stream*/) const override {
    cpu::prefill_attention_backward(p);
  }
};

}  // namespace mla::cpu
