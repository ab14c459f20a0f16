// The CUDA attention ops behind mla::decode_attention / mla::prefill_attention, and what the layer calls.
// Fast kernels exist for the shapes every released checkpoint has (bf16; decode 576/512, prefill 192/128);
// every other shape (the small golden dims) and the f32 path run the generic kernels, named "generic" in
// the plan so tests can tell which ran. F16 is rejected by name.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/common/device_memory.hpp"
#include "mla/ops.hpp"

namespace mla::cuda {

// Host side of one decode launch, computed once per batch shape (batch, s_q, h_q, dims, dtype, SM count). The
// split counts themselves come from a scheduler kernel that reads the sequence lengths on the device.
struct DecodePlan {
  std::string kernel;        // "sm90-bf16-576", "sm80-bf16-576" or "generic"
  int max_work = 0;          // upper bound of Σ splits: batch + SMs
  int64_t workspace_bytes = 0;
};

DecodePlan plan_decode(const DecodeParams& p, int num_sms);

// Runs one decode call; `workspace` grows to the plan's need (a run with a warm workspace allocates nothing).
void run_decode(const DecodeParams& p, const DecodePlan& plan, DeviceArray& workspace, cudaStream_t stream);
// Which part of a split-KV decode to run: the work list from cache_seqlens (kSplit), the attention from a work list
// already in the workspace (kAttend), or both (kAll).
enum class DecodeStage { kAll, kSplit, kAttend };

// The same with a caller-owned workspace of at least plan.workspace_bytes: allocates and synchronises nothing
// (capturable in a CUDA graph). Stages other than kAll concern the split-KV kernels only (the generic kernel has
// no work list: kSplit does nothing, kAttend runs it).
void run_decode(const DecodeParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream,
                DecodeStage stage = DecodeStage::kAll);

// Strided keys and values for the fast prefill kernels (one sequence's token t at row k_offset + t; see
// sm80::prefill::Params): the layer reads K_nope and V straight from the expansion GEMM's output and the
// shared rope key from the latent rows, with no copy. Row starts must be multiples of 8 elements; k_split
// must be 128 (sm80::prefill::kStridedSplit, d_nope of every released MLA model).
struct PrefillLayout {
  const void* k = nullptr;
  int64_t k_row = 0, k_head = 0;
  const void* k_tail = nullptr;
  int64_t k_tail_row = 0, k_tail_head = 0;
  int k_split = 0;
  const void* v = nullptr;
  int64_t v_row = 0, v_head = 0;
};

// cu_seqlens in host memory: one launch per sequence; in device memory (p.cu_seqlens_on_device) and Hopper's fast
// kernel: one launch for the batch, nothing read on the host (else the lengths are copied to the host first).
// `layout` (fast kernels only, see prefill_is_fast) replaces p.k / p.v and their dense layout.
std::string prefill_kernel_name(const PrefillParams& p);
// Device cu_seqlens_q and cu_seqlens_k ([batch + 1] each) copied to the host on `stream`, which it synchronises:
// [cu_q..., cu_k...].
std::vector<int32_t> cu_seqlens_to_host(const int32_t* cu_q, const int32_t* cu_k, int64_t batch, cudaStream_t stream);
bool prefill_is_fast(const PrefillParams& p);
void run_prefill(const PrefillParams& p, cudaStream_t stream, const PrefillLayout* layout = nullptr);

// merge_attention (src/cuda/common/merge.cu): parameters already checked by src/core/ops.cpp; F16 refused by name.
void run_merge(const MergeParams& p, cudaStream_t stream);

// prefill_attention_backward (src/cuda/common/backward.cpp): the sm80 kernels for BF16 with head dims 192/128,
// the generic kernels (backward_generic.cu) for the rest; the workspace holds the fast path's fp32 d_q
// accumulator and every row's D (the generic kernels use D's part only).
int64_t prefill_backward_workspace_bytes(const PrefillBackwardParams& p);
void run_prefill_backward(const PrefillBackwardParams& p, cudaStream_t stream);
void run_generic_prefill_backward(const PrefillBackwardParams& p, cudaStream_t stream);
void validate(const PrefillBackwardParams& p);

// Throw mla::InvalidArgument naming the parameter.
void validate(const DecodeParams& p);
void validate_shape(const DecodeParams& p);  // the same without the pointer checks (plans)
void validate(const PrefillParams& p);

}  // namespace mla::cuda
