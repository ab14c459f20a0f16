// CPU implementations of the kernel-level ops in mla/ops.hpp (parameters already validated by src/core/ops.cpp).
#pragma once

#include "mla/ops.hpp"

namespace mla::cpu {

void decode_attention(const DecodeParams& params);
// Plan of the CPU decode: kernel "cpu", no workspace (the run is decode_attention(params)).
DecodeSchedule plan_decode_attention(const DecodeParams& params);
void prefill_attention(const PrefillParams& params);
void merge_attention(const MergeParams& params);
// The backward of prefill (cpu/ops_backward.cpp): the fast path, f32 GEMMs per (sequence, head) and query tile,
// and the scalar reference in double (the "cpu-reference" backend's).
void prefill_attention_backward(const PrefillBackwardParams& params);
void prefill_attention_backward_reference(const PrefillBackwardParams& params);

}  // namespace mla::cpu
