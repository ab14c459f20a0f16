// The online softmax's row-maximum step of the sm80 decode kernels, whose warps split a tile's keys: each thread's
// two C-fragment rows (lane/4 and lane/4 + 8 of its warp's 16) are reduced over the quad and published in shared
// memory for the other key groups; after a barrier, every thread takes the new running maximum of its rows.
#pragma once

#include <cmath>

namespace mla::cuda::sm80::decode {

// tile_max[i]: row r_local[i]'s maximum over this thread's columns; on return, over the quad's, and stored (by the
// quad's first lane) at row_max[group][r_local[i]].
template <int kRows>
__device__ __forceinline__ void publish_row_max(float (&tile_max)[2], float (*row_max)[kRows], int group,
                                                const int (&r_local)[2], int lane) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
    if (lane % 4 == 0) row_max[group][r_local[i]] = tile_max[i];
  }
}

// After the barrier: row r's new running maximum over the kGroups published maxima and m_run (updated); alpha gets
// the factor for what was accumulated so far. Returns the maximum to subtract: 0 while no key has been seen, so
// that everything stays 0.
template <int kGroups, int kRows>
__device__ __forceinline__ float advance_row_max(float& m_run, const float (*row_max)[kRows], int r, float& alpha) {
  float m_new = m_run;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) m_new = fmaxf(m_new, row_max[g][r]);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  alpha = exp2f(m_run - m_use);
  m_run = m_new;
  return m_use;
}

}  // namespace mla::cuda::sm80::decode
