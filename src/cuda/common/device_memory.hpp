// Owning device allocations (cudaMalloc), pinned host staging (cudaMallocHost) and the backend's Buffer over them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "core/backend.hpp"
#include "cuda/common/check.hpp"

namespace mla::cuda {

namespace memory {
inline cudaError_t device_alloc(void** p, size_t bytes) { return cudaMalloc(p, bytes); }
inline cudaError_t device_free(void* p) { return cudaFree(p); }
inline cudaError_t pinned_alloc(void** p, size_t bytes) { return cudaMallocHost(p, bytes); }
inline cudaError_t pinned_free(void* p) { return cudaFreeHost(p); }
}  // namespace memory

// An untyped allocation that only grows, through Alloc / Free. kGeometric: grow to at least twice the old size
// (for memory whose allocation is expensive).
template <cudaError_t (*Alloc)(void**, size_t), cudaError_t (*Free)(void*), bool kGeometric>
class GrowingArray {
 public:
  GrowingArray() = default;
  explicit GrowingArray(int64_t bytes) { reserve(bytes); }
  ~GrowingArray() { release(); }
  GrowingArray(const GrowingArray&) = delete;
  GrowingArray& operator=(const GrowingArray&) = delete;
  GrowingArray(GrowingArray&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  GrowingArray& operator=(GrowingArray&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }

  // Grows to at least `bytes` (contents are lost when it grows). Returns whether it reallocated: whoever baked
  // the address into something (a CUDA graph) must know it moved.
  bool reserve(int64_t bytes) {
    if (bytes <= bytes_) return false;
    const int64_t grown = kGeometric ? std::max({bytes, 2 * bytes_, int64_t{4096}}) : bytes;
    release();
    MLA_CUDA_CHECK(Alloc(&ptr_, static_cast<size_t>(grown)));
    bytes_ = grown;
    return true;
  }
  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  int64_t bytes() const { return bytes_; }

 private:
  void release() {
    if (ptr_) Free(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// Device memory (workspaces, staging).
using DeviceArray = GrowingArray<memory::device_alloc, memory::device_free, false>;

// Page-locked host memory: copies from it are truly asynchronous, where a copy from pageable memory is staged
// through a driver buffer and returns only once the source was consumed. That also means the owner must not
// rewrite it while a copy from it may still be in flight. Geometric growth: cudaMallocHost costs far more than
// a cudaMalloc.
using PinnedArray = GrowingArray<memory::pinned_alloc, memory::pinned_free, true>;

// The page pool and run_sequences' staging buffers: zero-initialised device memory.
class DeviceBuffer final : public detail::Buffer {
 public:
  explicit DeviceBuffer(int64_t bytes) : mem_(bytes > 0 ? bytes : 1) {
    MLA_CUDA_CHECK(cudaMemset(mem_.get(), 0, static_cast<size_t>(mem_.bytes())));
  }
  void* data() override { return mem_.get(); }
  void copy_to_host(int64_t offset, int64_t bytes, void* dst) const override {
    MLA_CUDA_CHECK(cudaMemcpy(dst, mem_.get<char>() + offset, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost));
  }
  void copy_from_host(int64_t offset, int64_t bytes, const void* src) override {
    MLA_CUDA_CHECK(cudaMemcpy(mem_.get<char>() + offset, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice));
  }

 private:
  DeviceArray mem_;
};

}  // namespace mla::cuda
