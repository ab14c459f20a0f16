// Causal attention of the fast training path, forward and backward, one (sequence, head) per task over the OpenMP
// threads, in query tiles of kQueryTile rows. A tile's logits over every key it can see are one pair of GEMMs
// (nope part, then the shared rope key added with beta = 1), so the softmax of each row is exact in one step: the
// forward keeps its log-sum-exp, the backward recomputes P = exp(τs − lse) from it (FlashAttention-2). Keys past
// the diagonal are masked to P = 0 inside the tile. The scratch is kQueryTile × (the longest sequence) floats per
// thread, per buffer: no [T, T] matrix exists at any time.
//
// Each task owns its head's columns of dQ, dK_nope and dV in its sequence's rows, so the backward needs no atomics;
// the rope key's gradient, shared by the heads, is accumulated per head and summed once at the end (in head order,
// so the result does not depend on the thread count).
#include "cpu/train_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace mla::cpu::train {
namespace {

constexpr int64_t kQueryTile = 64;

struct Task {
  int64_t first, n, head;  // the sequence's first token and length, and the head
};

std::vector<Task> tasks_of(const AttentionShape& s) {
  std::vector<Task> t;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads; ++h)
      if (s.cu_seqlens[b + 1] > s.cu_seqlens[b])
        t.push_back({s.cu_seqlens[b], s.cu_seqlens[b + 1] - s.cu_seqlens[b], h});
  return t;
}

int64_t longest(const AttentionShape& s) {
  int64_t n = 0;
  for (int64_t b = 0; b < s.batch; ++b) n = std::max<int64_t>(n, s.cu_seqlens[b + 1] - s.cu_seqlens[b]);
  return n;
}

// S [qt, kn] = q_tile · Kᵀ over the kn keys from the sequence's first: nope against this head's K_nope, plus rope
// against the shared rope key. Row r of the tile is query i0 + r.
void logits(const AttentionShape& s, const Task& t, int64_t i0, int64_t qt, int64_t kn, const float* q, const float* kv,
            const float* k_rope, float* S) {
  const int64_t H = s.heads, dn = s.d_n, dr = s.d_r, dqk = dn + dr, dkv = dn + s.d_v;
  const float* qh = q + ((t.first + i0) * H + t.head) * dqk;  // [qt, dqk], row stride H·dqk
  gemm_nt(qt, kn, dn, qh, H * dqk, kv + (t.first * H + t.head) * dkv, H * dkv, S, kn);
  gemm_nt(qt, kn, dr, qh + dn, H * dqk, k_rope + t.first * dr, dr, S, kn, 1.f);
}

}  // namespace

void attention_forward(const AttentionForward& p) {
  const AttentionShape& s = p.shape;
  const int64_t H = s.heads, dn = s.d_n, dv = s.d_v, dkv = dn + dv;
  const std::vector<Task> tasks = tasks_of(s);
  const auto scratch = static_cast<size_t>(kQueryTile * longest(s));
#pragma omp parallel
  {
    std::vector<float> S(scratch), P(scratch);  // [qt, kn] logits, probabilities
#pragma omp for schedule(dynamic)
    for (size_t k = 0; k < tasks.size(); ++k) {
      const Task& t = tasks[k];
      for (int64_t i0 = 0; i0 < t.n; i0 += kQueryTile) {
        const int64_t qt = std::min(kQueryTile, t.n - i0), kn = i0 + qt;  // the tile's last query sees kn keys
        logits(s, t, i0, qt, kn, p.q, p.kv, p.k_rope, S.data());
        for (int64_t r = 0; r < qt; ++r) {
          const int64_t i = t.first + i0 + r;
          float m = -std::numeric_limits<float>::infinity(), l = 0.f;
          online_softmax_step(&S[r * kn], kn, i0 + r + 1, s.scale, m, l, &P[r * kn], nullptr);
          scale_inplace(&P[r * kn], i0 + r + 1, 1.f / l);
          p.lse[i * H + t.head] = m + std::log(l);
        }
        // O_tile [qt, dv] = P · V
        gemm_nn(qt, dv, kn, P.data(), kn, p.kv + (t.first * H + t.head) * dkv + dn, H * dkv,
                p.o + ((t.first + i0) * H + t.head) * dv, H * dv);
      }
    }
  }
}

void attention_backward(const AttentionBackward& p) {
  const AttentionShape& s = p.shape;
  const int64_t H = s.heads, dn = s.d_n, dr = s.d_r, dv = s.d_v, dqk = dn + dr, dkv = dn + dv;
  const int64_t T = s.cu_seqlens[s.batch];
  const std::vector<Task> tasks = tasks_of(s);
  const auto scratch = static_cast<size_t>(kQueryTile * longest(s));
  std::fill(p.d_kv, p.d_kv + T * H * dkv, 0.f);                   // dK and dV accumulate over the query tiles
  std::vector<float> d_kr(static_cast<size_t>(T * H * dr), 0.f);  // [T, H, d_r] each head's share of d_k_rope
#pragma omp parallel
  {
    std::vector<float> S(scratch), P(scratch), dP(scratch);  // [qt, kn]; dP becomes dS in place
    std::vector<float> delta(kQueryTile);
#pragma omp for schedule(dynamic)
    for (size_t k = 0; k < tasks.size(); ++k) {
      const Task& t = tasks[k];
      const float* kh = p.kv + (t.first * H + t.head) * dkv;   // [n, d_n] K_nope, row stride H·dkv; V at + d_n
      const float* kr = p.k_rope + t.first * dr;               // [n, d_r]
      float* dkh = p.d_kv + (t.first * H + t.head) * dkv;      // [n, d_n] dK_nope; dV at + d_n
      float* dkr = d_kr.data() + (t.first * H + t.head) * dr;  // [n, d_r], row stride H·d_r
      for (int64_t i0 = 0; i0 < t.n; i0 += kQueryTile) {
        const int64_t qt = std::min(kQueryTile, t.n - i0), kn = i0 + qt;
        const int64_t row0 = (t.first + i0) * H + t.head;  // the tile's first (token, head) row
        const float* qh = p.q + row0 * dqk;                // [qt, d_qk], row stride H·d_qk
        const float* doh = p.d_o + row0 * dv;              // [qt, d_v], row stride H·d_v
        logits(s, t, i0, qt, kn, p.q, p.kv, p.k_rope, S.data());
        // dP [qt, kn] = dO · Vᵀ
        gemm_nt(qt, kn, dv, doh, H * dv, kh + dn, H * dkv, dP.data(), kn);
        for (int64_t r = 0; r < qt; ++r) {
          const float* o = p.o + (row0 + r * H) * dv;
          const float* d_o = doh + r * H * dv;
          float dot = 0.f;  // δ = dO·O = Σ_j P_ij dP_ij
          for (int64_t e = 0; e < dv; ++e) dot += d_o[e] * o[e];
          delta[r] = dot;
          // P = exp(τs − lse): the softmax step with its running max started at lse, which no visible logit
          // exceeds (lse = max + log Σ, Σ >= 1), gives exactly that; its sum is not needed.
          float m = p.lse[row0 + r * H], l = 0.f;
          online_softmax_step(&S[r * kn], kn, i0 + r + 1, s.scale, m, l, &P[r * kn], nullptr);
        }
        // dS = τ P ⊙ (dP − δ): the gradient of the raw dot products q·k (masked keys have P = 0).
        for (int64_t r = 0; r < qt; ++r) {
          float* ds = &dP[r * kn];
          const float* pr = &P[r * kn];
          for (int64_t j = 0; j < kn; ++j) ds[j] = s.scale * pr[j] * (ds[j] - delta[r]);
        }
        const float* dS = dP.data();
        // dQ [qt, d_qk] = dS · [K_nope | k_rope]: each query tile sees all its keys at once, so written, not added.
        gemm_nn(qt, dn, kn, dS, kn, kh, H * dkv, p.d_q + row0 * dqk, H * dqk);
        gemm_nn(qt, dr, kn, dS, kn, kr, dr, p.d_q + row0 * dqk + dn, H * dqk);
        // dV += Pᵀ · dO, dK_nope += dSᵀ · q_nope, dk_rope(head) += dSᵀ · q_rope, over the kn keys.
        gemm_tn(kn, dv, qt, P.data(), kn, doh, H * dv, dkh + dn, H * dkv, 1.f);
        gemm_tn(kn, dn, qt, dS, kn, qh, H * dqk, dkh, H * dkv, 1.f);
        gemm_tn(kn, dr, qt, dS, kn, qh + dn, H * dqk, dkr, H * dr, 1.f);
      }
    }
    // d_k_rope [T, d_r] = Σ_h d_kr[:, h, :]
#pragma omp for schedule(static)
    for (int64_t i = 0; i < T; ++i) {
      float* out = p.d_k_rope + i * dr;
      std::fill(out, out + dr, 0.f);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < dr; ++e) out[e] += d_kr[static_cast<size_t>((i * H + h) * dr + e)];
    }
  }
}

}  // namespace mla::cpu::train
