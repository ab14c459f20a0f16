// Entry points of the sm90 (wgmma) kernels, chosen by the sm80 launchers on Hopper.
#pragma once

#include <cuda_runtime.h>

#include "cuda/sm80/backward/config.h"
#include "cuda/sm80/decode/config.h"
#include "cuda/sm80/prefill/config.h"

namespace mla::cuda::sm90 {

// True on a compute-capability 9.0 GPU when this build has sm_90a code, unless MLA_CUDA_DISABLE_SM90 is set
// in the environment (tests and the benchmark use it to run the portable path on Hopper too).
bool usable();

namespace decode {
// Same grid and parameters as the sm80 64-row split kernel.
void launch_split(const sm80::decode::Params& p, dim3 grid, cudaStream_t stream);
}  // namespace decode

namespace prefill {
// Same parameters as the sm80 kernel (one sequence, all heads).
void run_bf16_192_128(const sm80::prefill::Params& p, cudaStream_t stream);
}  // namespace prefill

namespace backward {
// The same call as the sm80 kernels' (per-sequence launches from host cu_seqlens).
void run_bf16_192_128(const sm80::backward::Call& c, cudaStream_t stream);
}  // namespace backward

}  // namespace mla::cuda::sm90
