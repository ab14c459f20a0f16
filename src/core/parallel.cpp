// The Communicator's handle (NCCL itself is in src/cuda/nccl.cpp) and context-parallel decode, which needs only
// the public ops and the communicator's all-gather. Semantics: mla/parallel.hpp, docs/parallel.md.
#include "mla/parallel.hpp"

#include <string>
#include <utility>

#include "core/comm.hpp"
#include "mla/error.hpp"

namespace mla {
namespace {

#ifndef MLA_WITH_CUDA
[[noreturn]] void no_nccl(const char* what) {
  throw Error(std::string(what) +
              ": this build of mla has no CUDA support and so no NCCL; configure with "
              "-DMLA_WITH_CUDA=ON (NCCL comes with the CUDA toolkit)");
}
#endif

std::string str(int64_t v) { return std::to_string(v); }

int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// The gathered partials of a context-parallel decode, after the local decode's workspace.
struct CpWorkspace {
  int64_t out = 0, lse = 0, bytes = 0;
  CpWorkspace(const DecodeParams& p, int64_t decode_bytes, int world) {
    const int64_t rows = p.batch * p.s_q * p.h_q;
    out = align256(decode_bytes);
    lse = out + align256(world * rows * p.head_dim_v * dtype_size(p.dtype));
    bytes = lse + world * rows * 4;
  }
};

void check_context_parallel(const DecodeParams& p) {
  if (p.causal && p.s_q > 1)
    throw InvalidArgument("context_parallel_decode: causal with s_q = " + str(p.s_q) +
                          " > 1 is not supported (a rank's pages are not the sequence's last keys); use s_q = 1 or "
                          "causal = false");
}

}  // namespace

Communicator::Communicator(std::unique_ptr<detail::CommImpl> impl) : impl_(std::move(impl)) {}
Communicator::~Communicator() = default;
Communicator::Communicator(Communicator&&) noexcept = default;
Communicator& Communicator::operator=(Communicator&&) noexcept = default;

std::vector<Communicator> Communicator::local(std::span<const int> devices) {
#ifdef MLA_WITH_CUDA
  std::vector<Communicator> comms;
  for (std::unique_ptr<detail::CommImpl>& impl : detail::nccl_local(devices))
    comms.push_back(Communicator(std::move(impl)));
  return comms;
#else
  no_nccl("Communicator::local");
#endif
}

Communicator Communicator::wrap(void* nccl_comm) {
#ifdef MLA_WITH_CUDA
  return Communicator(detail::nccl_wrap(nccl_comm));
#else
  no_nccl("Communicator::wrap");
#endif
}

std::string Communicator::unique_id() {
#ifdef MLA_WITH_CUDA
  return detail::nccl_unique_id();
#else
  no_nccl("Communicator::unique_id");
#endif
}

Communicator Communicator::from_unique_id(const std::string& id, int rank, int world, int device) {
  // Checked in every build, before NCCL: a bad argument reads the same with or without CUDA.
  if (world < 1) throw InvalidArgument("Communicator::from_unique_id: world must be >= 1, got " + str(world));
  if (rank < 0 || rank >= world)
    throw InvalidArgument("Communicator::from_unique_id: rank " + str(rank) + " is outside [0, " + str(world) + ")");
  if (id.size() != kUniqueIdBytes)
    throw InvalidArgument("Communicator::from_unique_id: id must be the " + str(static_cast<int64_t>(kUniqueIdBytes)) +
                          " bytes of Communicator::unique_id(), got " + str(static_cast<int64_t>(id.size())));
  if (device < 0) throw InvalidArgument("Communicator::from_unique_id: device must be >= 0, got " + str(device));
#ifdef MLA_WITH_CUDA
  return Communicator(detail::nccl_from_unique_id(id, rank, world, device));
#else
  no_nccl("Communicator::from_unique_id");
#endif
}

void Communicator::group_start() {
#ifdef MLA_WITH_CUDA
  detail::nccl_group_start();
#else
  no_nccl("Communicator::group_start");
#endif
}

void Communicator::group_end() {
#ifdef MLA_WITH_CUDA
  detail::nccl_group_end();
#else
  no_nccl("Communicator::group_end");
#endif
}

int Communicator::rank() const { return impl_->rank(); }
int Communicator::world() const { return impl_->world(); }
int Communicator::device() const { return impl_->device(); }
void* Communicator::nccl_comm() const { return impl_->nccl_comm(); }

void Communicator::all_reduce_sum(const void* send, void* recv, int64_t count, DType dtype, void* stream) const {
  impl_->all_reduce_sum(send, recv, count, dtype, stream);
}

void Communicator::all_gather(const void* send, void* recv, int64_t count, DType dtype, void* stream) const {
  impl_->all_gather(send, recv, count, dtype, stream);
}

int64_t context_parallel_length(int64_t length, int64_t page_size, int64_t rank, int64_t world) {
  if (world < 1) throw InvalidArgument("context_parallel_length: world size must be >= 1, got " + str(world));
  if (rank < 0 || rank >= world)
    throw InvalidArgument("context_parallel_length: rank " + str(rank) + " is outside [0, " + str(world) + ")");
  if (page_size < 1) throw InvalidArgument("context_parallel_length: page_size must be >= 1, got " + str(page_size));
  if (length < 0) throw InvalidArgument("context_parallel_length: length must be >= 0, got " + str(length));
  const int64_t full = length / page_size, tail = length % page_size;  // full pages, then a partial page `full`
  const int64_t owned = full / world + (rank < full % world ? 1 : 0);
  return owned * page_size + (tail > 0 && full % world == rank ? tail : 0);
}

ContextParallelPlan plan_context_parallel_decode(const Communicator& comm, const DecodeParams& local) {
  check_context_parallel(local);
  ContextParallelPlan plan;
  plan.decode = plan_decode_attention("cuda", local);
  plan.world = comm.world();
  plan.workspace_bytes = CpWorkspace(local, plan.decode.workspace_bytes, plan.world).bytes;
  return plan;
}

void context_parallel_decode(const Communicator& comm, const DecodeParams& local, const ContextParallelPlan& plan,
                             void* workspace, void* stream) {
  check_context_parallel(local);
  if (plan.world != comm.world())
    throw InvalidArgument("context_parallel_decode: the plan is for " + str(plan.world) +
                          " ranks, the communicator has " + str(comm.world()));
  if (workspace == nullptr) throw InvalidArgument("context_parallel_decode: workspace must not be null");
  const CpWorkspace ws(local, plan.decode.workspace_bytes, plan.world);
  const int64_t rows = local.batch * local.s_q * local.h_q, part = rows * local.head_dim_v;
  char* base = static_cast<char*>(workspace);
  auto* out_all = base + ws.out;                            // [world, batch, s_q, h_q, head_dim_v]
  auto* lse_all = reinterpret_cast<float*>(base + ws.lse);  // [world, batch, h_q, s_q]
  char* my_out = out_all + comm.rank() * part * dtype_size(local.dtype);
  float* my_lse = lse_all + comm.rank() * rows;

  // The local decode writes straight into this rank's slot of the gathered buffers (an in-place all-gather).
  DecodeParams p = local;
  p.out = my_out;
  p.lse = my_lse;
  decode_attention("cuda", p, plan.decode, workspace, stream);

  // Both gathers in one group: one NCCL launch per step.
  Communicator::group_start();
  try {
    comm.all_gather(my_out, out_all, part, local.dtype, stream);
    comm.all_gather(my_lse, lse_all, rows, DType::F32, stream);
  } catch (...) {
    Communicator::group_end();  // leave no group open behind an error
    throw;
  }
  Communicator::group_end();

  MergeParams m;
  m.parts = plan.world;
  m.batch = local.batch, m.s_q = local.s_q, m.h_q = local.h_q, m.head_dim_v = local.head_dim_v;
  m.dtype = local.dtype;
  m.out_parts = out_all, m.lse_parts = lse_all;
  m.out = local.out, m.lse = local.lse;
  merge_attention("cuda", m, stream);
}

}  // namespace mla
