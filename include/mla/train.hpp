// Training: the layer's forward over whole causal sequences, keeping what backward needs, and its backward pass
// (the gradients of the hidden states and of every weight). Two implementations of the same computation:
//   forward_reference / backward_reference: the scalar reference, computed in double from the f32 weights, written
//     to be read against ../../docs/training.md; every other path is tested against it.
//   forward / backward: the fast CPU path, float32 with fp32 accumulation: the projections and their gradients as
//     oneDNN GEMMs, the attention FlashAttention-style per (sequence, head) and query tile, over the threads.
// No paged cache: each sequence attends causally to itself.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "mla/weights.hpp"

namespace mla::train {

// What backward needs from forward: the reference keeps double (Saved), the fast path float (SavedF32). Every
// intermediate is kept; the attention probabilities are recomputed from the saved log-sum-exp, as FlashAttention
// does.
template <class Real>
struct BasicSaved {
  int64_t tokens = 0;
  std::vector<int32_t> cu_seqlens;  // [batch + 1]
  std::vector<int64_t> positions;   // [T] rope positions
  std::vector<Real> x;              // [T, D] hidden states
  std::vector<Real> qa;             // [T, d_q] q_a output (+ q_bias) before its RMSNorm; empty without q_lora
  std::vector<Real> qa_normed;      // [T, d_q] after the RMSNorm
  std::vector<Real> q;              // [T, H, d_qk] queries, rope part rotated
  std::vector<Real> c;              // [T, d_c] latent before kv_a_layernorm
  std::vector<Real> c_normed;       // [T, d_c]
  std::vector<Real> k_rope;         // [T, d_r] the shared rope key, rotated
  std::vector<Real> kv;             // [T, H, d_n + d_v] kv_b output: K_nope then V per head
  std::vector<Real> lse;            // [T, H] natural log of each softmax's denominator (scaled logits)
  std::vector<Real> o;              // [T, H, d_v] attention output before o_proj
};
using Saved = BasicSaved<double>;
using SavedF32 = BasicSaved<float>;

template <class Real>
struct BasicForwardResult {
  std::vector<float> out;  // [T, D]
  BasicSaved<Real> saved;
};
using ForwardResult = BasicForwardResult<double>;
using ForwardResultF32 = BasicForwardResult<float>;

// Gradients, shaped as the LayerWeights they belong to (empty where the layer has no such tensor).
struct LayerGradients {
  Matrix q_proj, q_a_proj, q_b_proj, kv_a_proj, kv_b_proj, o_proj;
  std::vector<float> q_a_norm, kv_a_norm, q_bias, kv_a_bias, o_bias;
};

struct BackwardResult {
  std::vector<float> d_hidden;  // [T, D]
  LayerGradients grads;
};

// hidden [T, D] with T = cu_seqlens.back(); cu_seqlens [batch + 1] non-decreasing from 0; positions [T] or
// empty (then 0 .. n-1 within each sequence). Throws mla::InvalidArgument naming the bad argument.
ForwardResult forward_reference(const LayerWeights& weights, std::span<const float> hidden,
                                std::span<const int32_t> cu_seqlens, std::span<const int64_t> positions = {});

// d_out [T, D]: the gradient of the loss with respect to forward's out.
BackwardResult backward_reference(const LayerWeights& weights, const Saved& saved, std::span<const float> d_out);

// The fast CPU path: the same arguments, checks and results as the reference, in float32 with fp32 accumulation,
// over the OpenMP threads. It agrees with the reference to about 1e-6 relative (tests/test_train.cpp,
// docs/training.md); two calls with the same inputs and thread count give the same bits. backward also refuses a
// `saved` whose arrays do not fit the layer and its token count, naming the array.
ForwardResultF32 forward(const LayerWeights& weights, std::span<const float> hidden,
                         std::span<const int32_t> cu_seqlens, std::span<const int64_t> positions = {});
BackwardResult backward(const LayerWeights& weights, const SavedF32& saved, std::span<const float> d_out);

}  // namespace mla::train
