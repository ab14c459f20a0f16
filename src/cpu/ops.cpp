// CPU kernels for mla/ops.hpp (both CPU backends use them). Flash-style: keys are streamed in blocks of
// kKeyBlock, logits S = Q·Kᵀ and the online softmax stay in fp32, O += P·V accumulates in fp32. BF16 inputs
// feed the bf16 GEMMs directly (P is rounded to bf16 for P·V, as on the GPU), or, on a CPU without a native bf16
// dot product (kernels.hpp), are widened to f32 block by block with P rounded to bf16 values: the same products.
// F16 and F32 inputs are computed in f32 (F16 converted block by block). Blocks are copied into fixed-size,
// zero-padded scratch so that the GEMM shapes (and oneDNN's cached primitives) do not depend on sequence lengths.
// Parameters were validated by src/core/ops.cpp; semantics in docs/ops.md.
#include "cpu/ops.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "mla/cache.hpp"
#include "mla/dtype.hpp"
#include "mla/ops.hpp"

namespace mla::cpu {
namespace {

constexpr int64_t kKeyBlock = 256;   // keys per step
constexpr int64_t kQueryTile = 64;   // prefill: queries per task
constexpr float kInf = std::numeric_limits<float>::infinity();

// Round-to-nearest-even float -> IEEE binary16 bits; NaN stays NaN, overflow gives infinity.
uint16_t float_to_f16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (a < 0x38800000u)                          // below 2^-14: subnormal, a multiple of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(std::bit_cast<float>(a) * 16777216.0f));
  return sign | static_cast<uint16_t>((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13);
}

// Elements [offset, offset + n) of a BF16/F16/F32 array as the compute type T: bf16 bits (BF16 input) or float.
template <class T>
void load(const void* src, DType dt, int64_t offset, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    std::memcpy(dst, static_cast<const uint16_t*>(src) + offset, static_cast<size_t>(n) * 2);
  } else if (dt == DType::F32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, static_cast<size_t>(n) * 4);
  } else if (dt == DType::BF16) {
    from_bf16(static_cast<const uint16_t*>(src) + offset, dst, n);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(s[i]);
  }
}

void store(const float* x, int64_t n, DType dt, void* dst, int64_t offset) {
  if (dt == DType::F32) {
    std::memcpy(static_cast<float*>(dst) + offset, x, static_cast<size_t>(n) * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst) + offset;
  for (int64_t i = 0; i < n; ++i) d[i] = dt == DType::BF16 ? float_to_bf16(x[i]) : float_to_f16(x[i]);
}

// Online-softmax state of `rows` query rows: running max m (of scaled logits), sum l, unnormalised acc [rows, dv].
struct Partial {
  std::vector<float> m, l, acc;
  Partial(int64_t rows, int64_t dv)
      : m(static_cast<size_t>(rows), -kInf), l(static_cast<size_t>(rows), 0.f), acc(static_cast<size_t>(rows * dv), 0.f) {}
};

// Per-thread buffers: logits and probabilities of one block.
template <class T>
struct Scratch {
  std::vector<float> s;
  std::vector<T> p;
  explicit Scratch(int64_t rows) : s(static_cast<size_t>(rows * kKeyBlock)), p(s.size()) {}
};

// Attends Q [rows, d] to one block of kKeyBlock keys K (rows of stride ldk, first d columns) with values V
// (rows of stride ldv, first dv columns). Query row r sees the block's keys j < visible(r). round_p: float P
// rounded to bf16 values (BF16 input widened to f32).
template <class T, class Visible>
void attend_block(const T* Q, int64_t rows, int64_t d, const T* K, int64_t ldk, const T* V, int64_t ldv, int64_t dv,
                  float scale, Visible visible, Partial& st, Scratch<T>& sc, bool round_p) {
  gemm_nt(rows, kKeyBlock, d, Q, d, K, ldk, sc.s.data(), kKeyBlock);
  for (int64_t r = 0; r < rows; ++r) {
    float* pf = nullptr;
    uint16_t* pb = nullptr;
    if constexpr (std::is_same_v<T, float>) pf = sc.p.data() + r * kKeyBlock;
    else pb = sc.p.data() + r * kKeyBlock;
    const float alpha = online_softmax_step(sc.s.data() + r * kKeyBlock, kKeyBlock, visible(r), scale, st.m[r],
                                            st.l[r], pf, pb, round_p);
    scale_inplace(&st.acc[r * dv], dv, alpha);
  }
  gemm_nn(rows, dv, kKeyBlock, sc.p.data(), kKeyBlock, V, ldv, st.acc.data(), dv, 1.f);
}

// The f32 form of attend_block for decode, where every query row shares each key and value row (MQA): the M rows
// as vector lanes through mqa_block (kernels.hpp), in groups of kMqaLanes, queries and output transposed.
class Lanes {
 public:
  Lanes(const float* q, int64_t rows, int64_t d, int64_t dv)
      : rows_(rows), d_(d), dv_(dv), groups_((rows + kMqaLanes - 1) / kMqaLanes) {
    qT_.assign(static_cast<size_t>(groups_ * d * kMqaLanes), 0.f);
    accT_.assign(static_cast<size_t>(groups_ * dv * kMqaLanes), 0.f);
    m_.assign(static_cast<size_t>(groups_ * kMqaLanes), -kInf);
    l_.assign(m_.size(), 0.f);
    s_.resize(static_cast<size_t>(kKeyBlock * kMqaLanes));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < d; ++k) qT_[((r / kMqaLanes) * d + k) * kMqaLanes + r % kMqaLanes] = q[r * d + k];
  }

  // One block of `keys` keys in mqa_pack's panels [ceil(keys/16), d, 16]; row r sees the keys j < visible(r).
  template <class Visible>
  void attend(const float* kv, int64_t keys, float scale, bool round_p, Visible visible) {
    int32_t vis[kMqaLanes];
    for (int64_t g = 0; g < groups_; ++g) {
      const int rows = static_cast<int>(std::min<int64_t>(kMqaLanes, rows_ - g * kMqaLanes));
      for (int r = 0; r < rows; ++r)
        vis[r] = static_cast<int32_t>(std::clamp<int64_t>(visible(g * kMqaLanes + r), 0, keys));
      mqa_block({.qT = &qT_[g * d_ * kMqaLanes], .kv = kv, .d = d_, .dv = dv_, .keys = keys, .rows = rows,
                 .visible = vis, .scale = scale, .round_p = round_p, .m = &m_[g * kMqaLanes],
                 .l = &l_[g * kMqaLanes], .accT = &accT_[g * dv_ * kMqaLanes], .s = s_.data()});
    }
  }

  Partial partial() const {
    Partial st(rows_, dv_);
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t g = r / kMqaLanes, lane = r % kMqaLanes;
      st.m[r] = m_[r], st.l[r] = l_[r];
      for (int64_t j = 0; j < dv_; ++j) st.acc[r * dv_ + j] = accT_[(g * dv_ + j) * kMqaLanes + lane];
    }
    return st;
  }

 private:
  int64_t rows_, d_, dv_, groups_;
  std::vector<float> qT_, accT_, m_, l_, s_;
};

// Normalises one row: out = acc / l, lse = m + ln l; a row that saw no key gets out = 0 and lse = +inf.
void finish_row(const float* acc, float m, float l, int64_t dv, float* out, float& lse) {
  if (l == 0.f) {
    std::fill(out, out + dv, 0.f);
    lse = kInf;
    return;
  }
  const float inv = 1.f / l;
  for (int64_t j = 0; j < dv; ++j) out[j] = acc[j] * inv;
  lse = m + std::log(l);
}

// A key range [k0, k1) of one sequence, processed by one thread.
struct Split {
  int64_t b, k0, k1;
};

template <class T>
void decode(const DecodeParams& p) {
  const int64_t M = p.s_q * p.h_q, d = p.head_dim, dv = p.head_dim_v, P = p.page_size;
  // Queries as T, rows b·M + i·h_q + h (q is [b, s_q, h_q, d], so each batch entry is M contiguous rows).
  std::vector<T> q(static_cast<size_t>(p.batch * M * d));
  load(p.q, p.dtype, 0, p.batch * M * d, q.data());

  // Long sequences are split into whole key blocks so that a batch of one still keeps every thread busy.
  int64_t total_blocks = 0;
  for (int64_t b = 0; b < p.batch; ++b) total_blocks += (p.cache_seqlens[b] + kKeyBlock - 1) / kKeyBlock;
  const int64_t threads = omp_get_max_threads();
  const int64_t span = std::max<int64_t>(1, (total_blocks + 2 * threads - 1) / (2 * threads)) * kKeyBlock;
  std::vector<Split> splits;
  std::vector<int64_t> first(static_cast<size_t>(p.batch + 1), 0);  // splits [first[b], first[b+1]) belong to b
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t L = p.cache_seqlens[b];
    first[b] = static_cast<int64_t>(splits.size());
    splits.push_back({b, 0, std::min(L, span)});  // a sequence of length 0 still gets one (empty) split
    for (int64_t k0 = span; k0 < L; k0 += span) splits.push_back({b, k0, std::min(L, k0 + span)});
  }
  first[p.batch] = static_cast<int64_t>(splits.size());
  std::vector<Partial> parts(splits.size(), Partial(0, 0));

#pragma omp parallel
  {
    Scratch<T> sc(M);
    std::vector<T> kv(static_cast<size_t>(kKeyBlock * d));
    std::vector<float> panels(std::is_same_v<T, float> ? kv.size() : 0);
    const RowLayout layout = kv_cache_row(p);
#pragma omp for schedule(dynamic)
    for (size_t s = 0; s < splits.size(); ++s) {
      const auto [b, k_begin, k_end] = splits[s];
      const int64_t L = p.cache_seqlens[b];
      const int32_t* table = p.block_table + b * p.max_pages;
      Partial st(M, dv);
      std::optional<Lanes> lanes;  // f32 operands: the lanes kernel
      if constexpr (std::is_same_v<T, float>) lanes.emplace(&q[b * M * d], M, d, dv);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kKeyBlock) {
        const int64_t kb = std::min(kKeyBlock, k_end - k0);
        // An fp8 cache is dequantised to bf16(fp8 · scale), exactly load_row's values: with f32 operands straight
        // into the panels below, with bf16 ones row by row into the block.
        const bool fp8_panels = p.fp8_kv_cache && std::is_same_v<T, float>;
        if (fp8_panels) {
          // packed from the cache rows below
        } else if (p.fp8_kv_cache) {
          for (int64_t t = k0; t < k0 + kb; ++t) {
            const int64_t slot = static_cast<int64_t>(table[t / P]) * P + t % P;
            const void* row = static_cast<const std::byte*>(p.kv_cache) + slot * layout.bytes();
            if constexpr (std::is_same_v<T, uint16_t>)
              fp8_row_to_bf16(layout, row, &kv[(t - k0) * d]);
            else
              fp8_row_to_float(layout, row, &kv[(t - k0) * d]);
          }
        } else {
          for (int64_t t = k0; t < k0 + kb;) {  // gather rows [k0, k0 + kb), one page-contiguous run at a time
            const int64_t run = std::min(k0 + kb - t, P - t % P);
            load(p.kv_cache, p.dtype, (static_cast<int64_t>(table[t / P]) * P + t % P) * d, run * d, &kv[(t - k0) * d]);
            t += run;
          }
        }
        auto visible = [&](int64_t r) {
          const int64_t i = r / p.h_q;
          return (p.causal ? L - (p.s_q - 1 - i) : L) - k0;
        };
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t t0 = 0; t0 < kb; t0 += kMqaLanes) {  // widened rows into 16-key panels
            const int n = static_cast<int>(std::min<int64_t>(kMqaLanes, kb - t0));
            if (fp8_panels) {
              const void* rows[kMqaLanes];
              for (int i = 0; i < n; ++i) {
                const int64_t t = k0 + t0 + i, slot = static_cast<int64_t>(table[t / P]) * P + t % P;
                rows[i] = static_cast<const std::byte*>(p.kv_cache) + slot * layout.bytes();
              }
              mqa_pack_fp8(layout, rows, n, &panels[t0 * d]);
              continue;
            }
            const float* rows[kMqaLanes];
            for (int i = 0; i < n; ++i) rows[i] = &kv[(t0 + i) * d];
            mqa_pack(rows, n, d, &panels[t0 * d]);
          }
          lanes->attend(panels.data(), kb, p.softmax_scale, p.dtype == DType::BF16, visible);
        } else {
          std::fill(kv.begin() + kb * d, kv.end(), T{});  // zero padding: finite values behind masked keys
          attend_block(&q[b * M * d], M, d, kv.data(), d, kv.data(), d, dv, p.softmax_scale, visible, st, sc, false);
        }
      }
      parts[s] = lanes ? lanes->partial() : std::move(st);
    }

    // Merge each sequence's splits (rescale to the common max) and write out and lse.
    std::vector<float> row(static_cast<size_t>(dv)), acc(row.size());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t r = 0; r < M; ++r) {
        float mx = -kInf, l = 0.f;
        for (int64_t s = first[b]; s < first[b + 1]; ++s) mx = std::max(mx, parts[s].m[r]);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = first[b]; s < first[b + 1]; ++s) {
          if (parts[s].l[r] == 0.f) continue;
          const float w = std::exp(parts[s].m[r] - mx);
          l += parts[s].l[r] * w;
          for (int64_t j = 0; j < dv; ++j) acc[j] += w * parts[s].acc[r * dv + j];
        }
        float lse = 0.f;
        finish_row(acc.data(), mx, l, dv, row.data(), lse);
        store(row.data(), dv, p.dtype, p.out, (b * M + r) * dv);
        const int64_t i = r / p.h_q, h = r % p.h_q;
        if (p.lse) p.lse[(b * p.h_q + h) * p.s_q + i] = lse;
      }
  }
}

// One task: a tile of up to kQueryTile queries of one sequence and one head.
struct Tile {
  int64_t b, h, i0;
};

template <class T>
void prefill(const PrefillParams& p) {
  const int64_t H = p.num_heads, dqk = p.head_dim_qk, dv = p.head_dim_v;
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i0 = 0; i0 < p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]; i0 += kQueryTile) tiles.push_back({b, h, i0});

#pragma omp parallel
  {
    Scratch<T> sc(kQueryTile);
    std::vector<T> q(static_cast<size_t>(kQueryTile * dqk)), k(static_cast<size_t>(kKeyBlock * dqk)),
        v(static_cast<size_t>(kKeyBlock * dv));
    std::vector<float> row(static_cast<size_t>(dv));
#pragma omp for schedule(dynamic)
    for (size_t task = 0; task < tiles.size(); ++task) {
      const auto [b, h, i0] = tiles[task];
      const int64_t q_begin = p.cu_seqlens_q[b], n_q = p.cu_seqlens_q[b + 1] - q_begin;
      const int64_t k_begin = p.cu_seqlens_k[b], n_k = p.cu_seqlens_k[b + 1] - k_begin;
      const int64_t qt = std::min(kQueryTile, n_q - i0);
      for (int64_t r = 0; r < qt; ++r) load(p.q, p.dtype, ((q_begin + i0 + r) * H + h) * dqk, dqk, &q[r * dqk]);
      std::fill(q.begin() + qt * dqk, q.end(), T{});
      // Bottom-right causal: query i sees keys t <= n_k − n_q + i; the tile's last query bounds the key range.
      const int64_t k_end = p.causal ? std::clamp<int64_t>(n_k - n_q + i0 + qt, 0, n_k) : n_k;
      // Keys the tile's first query sees, as a plain variable: capturing the structured binding i0 in a lambda
      // is C++20 (P1091) but clang before 16 rejects it.
      const int64_t first_visible = p.causal ? n_k - n_q + i0 + 1 : n_k;
      Partial st(kQueryTile, dv);
      for (int64_t k0 = 0; k0 < k_end; k0 += kKeyBlock) {
        const int64_t kb = std::min(kKeyBlock, k_end - k0);
        for (int64_t t = 0; t < kb; ++t) {
          load(p.k, p.dtype, ((k_begin + k0 + t) * H + h) * dqk, dqk, &k[t * dqk]);
          load(p.v, p.dtype, ((k_begin + k0 + t) * H + h) * dv, dv, &v[t * dv]);
        }
        std::fill(k.begin() + kb * dqk, k.end(), T{});
        std::fill(v.begin() + kb * dv, v.end(), T{});
        auto visible = [&](int64_t r) { return (p.causal ? first_visible + r : n_k) - k0; };
        attend_block(q.data(), kQueryTile, dqk, k.data(), dqk, v.data(), dv, dv, p.softmax_scale, visible, st, sc,
                     p.dtype == DType::BF16);
      }
      for (int64_t r = 0; r < qt; ++r) {
        float lse = 0.f;
        finish_row(&st.acc[r * dv], st.m[r], st.l[r], dv, row.data(), lse);
        store(row.data(), dv, p.dtype, p.out, ((q_begin + i0 + r) * H + h) * dv);
        if (p.lse) p.lse[h * p.total_q + q_begin + i0 + r] = lse;
      }
    }
  }
}

}  // namespace

// One query row at a time, plain loops: the reference the CUDA kernel is tested against (the work is
// parts · rows · head_dim_v multiply-adds, nothing worth a faster path).
void merge_attention(const MergeParams& p) {
  const int64_t rows = p.batch * p.s_q * p.h_q, dv = p.head_dim_v;
  std::vector<float> part(static_cast<size_t>(dv)), acc(static_cast<size_t>(dv));
  for (int64_t row = 0; row < rows; ++row) {
    // out row = (b, i, h); its lse sits at (b, h, i)
    const int64_t b = row / (p.s_q * p.h_q), i = row / p.h_q % p.s_q, h = row % p.h_q;
    const int64_t lse_at = (b * p.h_q + h) * p.s_q + i;
    float m = -kInf;
    bool nan = false;
    for (int64_t k = 0; k < p.parts; ++k) {
      const float l = p.lse_parts[k * rows + lse_at];
      nan |= std::isnan(l);
      if (std::isfinite(l)) m = std::max(m, l);
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float lse = kInf;  // no part saw a key: decode_attention's marker
    if (nan) {
      std::fill(acc.begin(), acc.end(), std::numeric_limits<float>::quiet_NaN());
      lse = std::numeric_limits<float>::quiet_NaN();
    } else if (m != -kInf) {
      float sum = 0.f;
      for (int64_t k = 0; k < p.parts; ++k) {
        const float l = p.lse_parts[k * rows + lse_at];
        if (!std::isfinite(l)) continue;  // saw no key: out_p is not read
        const float w = std::exp(l - m);
        sum += w;
        load(p.out_parts, p.dtype, (k * rows + row) * dv, dv, part.data());
        for (int64_t j = 0; j < dv; ++j) acc[j] += w * part[j];
      }
      for (int64_t j = 0; j < dv; ++j) acc[j] /= sum;
      lse = m + std::log(sum);
    }
    store(acc.data(), dv, p.dtype, p.out, row * dv);
    if (p.lse) p.lse[lse_at] = lse;
  }
}

void decode_attention(const DecodeParams& p) {
  if (p.dtype == DType::BF16 && bf16_operands()) decode<uint16_t>(p);
  else decode<float>(p);
}

DecodeSchedule plan_decode_attention(const DecodeParams&) {
  DecodeSchedule s;
  s.kernel = "cpu";
  return s;
}

void prefill_attention(const PrefillParams& p) {
  if (p.dtype == DType::BF16 && bf16_operands()) prefill<uint16_t>(p);
  else prefill<float>(p);
}

}  // namespace mla::cpu
