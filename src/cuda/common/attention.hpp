// The CUDA attention ops behind mla::decode_attention / mla::prefill_attention, and what the layer calls.
// Fast kernels exist for the shapes every released checkpoint has (bf16; decode 576/512, prefill 192/128);
// every other shape (the small golden dims) and the f32 path run the generic kernels, named "generic" in
// the plan so tests can tell which ran. F16 is rejected by name.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/common/device_memory.hpp"
#include "mla/ops.hpp"

namespace mla::cuda {

// Scheduling of one decode launch, computed once per batch shape (batch, s_q, h_q, max keys, dtype, dims).
struct DecodePlan {
  std::string kernel;        // "sm80-bf16-576" or "generic"
  int splits = 1;            // key ranges per sequence (partials merged by the combine kernel when > 1)
  int keys_per_split = 0;    // multiple of 64
  int64_t workspace_bytes = 0;
};

DecodePlan plan_decode(const DecodeParams& p, int num_sms);

// Runs one decode call; `workspace` grows to the plan's need (a run with a warm workspace allocates nothing).
void run_decode(const DecodeParams& p, const DecodePlan& plan, DeviceArray& workspace, cudaStream_t stream);

// cu_seqlens in host memory: one launch per sequence.
std::string prefill_kernel_name(const PrefillParams& p);
void run_prefill(const PrefillParams& p, cudaStream_t stream);

// Throw mla::InvalidArgument naming the parameter.
void validate(const DecodeParams& p);
void validate(const PrefillParams& p);

}  // namespace mla::cuda
