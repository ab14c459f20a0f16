// Hopper asynchronous copies and barriers for the sm90 kernels: mbarriers with transaction counts, 2-D tensor
// (TMA) loads that complete on them, and named barriers between warpgroups. PTX ISA: "mbarrier",
// "cp.async.bulk.tensor", "bar".
#pragma once

#include <cstdint>

#include "cuda/sm80/mma.cuh"

namespace mla::cuda::sm90 {

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(sm80::smem_addr(bar)), "r"(count) : "memory");
}

// Makes initialised barriers visible to the async proxy (the tensor copies that complete on them).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of tensor copies the current phase waits for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sm80::smem_addr(bar)), "r"(bytes)
               : "memory");
}

// A plain arrival (the barrier's expected count includes this thread).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(sm80::smem_addr(bar)) : "memory");
}

// Spins until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n}\n" ::"r"(sm80::smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Tensor copy of the box at (c0 = column, c1 = row) of a 2-D tensor map into shared memory; completes `bytes`
// (the box size) on `bar`. The map must be a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_2d(void* smem, const void* tensor_map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          sm80::smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(sm80::smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// The same for a 3-D tensor map (c0 = column, c1, c2 the outer coordinates).
__device__ __forceinline__ void tma_load_3d(void* smem, const void* tensor_map, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::
          "r"(sm80::smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(sm80::smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// 4 bytes global → shared by cp.async (zeros instead of reading when !valid), and an arrival on `bar` once all of
// this thread's earlier cp.async copies have landed; .noinc: the barrier's expected count includes it.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sm80::smem_addr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(sm80::smem_addr(bar)) : "memory");
}

// Element-wise add of a shared-memory box into a 3-D tensor (cp.reduce.async.bulk.tensor, .add): elements
// outside the tensor are skipped. Completion is tracked by bulk groups: commit, then wait until the shared source
// has been read (before it is rewritten) or until the writes are done (before the block exits).
__device__ __forceinline__ void tma_reduce_add_3d(const void* tensor_map, const void* smem, int c0, int c1, int c2) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(tensor_map)),
      "r"(sm80::smem_addr(smem)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Register budget of a warpgroup after warp specialisation (all its threads execute it; multiple of 8).
template <int kRegisters>
__device__ __forceinline__ void set_max_registers_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void set_max_registers_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Named barriers (ids 1..15; 0 is __syncthreads): `count` threads in all, arriving ones do not wait.
__device__ __forceinline__ void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

}  // namespace mla::cuda::sm90
