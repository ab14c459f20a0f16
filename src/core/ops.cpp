// The kernel-level ops: every parameter is checked here, once, before a backend sees it. Messages name the
// parameter, what was expected and what was passed. Semantics: ../../docs/ops.md.
#include "mla/ops.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "core/backend.hpp"
#include "mla/error.hpp"

namespace mla {
namespace {

// Dimensions are bounded so that every index and every element count fits comfortably in int64.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxElements = int64_t{1} << 48;

[[noreturn]] void fail(std::string_view op, const std::string& what) {
  throw InvalidArgument(std::string(op) + ": " + what);
}

std::string str(int64_t v) { return std::to_string(v); }

void check_dim(std::string_view op, const char* name, int64_t v, int64_t min = 1) {
  if (v < min || v > kMaxDim)
    fail(op, std::string(name) + " must be in [" + str(min) + ", " + str(kMaxDim) + "], got " + str(v));
}

void check_ptr(std::string_view op, const char* name, const void* p) {
  if (p == nullptr) fail(op, std::string(name) + " must not be null");
}

void check_dtype(std::string_view op, DType t) {
  if (t != DType::BF16 && t != DType::F16 && t != DType::F32)
    fail(op, "dtype must be BF16, F16 or F32, got " + std::string(dtype_name(t)));
}

void check_scale(std::string_view op, float scale) {
  if (!std::isfinite(scale) || scale <= 0.f)
    fail(op, "softmax_scale must be a positive finite number (FlashMLA's default is head_dim^-0.5), got " +
                 std::to_string(scale));
}

// Product of dims, failing when a tensor would be unreasonably large.
void check_elements(std::string_view op, const char* tensor, std::initializer_list<int64_t> dims) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d != 0 && n > kMaxElements / d) fail(op, std::string(tensor) + " has too many elements");
    n *= d;
  }
}

// cu_seqlens: [batch + 1] host int32, starting at 0, non-decreasing, ending at `total`.
void check_cu_seqlens(std::string_view op, const char* name, const int32_t* cu, int64_t batch, int64_t total,
                      const char* total_name) {
  if (cu[0] != 0) fail(op, std::string(name) + "[0] must be 0, got " + str(cu[0]));
  for (int64_t b = 0; b < batch; ++b)
    if (cu[b + 1] < cu[b])
      fail(op, std::string(name) + " must be non-decreasing: " + name + "[" + str(b + 1) + "] = " + str(cu[b + 1]) +
                   " < " + name + "[" + str(b) + "] = " + str(cu[b]) + " (batch index " + str(b) + ")");
  if (cu[batch] != total)
    fail(op, std::string(name) + "[batch] must equal " + total_name + " = " + str(total) + ", got " + str(cu[batch]));
}

void validate(const detail::Backend& backend, const DecodeParams& p, bool shape_only = false,
              std::string_view op = "decode_attention") {
  check_dim(op, "batch", p.batch);
  check_dim(op, "s_q", p.s_q);
  check_dim(op, "h_q", p.h_q);
  check_dim(op, "head_dim", p.head_dim);
  check_dim(op, "head_dim_v", p.head_dim_v);
  if (p.head_dim_v > p.head_dim)
    fail(op, "head_dim_v must be <= head_dim = " + str(p.head_dim) + " (the value is the first head_dim_v columns "
             "of each key row), got " + str(p.head_dim_v));
  check_dim(op, "page_size", p.page_size);
  if ((p.page_size & (p.page_size - 1)) != 0)
    fail(op, "page_size must be a power of two, got " + str(p.page_size));
  check_dim(op, "num_pages", p.num_pages);
  check_dim(op, "max_pages", p.max_pages);
  check_dtype(op, p.dtype);
  check_scale(op, p.softmax_scale);
  check_elements(op, "q", {p.batch, p.s_q, p.h_q, p.head_dim});
  if (p.fp8_kv_cache) {
    if (p.dtype != DType::BF16)
      fail(op, "fp8_kv_cache needs dtype BF16 for q and out, got " + std::string(dtype_name(p.dtype)));
    check_elements(op, "kv_cache", {p.num_pages, p.page_size, kv_cache_row(p).bytes()});
  } else {
    check_elements(op, "kv_cache", {p.num_pages, p.page_size, p.head_dim});
  }
  check_elements(op, "block_table", {p.batch, p.max_pages});
  if (shape_only) return;
  check_ptr(op, "q", p.q);
  check_ptr(op, "kv_cache", p.kv_cache);
  check_ptr(op, "block_table", p.block_table);
  check_ptr(op, "cache_seqlens", p.cache_seqlens);
  check_ptr(op, "out", p.out);
  // Contents can only be read where the backend's memory is host memory; device backends check them
  // themselves (or document what they do with bad entries).
  if (!backend.host_memory()) return;
  const int64_t capacity = p.max_pages * p.page_size;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.cache_seqlens[b];
    if (len < 0 || len > capacity)
      fail(op, "cache_seqlens[" + str(b) + "] must be in [0, max_pages * page_size = " + str(capacity) + "], got " +
                   str(len) + " (batch index " + str(b) + ")");
    const int64_t used = (len + p.page_size - 1) / p.page_size;
    for (int64_t j = 0; j < used; ++j) {
      const int64_t page = p.block_table[b * p.max_pages + j];
      if (page < 0 || page >= p.num_pages)
        fail(op, "block_table[" + str(b) + ", " + str(j) + "] must be a page index in [0, num_pages = " +
                     str(p.num_pages) + "), got " + str(page) + " (batch index " + str(b) + ", holding tokens " +
                     str(j * p.page_size) + ".." + str(std::min(len, (j + 1) * p.page_size) - 1) + ")");
    }
  }
}

// The shape fields PrefillParams and PrefillBackwardParams share.
template <class P>
void check_prefill_shape(std::string_view op, const P& p) {
  check_dim(op, "batch", p.batch);
  check_dim(op, "num_heads", p.num_heads);
  check_dim(op, "head_dim_qk", p.head_dim_qk);
  check_dim(op, "head_dim_v", p.head_dim_v);
  check_dim(op, "total_q", p.total_q, 0);
  check_dim(op, "total_k", p.total_k, 0);
  check_scale(op, p.softmax_scale);
  check_elements(op, "q", {p.total_q, p.num_heads, p.head_dim_qk});
  check_elements(op, "k", {p.total_k, p.num_heads, p.head_dim_qk});
  check_elements(op, "v", {p.total_k, p.num_heads, p.head_dim_v});
}

// Host cu_seqlens are checked here; device ones (cu_seqlens_on_device, "cuda" only) by the backend.
template <class P>
void check_prefill_seqlens(std::string_view op, const detail::Backend& backend, const P& p) {
  check_ptr(op, "cu_seqlens_q", p.cu_seqlens_q);
  check_ptr(op, "cu_seqlens_k", p.cu_seqlens_k);
  if (p.cu_seqlens_on_device) {
    if (backend.host_memory())
      fail(op, "cu_seqlens_on_device is for the \"cuda\" backend; on the CPU they are host memory already");
    return;  // read by the kernel, or copied to the host and checked there (see PrefillParams)
  }
  check_cu_seqlens(op, "cu_seqlens_q", p.cu_seqlens_q, p.batch, p.total_q, "total_q");
  check_cu_seqlens(op, "cu_seqlens_k", p.cu_seqlens_k, p.batch, p.total_k, "total_k");
}

void validate(const detail::Backend& backend, const PrefillParams& p) {
  constexpr std::string_view op = "prefill_attention";
  check_prefill_shape(op, p);
  check_dtype(op, p.dtype);
  if (p.total_q > 0) {
    check_ptr(op, "q", p.q);
    check_ptr(op, "out", p.out);
  }
  if (p.total_k > 0) {
    check_ptr(op, "k", p.k);
    check_ptr(op, "v", p.v);
  }
  check_prefill_seqlens(op, backend, p);
}

void validate(const detail::Backend& backend, const PrefillBackwardParams& p, bool shape_only = false) {
  constexpr std::string_view op = "prefill_attention_backward";
  check_prefill_shape(op, p);
  if (p.dtype != DType::BF16 && p.dtype != DType::F32)
    fail(op, "dtype must be BF16 or F32, got " + std::string(dtype_name(p.dtype)));
  if (shape_only) return;
  if (p.total_q > 0) {
    check_ptr(op, "q", p.q);
    check_ptr(op, "out", p.out);
    check_ptr(op, "lse", p.lse);
    check_ptr(op, "d_out", p.d_out);
    check_ptr(op, "d_q", p.d_q);
  }
  if (p.total_k > 0) {
    check_ptr(op, "k", p.k);
    check_ptr(op, "v", p.v);
    check_ptr(op, "d_k", p.d_k);
    check_ptr(op, "d_v", p.d_v);
  }
  const int64_t need = backend.prefill_attention_backward_workspace_bytes(p);
  if (need > 0 && p.workspace == nullptr)
    fail(op, "workspace must not be null: this call needs " + str(need) +
                 " bytes (prefill_attention_backward_workspace_bytes)");
  check_prefill_seqlens(op, backend, p);
}

void validate(const MergeParams& p) {
  constexpr std::string_view op = "merge_attention";
  check_dim(op, "parts", p.parts);
  check_dim(op, "batch", p.batch);
  check_dim(op, "s_q", p.s_q);
  check_dim(op, "h_q", p.h_q);
  check_dim(op, "head_dim_v", p.head_dim_v);
  check_dtype(op, p.dtype);
  check_elements(op, "out_parts", {p.parts, p.batch, p.s_q, p.h_q, p.head_dim_v});
  check_ptr(op, "out_parts", p.out_parts);
  check_ptr(op, "lse_parts", p.lse_parts);
  check_ptr(op, "out", p.out);
  // A kernel writing one row of out while another row's threads still read out_parts would race.
  const auto at = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  const auto out_bytes = static_cast<uintptr_t>(p.batch * p.s_q * p.h_q * p.head_dim_v * dtype_size(p.dtype));
  const uintptr_t parts_bytes = out_bytes * static_cast<uintptr_t>(p.parts);
  if (at(p.out) < at(p.out_parts) + parts_bytes && at(p.out_parts) < at(p.out) + out_bytes)
    fail(op, "out must not overlap out_parts");
}

}  // namespace

void decode_attention(std::string_view device, const DecodeParams& p) {
  const detail::Backend& backend = detail::find_backend(device);
  validate(backend, p);
  backend.decode_attention(p);
}

DecodeSchedule plan_decode_attention(std::string_view device, const DecodeParams& p) {
  const detail::Backend& backend = detail::find_backend(device);
  validate(backend, p, true, "plan_decode_attention");
  DecodeSchedule s = backend.plan_decode_attention(p);
  s.device = std::string(backend.name());
  s.batch = p.batch, s.s_q = p.s_q, s.h_q = p.h_q, s.head_dim = p.head_dim, s.head_dim_v = p.head_dim_v;
  s.dtype = p.dtype;
  s.fp8_kv_cache = p.fp8_kv_cache;
  return s;
}

namespace {

// The checks shared by the planned run and split_decode_attention: params against the schedule it was planned
// for, and a workspace where one is needed.
const detail::Backend& check_planned(std::string_view device, const DecodeParams& p, const DecodeSchedule& schedule,
                                     void* workspace) {
  constexpr std::string_view op = "decode_attention";
  const detail::Backend& backend = detail::find_backend(device);
  validate(backend, p);
  if (schedule.device != backend.name())
    fail(op, "the schedule was planned for device \"" + schedule.device + "\", not \"" + std::string(backend.name()) + "\"");
  auto same = [&](const char* name, int64_t planned, int64_t got) {
    if (planned != got)
      fail(op, std::string(name) + " = " + str(got) + " differs from the schedule's " + str(planned) +
                   " (plan again for a new batch shape)");
  };
  same("batch", schedule.batch, p.batch);
  same("s_q", schedule.s_q, p.s_q);
  same("h_q", schedule.h_q, p.h_q);
  same("head_dim", schedule.head_dim, p.head_dim);
  same("head_dim_v", schedule.head_dim_v, p.head_dim_v);
  if (schedule.fp8_kv_cache != p.fp8_kv_cache)
    fail(op, std::string("fp8_kv_cache is ") + (p.fp8_kv_cache ? "true" : "false") + ", the schedule's is not");
  if (schedule.dtype != p.dtype)
    fail(op, "dtype " + std::string(dtype_name(p.dtype)) + " differs from the schedule's " +
                 std::string(dtype_name(schedule.dtype)));
  if (schedule.workspace_bytes > 0 && workspace == nullptr)
    fail(op, "workspace must not be null: the schedule needs " + str(schedule.workspace_bytes) + " bytes");
  return backend;
}

}  // namespace

void decode_attention(std::string_view device, const DecodeParams& p, const DecodeSchedule& schedule, void* workspace,
                      void* stream, bool splits_ready) {
  check_planned(device, p, schedule, workspace).decode_attention(p, schedule, workspace, stream, splits_ready);
}

void split_decode_attention(std::string_view device, const DecodeParams& p, const DecodeSchedule& schedule,
                            void* workspace, void* stream) {
  check_planned(device, p, schedule, workspace).split_decode_attention(p, schedule, workspace, stream);
}

void merge_attention(std::string_view device, const MergeParams& p, void* stream) {
  const detail::Backend& backend = detail::find_backend(device);
  validate(p);
  backend.merge_attention(p, stream);
}

void prefill_attention(std::string_view device, const PrefillParams& p) { prefill_attention(device, p, nullptr); }

void prefill_attention(std::string_view device, const PrefillParams& p, void* stream) {
  const detail::Backend& backend = detail::find_backend(device);
  validate(backend, p);
  backend.prefill_attention(p, stream);
}

int64_t prefill_attention_backward_workspace_bytes(std::string_view device, const PrefillBackwardParams& p) {
  const detail::Backend& backend = detail::find_backend(device);
  validate(backend, p, true);
  return backend.prefill_attention_backward_workspace_bytes(p);
}

void prefill_attention_backward(std::string_view device, const PrefillBackwardParams& p, void* stream) {
  const detail::Backend& backend = detail::find_backend(device);
  validate(backend, p);
  backend.prefill_attention_backward(p, stream);
}

}  // namespace mla
