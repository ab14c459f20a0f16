// prefill_attention_backward on "cuda" (parameters already checked by src/core/ops.cpp): for the MLA shapes in
// bf16, the sm90 wgmma kernel on Hopper, else the sm80 mma.sync kernels (any GPU since Ampere; on Hopper with
// MLA_CUDA_DISABLE_SM90 set); every other dtype (F32) and head size on the generic kernels (backward_generic.cu:
// plain fp32 dot products, slow, exact to fp32).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/sm80/backward/config.h"
#include "cuda/sm90/launch.hpp"
#include "mla/error.hpp"

namespace mla::cuda {

int64_t prefill_backward_workspace_bytes(const PrefillBackwardParams& p) {
  return sm80::backward::workspace_bytes(p.total_q, p.num_heads, p.head_dim_qk);
}

bool fast_backward(const PrefillBackwardParams& p) {
  return p.dtype == DType::BF16 && p.head_dim_qk == sm80::backward::kHeadDimQK &&
         p.head_dim_v == sm80::backward::kHeadDimV;
}

void validate_fast(const PrefillBackwardParams& p) {
  auto bad = [](const std::string& what) { throw InvalidArgument("prefill_attention_backward (cuda): " + what); };
  if (p.num_heads > 65535) bad("num_heads must be <= 65535, got " + std::to_string(p.num_heads));
  // 16-byte cp.async loads and bf16-pair stores: every row of these tensors then starts 16-byte aligned.
  const std::pair<const char*, const void*> tensors[] = {{"q", p.q},         {"k", p.k},     {"v", p.v},
                                                         {"out", p.out},     {"d_out", p.d_out}, {"d_q", p.d_q},
                                                         {"d_k", p.d_k},     {"d_v", p.d_v}, {"workspace", p.workspace}};
  for (const auto& [name, ptr] : tensors)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) bad(std::string(name) + " must be 16-byte aligned");
}

void run_prefill_backward(const PrefillBackwardParams& p, cudaStream_t stream) {
  if (p.cu_seqlens_on_device) {
    // The kernels launch per sequence from host lengths: copy them (one synchronising copy), check them.
    const std::vector<int32_t> cu = cu_seqlens_to_host(p.cu_seqlens_q, p.cu_seqlens_k, p.batch, stream);
    PrefillBackwardParams host = p;
    host.cu_seqlens_on_device = false;
    host.cu_seqlens_q = cu.data(), host.cu_seqlens_k = cu.data() + p.batch + 1;
    mla::prefill_attention_backward("cuda", host, stream);  // the host checks, then this function again
    return;
  }
  if (!fast_backward(p)) {
    run_generic_prefill_backward(p, stream);
    return;
  }
  validate_fast(p);
  sm80::backward::Call c;
  c.batch = p.batch, c.heads = p.num_heads, c.total_q = p.total_q, c.total_k = p.total_k;
  c.cu_q = p.cu_seqlens_q, c.cu_k = p.cu_seqlens_k;
  c.q = p.q, c.k = p.k, c.v = p.v, c.out = p.out, c.d_out = p.d_out, c.lse = p.lse;
  c.scale = p.softmax_scale, c.causal = p.causal;
  c.d_q = p.d_q, c.d_k = p.d_k, c.d_v = p.d_v, c.workspace = p.workspace;
  if (sm90::usable()) sm90::backward::run_bf16_192_128(c, stream);
  else sm80::backward::run_bf16_192_128(c, stream);
}

}  // namespace mla::cuda
