// Error checks for CUDA runtime and cuBLASLt calls: every failure becomes mla::Error naming the call.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "mla/error.hpp"

namespace mla::cuda {

[[noreturn]] inline void fail(const char* what, const char* call, const char* file, int line) {
  throw Error(std::string("cuda: ") + call + " failed: " + what + " (" + file + ":" + std::to_string(line) + ")");
}

}  // namespace mla::cuda

#define MLA_CUDA_CHECK(call)                                                                 \
  do {                                                                                       \
    const cudaError_t mla_err_ = (call);                                                     \
    if (mla_err_ != cudaSuccess) ::mla::cuda::fail(cudaGetErrorString(mla_err_), #call, __FILE__, __LINE__); \
  } while (0)

#define MLA_CUBLAS_CHECK(call)                                                               \
  do {                                                                                       \
    const cublasStatus_t mla_st_ = (call);                                                   \
    if (mla_st_ != CUBLAS_STATUS_SUCCESS)                                                    \
      ::mla::cuda::fail(cublasLtGetStatusString(mla_st_), #call, __FILE__, __LINE__);       \
  } while (0)

// After a kernel launch: configuration errors surface here, not at the next synchronising call.
#define MLA_CUDA_LAUNCH_CHECK() MLA_CUDA_CHECK(cudaGetLastError())
