// The "cuda" backend: device buffers, the CUDA layer and the attention ops. Registered only when a GPU is
// present, so a CUDA build still runs on machines without one.
#include <map>
#include <mutex>
#include <string>

#include "core/backend.hpp"
#include "cuda/common/attention.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/device_memory.hpp"
#include "cuda/layer.hpp"

namespace mla::cuda {
namespace {

class CudaBackend final : public detail::Backend {
 public:
  CudaBackend() {
    int device = 0;
    MLA_CUDA_CHECK(cudaGetDevice(&device));
    MLA_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
  }
  std::string_view name() const override { return "cuda"; }
  bool host_memory() const override { return false; }
  std::unique_ptr<detail::Buffer> allocate(int64_t bytes) const override { return std::make_unique<DeviceBuffer>(bytes); }
  void copy_to_host(const void* src, int64_t bytes, void* dst) const override {
    if (bytes > 0) MLA_CUDA_CHECK(cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost));
  }
  std::unique_ptr<detail::LayerImpl> make_layer(const LayerWeights& w, const LayerOptions& o) const override {
    return make_cuda_layer(w, o);
  }
  // Asynchronous on the default stream, like any CUDA op; the split-KV workspace is kept between calls, one per
  // device: the calling thread's current device is where the kernels run, so the workspace must live there,
  // and the legacy default stream orders calls on one device but not across devices.
  void decode_attention(const DecodeParams& p) const override {
    validate(p);
    int device = 0;
    MLA_CUDA_CHECK(cudaGetDevice(&device));
    const DecodePlan plan = plan_decode(p, num_sms_);
    std::lock_guard lock(mutex_);  // guards the map and the workspace's growth, not the (asynchronous) kernels
    run_decode(p, plan, workspaces_[device], nullptr);
  }
  DecodeSchedule plan_decode_attention(const DecodeParams& p) const override {
    validate_shape(p);
    const DecodePlan plan = plan_decode(p, num_sms_);
    DecodeSchedule s;
    s.kernel = plan.kernel;
    s.workspace_bytes = plan.workspace_bytes;
    return s;
  }
  // No lock and no shared state: the caller owns the workspace (one per concurrent stream).
  void decode_attention(const DecodeParams& p, const DecodeSchedule& schedule, void* workspace, void* stream,
                        bool splits_ready) const override {
    validate(p);
    run_decode(p, checked_plan(p, schedule), workspace, static_cast<cudaStream_t>(stream),
               splits_ready ? DecodeStage::kAttend : DecodeStage::kAll);
  }
  void split_decode_attention(const DecodeParams& p, const DecodeSchedule& schedule, void* workspace,
                              void* stream) const override {
    validate(p);
    run_decode(p, checked_plan(p, schedule), workspace, static_cast<cudaStream_t>(stream), DecodeStage::kSplit);
  }
  void prefill_attention(const PrefillParams& p, void* stream) const override {
    validate(p);
    run_prefill(p, static_cast<cudaStream_t>(stream));
  }
  void merge_attention(const MergeParams& p, void* stream) const override {
    run_merge(p, static_cast<cudaStream_t>(stream));
  }
  int64_t prefill_attention_backward_workspace_bytes(const PrefillBackwardParams& p) const override {
    return prefill_backward_workspace_bytes(p);
  }
  void prefill_attention_backward(const PrefillBackwardParams& p, void* stream) const override {
    run_prefill_backward(p, static_cast<cudaStream_t>(stream));
  }

 private:
  // The plan of this call, which must be the one the caller's schedule was made from.
  DecodePlan checked_plan(const DecodeParams& p, const DecodeSchedule& schedule) const {
    const DecodePlan plan = plan_decode(p, num_sms_);
    if (plan.kernel != schedule.kernel || plan.workspace_bytes > schedule.workspace_bytes)
      throw InvalidArgument("decode_attention (cuda): the schedule (kernel " + schedule.kernel + ", " +
                            std::to_string(schedule.workspace_bytes) + " workspace bytes) does not fit this call "
                            "(kernel " + plan.kernel + ", " + std::to_string(plan.workspace_bytes) +
                            " bytes): plan again (MLA_CUDA_DISABLE_SM90 changed?)");
    return plan;
  }

  int num_sms_ = 0;
  mutable std::mutex mutex_;
  mutable std::map<int, DeviceArray> workspaces_;  // by device ordinal; map nodes stay put as devices are added
};

}  // namespace
}  // namespace mla::cuda

namespace mla::detail {

const Backend* cuda_backend_if_usable() {
  static const Backend* backend = []() -> const Backend* {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();  // clear the sticky "no device" error
      return nullptr;
    }
    static const cuda::CudaBackend instance;
    return &instance;
  }();
  return backend;
}

}  // namespace mla::detail
