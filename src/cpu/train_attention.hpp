// The attention of the fast training path (train.cpp): expanded-form causal softmax attention over packed
// sequences, its forward keeping each softmax's log-sum-exp and its backward recomputing the probabilities from it
// (FlashAttention-2's schedule, per (sequence, head) on the CPU). Every head has its own K_nope and V; the rope key
// is shared by all heads (MLA), so its gradient is the sum over heads.
#pragma once

#include <cstdint>

namespace mla::cpu::train {

// Shapes shared by both passes. T = cu_seqlens[batch], d_qk = d_n + d_r.
struct AttentionShape {
  const int32_t* cu_seqlens;  // [batch + 1] non-decreasing from 0
  int64_t batch, heads, d_n, d_r, d_v;
  float scale;  // softmax scale τ: s_ij = τ (q_nope·k_nope + q_rope·k_rope)
};

struct AttentionForward {
  AttentionShape shape;
  const float* q;       // [T, H, d_qk] rope part rotated
  const float* kv;      // [T, H, d_n + d_v] K_nope then V per head
  const float* k_rope;  // [T, d_r] rotated, shared by the heads
  float* o;             // [T, H, d_v] written
  float* lse;           // [T, H] written: natural log of each softmax's denominator (of the scaled logits)
};
void attention_forward(const AttentionForward& p);

struct AttentionBackward {
  AttentionShape shape;
  const float* q;       // [T, H, d_qk]
  const float* kv;      // [T, H, d_n + d_v]
  const float* k_rope;  // [T, d_r]
  const float* o;       // [T, H, d_v] forward's output
  const float* lse;     // [T, H] forward's log-sum-exp
  const float* d_o;     // [T, H, d_v]
  float* d_q;           // [T, H, d_qk] written
  float* d_kv;          // [T, H, d_n + d_v] written: dK_nope then dV per head
  float* d_k_rope;      // [T, d_r] written: summed over the heads
};
void attention_backward(const AttentionBackward& p);

}  // namespace mla::cpu::train
