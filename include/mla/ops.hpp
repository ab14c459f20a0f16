// Attention kernels as plain functions, for engines that keep their own cache and projections.
// All pointers are in the named device's memory (host memory for "cpu" / "cpu-reference").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "mla/cache.hpp"
#include "mla/dtype.hpp"

namespace mla {

// Absorbed-form decode, the semantics of FlashMLA's flash_mla_with_kvcache: MQA with one latent KV head,
// key = the whole row (head_dim wide), value = its first head_dim_v columns.
// Causal with s_q > 1 is bottom-right aligned: query i of sequence b sees keys t < seqlen_b − (s_q − 1 − i).
// A sequence of length 0 (or a query that sees no key) gives out = 0 and lse = +inf... see docs/ops.md.
struct DecodeParams {
  int64_t batch = 0, s_q = 1, h_q = 0;
  int64_t head_dim = 576, head_dim_v = 512;
  int64_t page_size = 64;         // power of two
  int64_t num_pages = 0;          // pages in kv_cache
  int64_t max_pages = 0;          // block_table row length
  DType dtype = DType::BF16;      // of q, kv_cache and out: BF16, F16 or F32
  // FlashMLA's is_fp8_kvcache: kv_cache rows in the fp8_ds_mla layout (mla/cache.hpp RowLayout with latent =
  // head_dim_v, rope = head_dim - head_dim_v: [num_pages, page_size, 1, 656] bytes for 576/512); dtype BF16.
  bool fp8_kv_cache = false;
  const void* q = nullptr;        // [batch, s_q, h_q, head_dim]
  const void* kv_cache = nullptr; // [num_pages, page_size, 1, head_dim] of dtype, or of fp8 rows
  const int32_t* block_table = nullptr;    // [batch, max_pages]
  const int32_t* cache_seqlens = nullptr;  // [batch]
  float softmax_scale = 0.f;
  bool causal = false;
  void* out = nullptr;            // [batch, s_q, h_q, head_dim_v], dtype
  float* lse = nullptr;           // [batch, h_q, s_q] natural-log sum of exp(scale·logits); may be null
};

// The layout of one kv_cache row of a decode: head_dim values of dtype, or the fp8_ds_mla row.
inline RowLayout kv_cache_row(const DecodeParams& p) {
  return {.dtype = p.fp8_kv_cache ? DType::F8_E4M3 : p.dtype, .latent = p.head_dim_v, .rope = p.head_dim - p.head_dim_v};
}

// Merge of `parts` decode results over disjoint sets of keys (split-KV, context parallelism: each part attended
// over a slice of a sequence's keys). Per query row, with lse = ln Σ_p exp(lse_p):
//   out = Σ_p exp(lse_p − lse) · out_p
// computed in fp32 (subtracting the largest lse_p first), rounded to dtype once. A part with an infinite lse_p saw
// no key: +inf is decode_attention's marker for that, −inf is ln 0; its out_p is never read (it may hold anything,
// NaN included) and its weight is 0. A row that no part saw a key for gives out = 0 and lse = +inf, exactly as
// decode_attention over the union of the keys. A NaN lse_p propagates to that row's out and lse. The shapes are
// decode_attention's, with the parts stacked in front (what an all-gather of every rank's out and lse gives).
struct MergeParams {
  int64_t parts = 0;
  int64_t batch = 0, s_q = 1, h_q = 0;
  int64_t head_dim_v = 512;
  DType dtype = DType::BF16;         // of out_parts and out: BF16, F16 or F32 (BF16 or F32 on "cuda")
  const void* out_parts = nullptr;   // [parts, batch, s_q, h_q, head_dim_v]
  const float* lse_parts = nullptr;  // [parts, batch, h_q, s_q]
  void* out = nullptr;               // [batch, s_q, h_q, head_dim_v]; must not overlap out_parts
  float* lse = nullptr;              // [batch, h_q, s_q]; may be null
};

// Throws mla::InvalidArgument naming the parameter. `stream`: a cudaStream_t on "cuda" (null: the legacy default
// stream; asynchronous, allocates nothing, capturable in a CUDA graph); ignored on the CPU.
void merge_attention(std::string_view device, const MergeParams& params, void* stream = nullptr);

// Expanded-form (prefill) attention over variable-length sequences packed along the token axis.
// Causal is bottom-right aligned: query i of a sequence with n_q queries and n_k keys sees keys
// t <= n_k − n_q + i.
struct PrefillParams {
  int64_t batch = 0, num_heads = 0;
  int64_t head_dim_qk = 192, head_dim_v = 128;
  int64_t total_q = 0, total_k = 0;
  DType dtype = DType::BF16;      // of q, k, v and out: BF16, F16 or F32
  const int32_t* cu_seqlens_q = nullptr;   // [batch + 1], host memory (device memory: cu_seqlens_on_device)
  const int32_t* cu_seqlens_k = nullptr;   // [batch + 1], host memory (device memory: cu_seqlens_on_device)
  // "cuda" only: cu_seqlens_q/k are in the device's memory (as flash-attention takes them). Hopper's bf16 192/128
  // kernel reads them itself (one launch, nothing synchronised, capturable in a CUDA graph; lengths are not
  // validated, every bound is clamped into the tensors); the other kernels copy them to the host on the call's
  // stream (one synchronising copy) and check them there.
  bool cu_seqlens_on_device = false;
  const void* q = nullptr;        // [total_q, num_heads, head_dim_qk]
  const void* k = nullptr;        // [total_k, num_heads, head_dim_qk]
  const void* v = nullptr;        // [total_k, num_heads, head_dim_v]
  float softmax_scale = 0.f;
  bool causal = true;
  void* out = nullptr;            // [total_q, num_heads, head_dim_v]
  float* lse = nullptr;           // [num_heads, total_q]; may be null
};

// Throw mla::InvalidArgument naming the parameter for bad shapes, dtypes or unsupported combinations.
void decode_attention(std::string_view device, const DecodeParams& params);
void prefill_attention(std::string_view device, const PrefillParams& params);
// The same on a given stream: a cudaStream_t on "cuda" (null: the legacy default stream); ignored on the CPU.
void prefill_attention(std::string_view device, const PrefillParams& params, void* stream);

// The backward of prefill_attention (training): the gradients of q, k and v given forward's out and lse and
// the gradient d_out of the loss with respect to out. With P = softmax(scale·q·kᵀ) recomputed from lse (masked as
// the forward), D_i = Σ_e d_out_ie·out_ie, dP = d_out·vᵀ, dS = P ⊙ (dP − D):
//   d_q = scale·dS·k,  d_k = scale·dSᵀ·q,  d_v = Pᵀ·d_out     (fp32 accumulation)
// A query that sees no key (lse = +inf, as the forward writes) contributes nothing; a key no query sees gets 0.
// Shapes, masks and cu_seqlens as PrefillParams (cu_seqlens_on_device: "cuda" only, copied to the host on the
// stream, one synchronising copy). dtype BF16 or F32 ("cuda": fast kernels for BF16 192/128, generic fp32 kernels otherwise).
struct PrefillBackwardParams {
  int64_t batch = 0, num_heads = 0;
  int64_t head_dim_qk = 192, head_dim_v = 128;
  int64_t total_q = 0, total_k = 0;
  DType dtype = DType::BF16;      // of q, k, v, out, d_out, d_q, d_k, d_v
  const int32_t* cu_seqlens_q = nullptr;   // [batch + 1]
  const int32_t* cu_seqlens_k = nullptr;   // [batch + 1]
  bool cu_seqlens_on_device = false;
  const void* q = nullptr;        // [total_q, num_heads, head_dim_qk]
  const void* k = nullptr;        // [total_k, num_heads, head_dim_qk]
  const void* v = nullptr;        // [total_k, num_heads, head_dim_v]
  const void* out = nullptr;      // [total_q, num_heads, head_dim_v] forward's output
  const float* lse = nullptr;     // [num_heads, total_q] forward's log-sum-exp (natural log)
  const void* d_out = nullptr;    // [total_q, num_heads, head_dim_v]
  float softmax_scale = 0.f;
  bool causal = true;
  void* d_q = nullptr;            // [total_q, num_heads, head_dim_qk] written
  void* d_k = nullptr;            // [total_k, num_heads, head_dim_qk] written
  void* d_v = nullptr;            // [total_k, num_heads, head_dim_v] written
  // Scratch of at least prefill_attention_backward_workspace_bytes in the device's memory, owned by the caller;
  // may be null when that is 0 (the CPU). The op allocates nothing else (but the host copy of device cu_seqlens).
  void* workspace = nullptr;
};

// Scratch the backward needs on `device`, in bytes: 0 on the CPU; on "cuda" an fp32 d_q accumulator and the
// rows' D (4·total_q·num_heads·(head_dim_qk + 1) bytes, 256-aligned). Depends only on the shape fields.
int64_t prefill_attention_backward_workspace_bytes(std::string_view device, const PrefillBackwardParams& params);
// `stream`: a cudaStream_t on "cuda" (null: the legacy default stream); ignored on the CPU. Throws
// mla::InvalidArgument naming the parameter.
void prefill_attention_backward(std::string_view device, const PrefillBackwardParams& params, void* stream = nullptr);

// Plan/run decode (docs/ops.md, "Planned decode and CUDA graphs"). The plan depends only on the batch shape
// (batch, s_q, h_q, head dims, dtype; pointers and lengths may be unset); the run takes a workspace of
// workspace_bytes that the caller owns (device memory of that device; may be null when 0) and allocates
// nothing, synchronises nothing and reads no device data on the host, so on "cuda" it can be captured in a
// CUDA graph and replayed with new q / cache_seqlens / block_table contents at the same addresses.
struct DecodeSchedule {
  std::string device;           // the device it was planned for
  std::string kernel;           // which kernel the run launches ("sm90-bf16-576", "generic", "cpu", ...)
  int64_t workspace_bytes = 0;  // scratch the run needs (split-KV partials, work list); 0 on the CPU
  int64_t batch = 0, s_q = 0, h_q = 0, head_dim = 0, head_dim_v = 0;  // the shape it was planned for
  DType dtype = DType::BF16;
  bool fp8_kv_cache = false;
};
DecodeSchedule plan_decode_attention(std::string_view device, const DecodeParams& params);
// `stream` is a cudaStream_t on "cuda" (null: the legacy default stream); ignored on the CPU backends.
// Throws InvalidArgument when params' shape differs from the schedule's or workspace is null but needed.
// `splits_ready`: the workspace already holds the split-KV work list of this batch's cache_seqlens (written by
// split_decode_attention or by an earlier run with the same lengths, schedule and workspace), so the run skips
// computing it.
void decode_attention(std::string_view device, const DecodeParams& params, const DecodeSchedule& schedule,
                      void* workspace, void* stream = nullptr, bool splits_ready = false);
// Writes that work list into the workspace: the part of a run that depends only on the batch shape and
// cache_seqlens (FlashMLA's get_mla_metadata). An engine whose layers decode the same sequences in a step runs
// it once per step and passes splits_ready = true to every layer's call (in stream order, one workspace): one
// scheduler launch per step instead of one per layer. No-op where the schedule needs no workspace.
void split_decode_attention(std::string_view device, const DecodeParams& params, const DecodeSchedule& schedule,
                            void* workspace, void* stream = nullptr);

}  // namespace mla
