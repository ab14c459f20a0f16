// The sm80 decode kernels for bf16, 576/512: scheduler, split kernel (two warp layouts, one or two K stages),
// combine.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/sm80/decode/kernel.cuh"
#include "cuda/sm90/launch.hpp"

namespace mla::cuda::sm80::decode {
namespace {

template <int kRowGroups>
void launch_split(const Params& p, int smem_limit, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.max_work) * static_cast<unsigned>(p.m_blocks));
  auto launch = [&](auto kernel, size_t bytes) {
    MLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    kernel<<<grid, kThreads, bytes, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
  };
  constexpr size_t two = sizeof(SharedMemoryPlan<2, kRowGroups>), one = sizeof(SharedMemoryPlan<1, kRowGroups>);
  if (smem_limit >= static_cast<int>(two)) {
    if (p.fp8) launch(decode_kernel<2, kRowGroups, true>, two);
    else launch(decode_kernel<2, kRowGroups, false>, two);
  } else if (smem_limit >= static_cast<int>(one)) {
    if (p.fp8) launch(decode_kernel<1, kRowGroups, true>, one);
    else launch(decode_kernel<1, kRowGroups, false>, one);
  }
  else throw InvalidArgument("decode_attention (cuda): the GPU allows " + std::to_string(smem_limit) +
                             " bytes of shared memory per block; the 576/512 kernel needs " + std::to_string(one));
}

void launch_split_sm90(const Params& p, int m_blocks, cudaStream_t stream) {
  sm90::decode::launch_split(p, dim3(static_cast<unsigned>(p.max_work) * static_cast<unsigned>(m_blocks)), stream);
}

}  // namespace

void run_bf16_576(const Params& params, int num_sms, cudaStream_t stream, bool schedule, bool attend) {
  Params p = params;
  int device = 0, smem_limit = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const bool sm90_capable = sm90::usable() && p.page_size_log2 >= 4;
  const bool fp8_rows16 = uses_fp8_rows16(p.fp8, p.rows);
  const int bm = fp8_rows16 ? 16 : block_rows(p.rows, sm90_capable, p.batch), m_blocks = (p.rows + bm - 1) / bm;
  p.m_blocks = m_blocks;
  static const bool old_grid = [] {
    const char* v = std::getenv("MLA_CUDA_DECODE_GRID");
    return v && *v == '0';
  }();
  p.rows_adjacent = !old_grid;
  if (schedule) {
    // MLA_CUDA_DECODE_MIN_TILES=n (an A/B aid, read at every call): the smallest split in 64-key tiles (default 2).
    const char* min_env = std::getenv("MLA_CUDA_DECODE_MIN_TILES");
    const int min_tiles = min_env && *min_env ? std::clamp(std::atoi(min_env), 1, 64) : kMinTilesPerSplit;
    schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p.seqlens, p.batch, m_blocks, num_sms, min_tiles,
                                                        const_cast<SequenceSchedule*>(p.schedule),
                                                        const_cast<int32_t*>(p.work), p.max_work);
    MLA_CUDA_LAUNCH_CHECK();
  }
  if (!attend) return;
  const bool sm90 = bm == 64 && sm90_capable;
  if (fp8_rows16) launch_fp8_rows16(p, smem_limit, stream);
  else if (bm == 16) launch_split<1>(p, smem_limit, stream);
  else if (sm90) launch_split_sm90(p, m_blocks, stream);
  else launch_split<4>(p, smem_limit, stream);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.rows;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, 8LL * num_sms)));
  if (sm90) {  // Hopper: a programmatic dependent of the split kernel
    launch_dependent(combine_kernel, grid, dim3(kCombineThreads), 0, stream, p);
  } else {
    combine_kernel<<<grid, kCombineThreads, 0, stream>>>(p);
    MLA_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace mla::cuda::sm80::decode
