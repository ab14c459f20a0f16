// Multi-GPU MLA over NCCL (docs/parallel.md): the communicator, tensor parallelism over heads
// (LayerOptions::communicator) and context-parallel decode (context_parallel_decode). NCCL exists only in CUDA
// builds; without CUDA the types exist and every factory throws mla::Error saying so. This header includes no
// NCCL or CUDA header: communicators and streams cross it as void*.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mla/dtype.hpp"
#include "mla/ops.hpp"

namespace mla {

namespace detail {
class CommImpl;
}

// One rank of an NCCL communicator: rank() of world(), running on CUDA device device().
//
// Collectives are asynchronous on the given stream (a cudaStream_t on device(); null: the legacy default
// stream), allocate nothing and can be captured in a CUDA graph. Like every NCCL collective they complete only
// once every rank has issued its matching call: one process per GPU issues its calls from its own thread; one
// thread driving several ranks brackets their calls with group_start() / group_end() (ncclGroupStart/End), or it
// waits for ranks it has not yet issued. NCCL_NVLS_ENABLE=0 keeps NVLink multicast off (the lent machines need it
// off; set it before the first communicator is created).
class Communicator {
 public:
  // One process driving several GPUs (ncclCommInitAll): communicator r runs on CUDA device devices[r] as rank r
  // of devices.size(). Throws mla::Error naming NCCL's reason, or saying that the build has no CUDA/NCCL.
  static std::vector<Communicator> local(std::span<const int> devices);
  // Wraps a communicator an engine already has (an ncclComm_t passed as void*: ncclCommInitRank across
  // processes, torch.distributed's NCCL process group): not owned, never destroyed here. rank(), world() and
  // device() are what NCCL reports for it (ncclCommUserRank, ncclCommCount, ncclCommCuDevice).
  static Communicator wrap(void* nccl_comm);
  // One process per GPU, the way vLLM and SGLang run: rank 0 calls unique_id(), sends the bytes to every other
  // process by any means (torch.distributed, a file, a socket), and each process calls from_unique_id(id, its
  // rank, world, its device). unique_id() is ncclGetUniqueId's ncclUniqueId as a std::string of exactly
  // kUniqueIdBytes bytes (binary, not text; bytes in Python). from_unique_id is ncclCommInitRank on `device`
  // (made current for the call, then the caller's device is restored) and returns only once all `world` ranks
  // have called it; the communicator is owned (ncclCommDestroy when it is destroyed). Throws
  // mla::InvalidArgument naming a bad argument (world < 1, rank outside [0, world), an id of another size, a
  // device that does not exist), mla::Error naming NCCL's reason, or mla::Error saying the build has no
  // CUDA/NCCL (the arguments are checked first, in every build).
  static constexpr size_t kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES
  static std::string unique_id();
  static Communicator from_unique_id(const std::string& id, int rank, int world, int device);
  // ncclGroupStart / ncclGroupEnd: collectives of several communicators issued by one thread between them are
  // launched together at group_end(). Groups nest.
  static void group_start();
  static void group_end();

  ~Communicator();
  Communicator(Communicator&&) noexcept;
  Communicator& operator=(Communicator&&) noexcept;

  int rank() const;
  int world() const;
  int device() const;
  void* nccl_comm() const;  // the ncclComm_t

  // recv[i] = Σ over ranks of send[i], count elements of dtype (F32, BF16 or F16) in device memory; send may
  // equal recv.
  void all_reduce_sum(const void* send, void* recv, int64_t count, DType dtype, void* stream) const;
  // recv [world, count] = every rank's send [count] in rank order; send may be recv + rank · count (in place).
  void all_gather(const void* send, void* recv, int64_t count, DType dtype, void* stream) const;

 private:
  explicit Communicator(std::unique_ptr<detail::CommImpl> impl);
  std::unique_ptr<detail::CommImpl> impl_;
};

// Context parallelism: the tokens of every sequence are spread over `world` ranks by pages, round-robin: page j
// of a sequence (tokens [j·page_size, (j+1)·page_size)) lives on rank j % world. Each rank's share is an ordinary
// paged cache with its own block tables, a new token is written by one rank only, and the ranks' shares differ
// by at most one page. The number of a sequence's first `length` tokens that `rank` holds:
int64_t context_parallel_length(int64_t length, int64_t page_size, int64_t rank, int64_t world);

// The plan of a context-parallel decode: the local decode's schedule and the workspace the whole call needs.
struct ContextParallelPlan {
  DecodeSchedule decode;        // of the local decode (on "cuda")
  int world = 0;                // the communicator's size it was planned for
  int64_t workspace_bytes = 0;  // decode.workspace_bytes + the gathered partials (see context_parallel_decode)
};
ContextParallelPlan plan_context_parallel_decode(const Communicator& comm, const DecodeParams& local);

// One decode step over a cache spread by context_parallel_length, on every rank of comm (each rank calls it
// with its own `local`, from its own thread or process, not inside group_start()): the absorbed decode over
// the rank's tokens (local.kv_cache, block_table and cache_seqlens are the rank's share; q is every rank's same
// query), an all-gather of every rank's (out, lse) through NCCL, then merge_attention. local.out and local.lse
// receive the result over all ranks' tokens on every rank (lse may be null). Bytes sent per rank and step:
// batch · s_q · h_q · (head_dim_v · element size + 4). The workspace (device memory of comm.device(), at least
// plan.workspace_bytes) holds the local decode's scratch and the gathered [world, ...] out and lse.
// Asynchronous on `stream`, allocates nothing: capturable in a CUDA graph. Queries must see every key of a
// rank's share: s_q = 1, or causal = false (a causal s_q > 1 step would need each page's global positions).
void context_parallel_decode(const Communicator& comm, const DecodeParams& local, const ContextParallelPlan& plan,
                             void* workspace, void* stream);

}  // namespace mla
