// Owning device allocations (cudaMalloc), pinned host staging (cudaMallocHost) and the backend's Buffer over them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "core/backend.hpp"
#include "cuda/common/check.hpp"

namespace mla::cuda {

// An untyped device allocation that only grows (workspaces, staging).
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(int64_t bytes) { reserve(bytes); }
  ~DeviceArray() { release(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
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
    release();
    MLA_CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(bytes)));
    bytes_ = bytes;
    return true;
  }
  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  int64_t bytes() const { return bytes_; }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// Page-locked host memory (cudaMallocHost) that only grows: copies from it are truly asynchronous, where a
// copy from pageable memory is staged through a driver buffer and returns only once the source was consumed.
// That also means the owner must not rewrite it while a copy from it may still be in flight. Growth is
// geometric because cudaMallocHost costs far more than a cudaMalloc.
class PinnedArray {
 public:
  PinnedArray() = default;
  ~PinnedArray() { release(); }
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;

  // Grows to at least `bytes` (contents are lost when it grows). Returns whether it reallocated.
  bool reserve(int64_t bytes) {
    if (bytes <= bytes_) return false;
    const int64_t grown = std::max({bytes, 2 * bytes_, int64_t{4096}});
    release();
    MLA_CUDA_CHECK(cudaMallocHost(&ptr_, static_cast<size_t>(grown)));
    bytes_ = grown;
    return true;
  }
  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  int64_t bytes() const { return bytes_; }

 private:
  void release() {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

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
