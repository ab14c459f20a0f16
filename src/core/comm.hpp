// What the Communicator forwards to: one NCCL rank (src/cuda/nccl.cpp). Only CUDA builds define the factories.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mla/dtype.hpp"

namespace mla::detail {

class CommImpl {
 public:
  virtual ~CommImpl() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual int device() const = 0;
  virtual void* nccl_comm() const = 0;
  virtual void all_reduce_sum(const void* send, void* recv, int64_t count, DType dtype, void* stream) const = 0;
  virtual void all_gather(const void* send, void* recv, int64_t count, DType dtype, void* stream) const = 0;
};

#ifdef MLA_WITH_CUDA
std::vector<std::unique_ptr<CommImpl>> nccl_local(std::span<const int> devices);
std::unique_ptr<CommImpl> nccl_wrap(void* nccl_comm);
std::string nccl_unique_id();
// id: kUniqueIdBytes bytes; rank in [0, world) (checked by the caller).
std::unique_ptr<CommImpl> nccl_from_unique_id(const std::string& id, int rank, int world, int device);
void nccl_group_start();
void nccl_group_end();
#endif

}  // namespace mla::detail
