// The NCCL rank behind mla::Communicator (mla/parallel.hpp). Every NCCL failure becomes mla::Error naming the
// call and NCCL's reason (and its last error message, which says which rank or transport failed).
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/comm.hpp"
#include "cuda/common/check.hpp"
#include "mla/error.hpp"
#include "mla/parallel.hpp"

namespace mla::cuda {
namespace {

[[noreturn]] void nccl_fail(ncclResult_t r, const char* call, ncclComm_t comm) {
  std::string msg = std::string("nccl: ") + call + " failed: " + ncclGetErrorString(r);
  if (const char* last = ncclGetLastError(comm); last && *last) msg += std::string(" (") + last + ")";
  throw Error(msg);
}

#define MLA_NCCL_CHECK(call, comm)                                                \
  do {                                                                            \
    const ncclResult_t mla_nccl_ = (call);                                        \
    if (mla_nccl_ != ncclSuccess) ::mla::cuda::nccl_fail(mla_nccl_, #call, comm); \
  } while (0)

ncclDataType_t nccl_type(DType t, const char* op) {
  switch (t) {
    case DType::F32:
      return ncclFloat32;
    case DType::BF16:
      return ncclBfloat16;
    case DType::F16:
      return ncclFloat16;
    default:
      throw InvalidArgument(std::string("Communicator::") + op + ": dtype " + std::string(dtype_name(t)) +
                            " is not supported (F32, BF16 or F16)");
  }
}

void check_count(int64_t count, const char* op) {
  if (count < 0)
    throw InvalidArgument(std::string("Communicator::") + op + ": count must be >= 0, got " + std::to_string(count));
}

class NcclRank final : public detail::CommImpl {
 public:
  NcclRank(ncclComm_t comm, bool owned) : comm_(comm), owned_(owned) {
    MLA_NCCL_CHECK(ncclCommUserRank(comm_, &rank_), comm_);
    MLA_NCCL_CHECK(ncclCommCount(comm_, &world_), comm_);
    MLA_NCCL_CHECK(ncclCommCuDevice(comm_, &device_), comm_);
  }
  ~NcclRank() override {
    if (owned_) ncclCommDestroy(comm_);  // waits for the rank's outstanding collectives
  }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  int device() const override { return device_; }
  void* nccl_comm() const override { return comm_; }

  void all_reduce_sum(const void* send, void* recv, int64_t count, DType dtype, void* stream) const override {
    check_count(count, "all_reduce_sum");
    MLA_NCCL_CHECK(ncclAllReduce(send, recv, static_cast<size_t>(count), nccl_type(dtype, "all_reduce_sum"), ncclSum,
                                 comm_, static_cast<cudaStream_t>(stream)),
                   comm_);
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dtype, void* stream) const override {
    check_count(count, "all_gather");
    MLA_NCCL_CHECK(ncclAllGather(send, recv, static_cast<size_t>(count), nccl_type(dtype, "all_gather"), comm_,
                                 static_cast<cudaStream_t>(stream)),
                   comm_);
  }

 private:
  ncclComm_t comm_;
  bool owned_;
  int rank_ = 0, world_ = 0, device_ = 0;
};

}  // namespace
}  // namespace mla::cuda

namespace mla::detail {

std::vector<std::unique_ptr<CommImpl>> nccl_local(std::span<const int> devices) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    count = 0;
  }
  if (devices.empty()) throw InvalidArgument("Communicator::local: devices must name at least one GPU");
  std::vector<int> seen;
  for (int d : devices) {
    if (d < 0 || d >= count)
      throw InvalidArgument("Communicator::local: device " + std::to_string(d) + " does not exist (this machine has " +
                            std::to_string(count) + " usable GPU" + (count == 1 ? "" : "s") + ")");
    if (std::find(seen.begin(), seen.end(), d) != seen.end())
      throw InvalidArgument("Communicator::local: device " + std::to_string(d) +
                            " is listed twice (NCCL needs one "
                            "rank per GPU)");
    seen.push_back(d);
  }
  std::vector<ncclComm_t> comms(devices.size());
  int restore = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&restore));  // ncclCommInitAll switches devices
  const ncclResult_t r = ncclCommInitAll(comms.data(), static_cast<int>(devices.size()), devices.data());
  cudaSetDevice(restore);
  if (r != ncclSuccess) cuda::nccl_fail(r, "ncclCommInitAll", nullptr);
  std::vector<std::unique_ptr<CommImpl>> ranks;
  for (ncclComm_t c : comms) ranks.push_back(std::make_unique<cuda::NcclRank>(c, true));
  return ranks;
}

std::unique_ptr<CommImpl> nccl_wrap(void* nccl_comm) {
  if (nccl_comm == nullptr) throw InvalidArgument("Communicator::wrap: nccl_comm must not be null");
  return std::make_unique<cuda::NcclRank>(static_cast<ncclComm_t>(nccl_comm), false);
}

static_assert(NCCL_UNIQUE_ID_BYTES == Communicator::kUniqueIdBytes);

std::string nccl_unique_id() {
  ncclUniqueId id;
  MLA_NCCL_CHECK(ncclGetUniqueId(&id), nullptr);
  return std::string(id.internal, sizeof id.internal);
}

std::unique_ptr<CommImpl> nccl_from_unique_id(const std::string& id, int rank, int world, int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    count = 0;
  }
  if (device >= count)
    throw InvalidArgument("Communicator::from_unique_id: device " + std::to_string(device) +
                          " does not exist (this machine has " + std::to_string(count) + " usable GPU" +
                          (count == 1 ? "" : "s") + ")");
  ncclUniqueId uid;
  std::copy(id.begin(), id.end(), uid.internal);
  int restore = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&restore));
  MLA_CUDA_CHECK(cudaSetDevice(device));  // ncclCommInitRank binds the rank to the current device
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, world, uid, rank);
  cudaSetDevice(restore);
  if (r != ncclSuccess) cuda::nccl_fail(r, "ncclCommInitRank", nullptr);
  return std::make_unique<cuda::NcclRank>(comm, true);
}

void nccl_group_start() { MLA_NCCL_CHECK(ncclGroupStart(), nullptr); }
void nccl_group_end() { MLA_NCCL_CHECK(ncclGroupEnd(), nullptr); }

}  // namespace mla::detail
