// mla._mla: thin nanobind bindings over the C++ core. No computation lives here: arrays arrive through DLPack
// (zero-copy), are checked for dtype, shape, contiguity and device, and go straight to the library. The Python
// package (python/mla/__init__.py) allocates outputs in the caller's framework and handles defaults.
//
// Errors: mla::InvalidArgument -> ValueError, mla::OutOfPages -> mla.OutOfPages (a RuntimeError),
// mla::OutOfMemory, std::bad_alloc and std::length_error -> MemoryError, other mla::Error -> RuntimeError,
// dtype problems -> TypeError; messages are the library's, unchanged.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <filesystem>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "mla/mla.hpp"
#include "mla/parallel.hpp"

namespace nb = nanobind;
using namespace nb::literals;

void bind_train(nb::module_& m);  // train_bindings.cpp

namespace {

using Array = nb::ndarray<nb::ro>;  // any dtype, any device, read-only allowed
using OutArray = nb::ndarray<>;

// ---- array checks ----

std::string shape_str(const Array& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

std::string dtype_str(nb::dlpack::dtype t) {
  using C = nb::dlpack::dtype_code;
  const auto code = static_cast<C>(t.code);
  const std::string bits = std::to_string(t.bits);
  if (code == C::Float) return "float" + bits;
  if (code == C::Bfloat) return "bfloat" + bits;
  if (code == C::Int) return "int" + bits;
  if (code == C::UInt) return "uint" + bits;
  if (code == C::Bool) return "bool";
  return "dtype(code=" + std::to_string(t.code) + ", bits=" + bits + ")";
}

// The library's dtype for a float array, or TypeError.
mla::DType float_dtype(const Array& a, const char* op, const char* name) {
  const auto t = a.dtype();
  if (t == nb::dtype<float>()) return mla::DType::F32;
  if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && t.bits == 16 && t.lanes == 1)
    return mla::DType::F16;
  if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && t.bits == 16 && t.lanes == 1)
    return mla::DType::BF16;
  throw nb::type_error((std::string(op) + ": " + name + " must be float32, float16 or bfloat16, got " +
                        dtype_str(t)).c_str());
}

void expect_dtype(const Array& a, nb::dlpack::dtype want, const char* op, const char* name, const char* want_name) {
  if (a.dtype() != want)
    throw nb::type_error((std::string(op) + ": " + name + " must be " + want_name + ", got " + dtype_str(a.dtype()))
                             .c_str());
}

void expect_ndim(const Array& a, size_t ndim, const char* op, const char* name, const char* layout) {
  if (a.ndim() != ndim)
    throw mla::InvalidArgument(std::string(op) + ": " + name + " must be " + std::to_string(ndim) + "-D " + layout +
                               ", got shape " + shape_str(a));
}

void expect_dim(const Array& a, size_t i, int64_t want, const char* op, const char* name, const char* what) {
  if (static_cast<int64_t>(a.shape(i)) != want)
    throw mla::InvalidArgument(std::string(op) + ": " + name + ".shape[" + std::to_string(i) + "] (" + what +
                               ") must be " + std::to_string(want) + ", got shape " + shape_str(a));
}

void expect_contiguous(const Array& a, const char* op, const char* name) {
  if (a.size() == 0) return;  // strides of empty arrays are arbitrary
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected)
      throw mla::InvalidArgument(std::string(op) + ": " + name +
                                 " must be C-contiguous (call numpy.ascontiguousarray or .contiguous())");
    expected *= static_cast<int64_t>(a.shape(i));
  }
}

// "cpu" or "cuda" from the DLPack device of `a`.
std::string device_of(const Array& a, const char* op, const char* name) {
  if (a.device_type() == nb::device::cpu::value) return "cpu";
  if (a.device_type() == nb::device::cuda::value) return "cuda";
  throw mla::InvalidArgument(std::string(op) + ": " + name + " is on an unsupported device (DLPack device type " +
                             std::to_string(a.device_type()) + "); use CPU or CUDA arrays");
}

void expect_same_device(const Array& a, const Array& ref, const char* op, const char* name) {
  if (a.device_type() != ref.device_type() || a.device_id() != ref.device_id())
    throw mla::InvalidArgument(std::string(op) + ": " + name + " is on " + device_of(a, op, name) + ":" +
                               std::to_string(a.device_id()) + " but q is on " + device_of(ref, op, "q") + ":" +
                               std::to_string(ref.device_id()) + "; every array must be on the same device");
}

Array ro(const OutArray& a) { return Array(a); }

// ---- ops ----

// workspace (uint8, the planned size or more) and stream (a cudaStream_t as an integer, 0 = default) select the
// planned run: no allocation, no host synchronisation, launched on the caller's stream (CUDA-graph capturable).
// splits_ready: the workspace already holds the split-KV work list of an earlier planned run with the same shapes and
// cache_seqlens (FlashMLA's reused metadata); only the attention and combine kernels run.
// fp8_kv_cache (FlashMLA's is_fp8_kvcache): kv is uint8 [num_pages, page_size, 1, row bytes] of fp8_ds_mla rows
// (mla/cache.hpp RowLayout with latent = head_dim_v, rope = head_dim - head_dim_v) and q, out are bfloat16.
void decode(Array q, Array kv, Array block_table, Array seqlens, OutArray out_w, std::optional<OutArray> lse_w,
            int64_t head_dim_v, double softmax_scale, bool causal, std::string device,
            std::optional<OutArray> workspace_w, uintptr_t stream, bool splits_ready, bool fp8_kv_cache) {
  constexpr const char* op = "decode_with_kvcache";
  const Array out = ro(out_w);
  expect_ndim(q, 4, op, "q", "[batch, s_q, h_q, head_dim]");
  expect_ndim(kv, 4, op, "kv_cache", "[num_pages, page_size, 1, head_dim]");
  expect_ndim(block_table, 2, op, "block_table", "[batch, max_pages]");
  expect_ndim(seqlens, 1, op, "cache_seqlens", "[batch]");
  const mla::DType dt = float_dtype(q, op, "q");
  const int64_t b = q.shape(0), s_q = q.shape(1), h_q = q.shape(2), d = q.shape(3);
  if (fp8_kv_cache) {
    if (dt != mla::DType::BF16)
      throw nb::type_error((std::string(op) + ": is_fp8_kvcache=True needs q in bfloat16 (the fp8 rows are read as "
                            "bf16 values), got " + dtype_str(q.dtype())).c_str());
    expect_dtype(kv, nb::dtype<uint8_t>(), op, "kv_cache", "uint8 with is_fp8_kvcache=True (fp8_ds_mla rows)");
  } else if (float_dtype(kv, op, "kv_cache") != dt) {
    throw nb::type_error((std::string(op) + ": kv_cache must have q's dtype " + dtype_str(q.dtype()) + ", got " +
                          dtype_str(kv.dtype())).c_str());
  }
  expect_dtype(block_table, nb::dtype<int32_t>(), op, "block_table", "int32");
  expect_dtype(seqlens, nb::dtype<int32_t>(), op, "cache_seqlens", "int32");
  expect_dim(kv, 2, 1, op, "kv_cache", "KV heads; MLA has one latent head");
  if (!fp8_kv_cache) {
    expect_dim(kv, 3, d, op, "kv_cache", "head_dim, as q");
  } else if (head_dim_v >= 1 && head_dim_v <= d) {  // otherwise the library names head_dim_v
    const mla::RowLayout row{.dtype = mla::DType::F8_E4M3, .latent = head_dim_v, .rope = d - head_dim_v};
    const std::string what = "bytes of one fp8_ds_mla row of head_dim " + std::to_string(d) + ", head_dim_v " +
                             std::to_string(head_dim_v);
    expect_dim(kv, 3, row.bytes(), op, "kv_cache", what.c_str());
  }
  expect_dim(block_table, 0, b, op, "block_table", "batch, as q");
  expect_dim(seqlens, 0, b, op, "cache_seqlens", "batch, as q");
  expect_ndim(out, 4, op, "out", "[batch, s_q, h_q, head_dim_v]");
  if (out.dtype() != q.dtype()) throw nb::type_error("decode_with_kvcache: out must have q's dtype");
  for (size_t i = 0; i < 3; ++i) expect_dim(out, i, q.shape(i), op, "out", "as q");
  expect_dim(out, 3, head_dim_v, op, "out", "head_dim_v");
  const std::string dev = device.empty() ? device_of(q, op, "q") : device;
  for (auto [a, name] : {std::pair<const Array*, const char*>{&kv, "kv_cache"}, {&block_table, "block_table"},
                         {&seqlens, "cache_seqlens"}, {&out, "out"}}) {
    expect_same_device(*a, q, op, name);
    expect_contiguous(*a, op, name);
  }
  expect_contiguous(q, op, "q");
  mla::DecodeParams p;
  p.batch = b, p.s_q = s_q, p.h_q = h_q, p.head_dim = d, p.head_dim_v = head_dim_v;
  p.page_size = kv.shape(1), p.num_pages = kv.shape(0), p.max_pages = block_table.shape(1), p.dtype = dt;
  p.fp8_kv_cache = fp8_kv_cache;
  p.q = q.data(), p.kv_cache = kv.data(), p.block_table = static_cast<const int32_t*>(block_table.data());
  p.cache_seqlens = static_cast<const int32_t*>(seqlens.data());
  p.softmax_scale = static_cast<float>(softmax_scale), p.causal = causal, p.out = out_w.data();
  if (lse_w) {
    const Array lse = ro(*lse_w);
    expect_dtype(lse, nb::dtype<float>(), op, "lse", "float32");
    expect_ndim(lse, 3, op, "lse", "[batch, h_q, s_q]");
    expect_dim(lse, 0, b, op, "lse", "batch"), expect_dim(lse, 1, h_q, op, "lse", "h_q");
    expect_dim(lse, 2, s_q, op, "lse", "s_q");
    expect_same_device(lse, q, op, "lse");
    expect_contiguous(lse, op, "lse");
    p.lse = static_cast<float*>(lse_w->data());
  }
  if (splits_ready && !workspace_w)
    throw mla::InvalidArgument(std::string(op) + ": splits_ready needs the workspace that holds the work list");
  if (!workspace_w && stream == 0) {
    nb::gil_scoped_release release;
    mla::decode_attention(dev, p);
    return;
  }
  const mla::DecodeSchedule schedule = mla::plan_decode_attention(dev, p);
  void* workspace = nullptr;
  if (workspace_w) {
    const Array ws = ro(*workspace_w);
    expect_same_device(ws, q, op, "workspace");
    expect_contiguous(ws, op, "workspace");
    const int64_t bytes = static_cast<int64_t>(ws.nbytes());
    if (bytes < schedule.workspace_bytes)
      throw mla::InvalidArgument(std::string(op) + ": workspace has " + std::to_string(bytes) + " bytes, the plan needs " +
                                 std::to_string(schedule.workspace_bytes));
    workspace = workspace_w->data();
  } else if (schedule.workspace_bytes > 0) {
    throw mla::InvalidArgument(std::string(op) + ": a run on a given stream needs a workspace of " +
                               std::to_string(schedule.workspace_bytes) + " bytes (decode_workspace_bytes)");
  }
  nb::gil_scoped_release release;
  mla::decode_attention(dev, p, schedule, workspace, reinterpret_cast<void*>(stream), splits_ready);
}

// Bytes of scratch the planned decode needs for this shape on this device (0 on the CPU).
int64_t decode_workspace_bytes(int64_t batch, int64_t s_q, int64_t h_q, int64_t head_dim, int64_t head_dim_v,
                               int64_t page_size, const std::string& dtype, const std::string& device,
                               bool fp8_kv_cache) {
  mla::DecodeParams p;
  p.fp8_kv_cache = fp8_kv_cache;
  p.batch = batch, p.s_q = s_q, p.h_q = h_q, p.head_dim = head_dim, p.head_dim_v = head_dim_v;
  p.page_size = page_size, p.num_pages = 1, p.max_pages = 1, p.softmax_scale = 1.f;
  if (dtype == "bfloat16") p.dtype = mla::DType::BF16;
  else if (dtype == "float16") p.dtype = mla::DType::F16;
  else if (dtype == "float32") p.dtype = mla::DType::F32;
  else throw nb::type_error(("decode_workspace_bytes: unsupported dtype " + dtype).c_str());
  return mla::plan_decode_attention(device, p).workspace_bytes;
}

// ---- fp8_ds_mla rows on the host (mla::store_row / mla::load_row, the bytes the layers and the CUDA writer store) ----

mla::RowLayout fp8_layout(const char* op, int64_t head_dim, int64_t head_dim_v) {
  if (head_dim_v < 1 || head_dim_v > head_dim)
    throw mla::InvalidArgument(std::string(op) + ": head_dim_v must be in [1, head_dim = " + std::to_string(head_dim) +
                               "] (the first head_dim_v values are quantised, the rest kept in bf16), got " +
                               std::to_string(head_dim_v));
  return {.dtype = mla::DType::F8_E4M3, .latent = head_dim_v, .rope = head_dim - head_dim_v};
}

int64_t fp8_row_bytes(int64_t head_dim, int64_t head_dim_v) {
  return fp8_layout("fp8_row_bytes", head_dim, head_dim_v).bytes();
}

// rows: float32 [n, head_dim] host; out: uint8 [n, row bytes] host.
void quantize_fp8_rows(Array rows, OutArray out_w, int64_t head_dim_v) {
  constexpr const char* op = "quantize_fp8_kvcache";
  const Array out = ro(out_w);
  expect_dtype(rows, nb::dtype<float>(), op, "rows", "float32");
  expect_dtype(out, nb::dtype<uint8_t>(), op, "out", "uint8");
  expect_ndim(rows, 2, op, "rows", "[rows, head_dim]");
  const mla::RowLayout layout = fp8_layout(op, static_cast<int64_t>(rows.shape(1)), head_dim_v);
  expect_ndim(out, 2, op, "out", "[rows, row bytes]");
  expect_dim(out, 0, rows.shape(0), op, "out", "rows");
  expect_dim(out, 1, layout.bytes(), op, "out", "bytes of one fp8_ds_mla row");
  for (auto [a, name] : {std::pair<const Array*, const char*>{&rows, "rows"}, {&out, "out"}}) {
    if (a->device_type() != nb::device::cpu::value)
      throw mla::InvalidArgument(std::string(op) + ": " + name + " must be in host memory (a CPU tensor)");
    expect_contiguous(*a, op, name);
  }
  const auto* src = static_cast<const float*>(rows.data());
  auto* dst = static_cast<std::byte*>(out_w.data());
  const int64_t n = rows.shape(0), w = layout.width(), bytes = layout.bytes();
  nb::gil_scoped_release release;
  for (int64_t r = 0; r < n; ++r) mla::store_row(layout, src + r * w, dst + r * bytes);
}

// kv: uint8 [n, row bytes] host; out: float32 [n, head_dim] host.
void dequantize_fp8_rows(Array kv, OutArray out_w, int64_t head_dim_v) {
  constexpr const char* op = "dequantize_fp8_kvcache";
  const Array out = ro(out_w);
  expect_dtype(kv, nb::dtype<uint8_t>(), op, "kv_cache", "uint8 (fp8_ds_mla rows)");
  expect_dtype(out, nb::dtype<float>(), op, "out", "float32");
  expect_ndim(kv, 2, op, "kv_cache", "[rows, row bytes]");
  expect_ndim(out, 2, op, "out", "[rows, head_dim]");
  const mla::RowLayout layout = fp8_layout(op, static_cast<int64_t>(out.shape(1)), head_dim_v);
  const std::string what = "bytes of one fp8_ds_mla row of head_dim " + std::to_string(layout.width()) +
                           ", head_dim_v " + std::to_string(head_dim_v);
  expect_dim(kv, 1, layout.bytes(), op, "kv_cache", what.c_str());
  expect_dim(out, 0, kv.shape(0), op, "out", "rows");
  for (auto [a, name] : {std::pair<const Array*, const char*>{&kv, "kv_cache"}, {&out, "out"}}) {
    if (a->device_type() != nb::device::cpu::value)
      throw mla::InvalidArgument(std::string(op) + ": " + name + " must be in host memory (a CPU tensor)");
    expect_contiguous(*a, op, name);
  }
  const auto* src = static_cast<const std::byte*>(kv.data());
  auto* dst = static_cast<float*>(out_w.data());
  const int64_t n = kv.shape(0), w = layout.width(), bytes = layout.bytes();
  nb::gil_scoped_release release;
  for (int64_t r = 0; r < n; ++r) mla::load_row(layout, src + r * bytes, dst + r * w);
}

// cu_seqlens_q/k of prefill and prefill_backward: int32 [batch + 1], both in host memory or both on q's device.
// Returns true for host memory.
bool check_cu_seqlens(const Array& cu_q, const Array& cu_k, const Array& q, const char* op) {
  expect_ndim(cu_q, 1, op, "cu_seqlens_q", "[batch + 1]");
  expect_ndim(cu_k, 1, op, "cu_seqlens_k", "[batch + 1]");
  expect_dtype(cu_q, nb::dtype<int32_t>(), op, "cu_seqlens_q", "int32");
  expect_dtype(cu_k, nb::dtype<int32_t>(), op, "cu_seqlens_k", "int32");
  if (cu_q.shape(0) < 2 || cu_k.shape(0) != cu_q.shape(0))
    throw mla::InvalidArgument(std::string(op) + ": cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 2 "
                               "entries, got " + shape_str(cu_q) + " and " + shape_str(cu_k));
  const bool cu_host = cu_q.device_type() == nb::device::cpu::value;
  if ((cu_k.device_type() == nb::device::cpu::value) != cu_host)
    throw mla::InvalidArgument(std::string(op) + ": cu_seqlens_q and cu_seqlens_k must both be in host memory or both "
                               "on q's device");
  if (!cu_host) {
    if (q.device_type() == nb::device::cpu::value)
      throw mla::InvalidArgument(std::string(op) + ": cu_seqlens on a GPU but q in host memory");
    expect_same_device(cu_q, q, op, "cu_seqlens_q");
    expect_same_device(cu_k, q, op, "cu_seqlens_k");
  }
  expect_contiguous(cu_q, op, "cu_seqlens_q");
  expect_contiguous(cu_k, op, "cu_seqlens_k");
  return cu_host;
}

// cu_seqlens in host memory, or on q's CUDA device (read there by the kernel, see mla::PrefillParams); stream: a
// cudaStream_t as an integer (0 = the legacy default stream).
void prefill(Array q, Array k, Array v, Array cu_q, Array cu_k, OutArray out_w, std::optional<OutArray> lse_w,
             double softmax_scale, bool causal, std::string device, uintptr_t stream) {
  constexpr const char* op = "prefill";
  const Array out = ro(out_w);
  expect_ndim(q, 3, op, "q", "[total_q, num_heads, head_dim_qk]");
  expect_ndim(k, 3, op, "k", "[total_k, num_heads, head_dim_qk]");
  expect_ndim(v, 3, op, "v", "[total_k, num_heads, head_dim_v]");
  const mla::DType dt = float_dtype(q, op, "q");
  if (float_dtype(k, op, "k") != dt || float_dtype(v, op, "v") != dt)
    throw nb::type_error((std::string(op) + ": q, k and v must share one dtype, got " + dtype_str(q.dtype()) + ", " +
                          dtype_str(k.dtype()) + ", " + dtype_str(v.dtype())).c_str());
  const int64_t tq = q.shape(0), H = q.shape(1), dqk = q.shape(2), tk = k.shape(0), dv = v.shape(2);
  expect_dim(k, 1, H, op, "k", "num_heads, as q");
  expect_dim(k, 2, dqk, op, "k", "head_dim_qk, as q");
  expect_dim(v, 0, tk, op, "v", "total_k, as k");
  expect_dim(v, 1, H, op, "v", "num_heads, as q");
  const bool cu_host = check_cu_seqlens(cu_q, cu_k, q, op);
  expect_ndim(out, 3, op, "out", "[total_q, num_heads, head_dim_v]");
  if (out.dtype() != q.dtype()) throw nb::type_error("prefill: out must have q's dtype");
  expect_dim(out, 0, tq, op, "out", "total_q"), expect_dim(out, 1, H, op, "out", "num_heads");
  expect_dim(out, 2, dv, op, "out", "head_dim_v");
  const std::string dev = device.empty() ? device_of(q, op, "q") : device;
  for (auto [a, name] : {std::pair<const Array*, const char*>{&k, "k"}, {&v, "v"}, {&out, "out"}}) {
    expect_same_device(*a, q, op, name);
    expect_contiguous(*a, op, name);
  }
  expect_contiguous(q, op, "q");
  mla::PrefillParams p;
  p.batch = cu_q.shape(0) - 1, p.num_heads = H, p.head_dim_qk = dqk, p.head_dim_v = dv;
  p.total_q = tq, p.total_k = tk, p.dtype = dt;
  p.cu_seqlens_q = static_cast<const int32_t*>(cu_q.data()), p.cu_seqlens_k = static_cast<const int32_t*>(cu_k.data());
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal, p.out = out_w.data();
  p.cu_seqlens_on_device = !cu_host;
  if (lse_w) {
    const Array lse = ro(*lse_w);
    expect_dtype(lse, nb::dtype<float>(), op, "lse", "float32");
    expect_ndim(lse, 2, op, "lse", "[num_heads, total_q]");
    expect_dim(lse, 0, H, op, "lse", "num_heads"), expect_dim(lse, 1, tq, op, "lse", "total_q");
    expect_same_device(lse, q, op, "lse");
    expect_contiguous(lse, op, "lse");
    p.lse = static_cast<float*>(lse_w->data());
  }
  nb::gil_scoped_release release;
  mla::prefill_attention(dev, p, reinterpret_cast<void*>(stream));
}

// prefill_attention_backward. q, k, v, out, d_out, d_q, d_k, d_v share one dtype (float32 or bfloat16) and device;
// lse float32 [num_heads, total_q]; cu_seqlens as prefill (host or q's device). workspace: at least
// prefill_backward_workspace_bytes on q's device (None: allowed only where that is 0, i.e. the CPU).
void prefill_backward(Array q, Array k, Array v, Array out, Array lse, Array d_out, Array cu_q, Array cu_k,
                      OutArray d_q_w, OutArray d_k_w, OutArray d_v_w, double softmax_scale, bool causal,
                      std::string device, std::optional<OutArray> workspace_w, uintptr_t stream) {
  constexpr const char* op = "prefill_backward";
  const Array d_q = ro(d_q_w), d_k = ro(d_k_w), d_v = ro(d_v_w);
  expect_ndim(q, 3, op, "q", "[total_q, num_heads, head_dim_qk]");
  expect_ndim(k, 3, op, "k", "[total_k, num_heads, head_dim_qk]");
  expect_ndim(v, 3, op, "v", "[total_k, num_heads, head_dim_v]");
  const mla::DType dt = float_dtype(q, op, "q");
  for (auto [a, name] : {std::pair<const Array*, const char*>{&k, "k"}, {&v, "v"}, {&out, "out"}, {&d_out, "d_out"},
                         {&d_q, "d_q"}, {&d_k, "d_k"}, {&d_v, "d_v"}})
    if (a->dtype() != q.dtype())
      throw nb::type_error((std::string(op) + ": " + name + " must have q's dtype " + dtype_str(q.dtype()) + ", got " +
                            dtype_str(a->dtype())).c_str());
  expect_dtype(lse, nb::dtype<float>(), op, "lse", "float32");
  const int64_t tq = q.shape(0), H = q.shape(1), dqk = q.shape(2), tk = k.shape(0), dv = v.shape(2);
  expect_dim(k, 1, H, op, "k", "num_heads, as q");
  expect_dim(k, 2, dqk, op, "k", "head_dim_qk, as q");
  expect_dim(v, 0, tk, op, "v", "total_k, as k");
  expect_dim(v, 1, H, op, "v", "num_heads, as q");
  for (auto [a, name, t, d] : {std::tuple<const Array*, const char*, int64_t, int64_t>{&out, "out", tq, dv},
                               {&d_out, "d_out", tq, dv}, {&d_q, "d_q", tq, dqk}, {&d_k, "d_k", tk, dqk},
                               {&d_v, "d_v", tk, dv}}) {
    expect_ndim(*a, 3, op, name, "[tokens, num_heads, head_dim]");
    expect_dim(*a, 0, t, op, name, "tokens");
    expect_dim(*a, 1, H, op, name, "num_heads");
    expect_dim(*a, 2, d, op, name, "head dim");
  }
  expect_ndim(lse, 2, op, "lse", "[num_heads, total_q]");
  expect_dim(lse, 0, H, op, "lse", "num_heads"), expect_dim(lse, 1, tq, op, "lse", "total_q");
  const bool cu_host = check_cu_seqlens(cu_q, cu_k, q, op);
  const std::string dev = device.empty() ? device_of(q, op, "q") : device;
  for (auto [a, name] : {std::pair<const Array*, const char*>{&k, "k"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"},
                         {&d_out, "d_out"}, {&d_q, "d_q"}, {&d_k, "d_k"}, {&d_v, "d_v"}}) {
    expect_same_device(*a, q, op, name);
    expect_contiguous(*a, op, name);
  }
  expect_contiguous(q, op, "q");
  mla::PrefillBackwardParams p;
  p.batch = cu_q.shape(0) - 1, p.num_heads = H, p.head_dim_qk = dqk, p.head_dim_v = dv;
  p.total_q = tq, p.total_k = tk, p.dtype = dt;
  p.cu_seqlens_q = static_cast<const int32_t*>(cu_q.data()), p.cu_seqlens_k = static_cast<const int32_t*>(cu_k.data());
  p.cu_seqlens_on_device = !cu_host;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = static_cast<const float*>(lse.data());
  p.d_out = d_out.data(), p.softmax_scale = static_cast<float>(softmax_scale), p.causal = causal;
  p.d_q = d_q_w.data(), p.d_k = d_k_w.data(), p.d_v = d_v_w.data();
  if (workspace_w) {
    const Array ws = ro(*workspace_w);
    expect_same_device(ws, q, op, "workspace");
    expect_contiguous(ws, op, "workspace");
    const int64_t need = mla::prefill_attention_backward_workspace_bytes(dev, p);
    if (static_cast<int64_t>(ws.nbytes()) < need)
      throw mla::InvalidArgument(std::string(op) + ": workspace has " + std::to_string(ws.nbytes()) +
                                 " bytes, the call needs " + std::to_string(need) + " (prefill_backward_workspace_bytes)");
    p.workspace = workspace_w->data();
  }
  nb::gil_scoped_release release;
  mla::prefill_attention_backward(dev, p, reinterpret_cast<void*>(stream));
}

// Bytes of scratch prefill_backward needs for this shape on this device (0 on the CPU).
int64_t prefill_backward_workspace_bytes(int64_t total_q, int64_t num_heads, int64_t head_dim_qk, int64_t head_dim_v,
                                         const std::string& dtype, const std::string& device) {
  mla::PrefillBackwardParams p;
  p.batch = 1, p.num_heads = num_heads, p.head_dim_qk = head_dim_qk, p.head_dim_v = head_dim_v;
  p.total_q = total_q, p.softmax_scale = 1.f;
  if (dtype == "bfloat16") p.dtype = mla::DType::BF16;
  else if (dtype == "float32") p.dtype = mla::DType::F32;
  else throw nb::type_error(("prefill_backward_workspace_bytes: unsupported dtype " + dtype).c_str());
  return mla::prefill_attention_backward_workspace_bytes(device, p);
}

// ---- helpers for objects ----

template <class T>
nb::ndarray<nb::numpy, T> numpy_owning(std::vector<T>&& v, std::vector<size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(heap->data(), shape.size(), shape.data(), owner);
}

mla::Precision parse_dtype(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return mla::Precision::BF16;
  if (s == "f32" || s == "float32") return mla::Precision::F32;
  throw mla::InvalidArgument("dtype must be 'bf16' or 'f32', got '" + s + "'");
}

mla::Path parse_path(const std::string& s) {
  if (s == "auto") return mla::Path::Auto;
  if (s == "expanded") return mla::Path::Expanded;
  if (s == "absorbed") return mla::Path::Absorbed;
  throw mla::InvalidArgument("path must be 'auto', 'expanded' or 'absorbed', got '" + s + "'");
}

mla::DType parse_cache_dtype(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return mla::DType::BF16;
  if (s == "f32" || s == "float32") return mla::DType::F32;
  if (s == "fp8") return mla::DType::F8_E4M3;
  throw mla::InvalidArgument("LatentCache: dtype must be 'bf16', 'f32' or 'fp8', got '" + s + "'");
}

const char* cache_dtype_str(mla::DType d) {
  return d == mla::DType::F32 ? "f32" : d == mla::DType::F8_E4M3 ? "fp8" : "bf16";
}

mla::CacheDtype parse_layer_cache_dtype(const std::string& s) {
  if (s == "auto") return mla::CacheDtype::Auto;
  if (s == "fp8") return mla::CacheDtype::FP8;
  throw mla::InvalidArgument("Attention: cache_dtype must be 'auto' or 'fp8', got '" + s + "'");
}

bool host_device(const std::string& device) { return device.rfind("cpu", 0) == 0; }

// The cache's page pool as an array of framework F that keeps the Python cache object alive. An fp8 cache is
// uint8 [num_pages, page_size, 1, row_bytes] (the fp8_ds_mla rows, is_fp8_kvcache's layout).
template <class F>
nb::ndarray<F> storage_view(nb::handle self, bool bf16_as_uint16) {
  auto& c = nb::cast<mla::LatentCache&>(self);
  const mla::CacheOptions& o = c.options();
  const bool fp8 = o.dtype == mla::DType::F8_E4M3;
  const nb::dlpack::dtype dt = o.dtype == mla::DType::F32 ? nb::dtype<float>()
                               : fp8 ? nb::dtype<uint8_t>()
                               : bf16_as_uint16 ? nb::dtype<uint16_t>()
                               : nb::dlpack::dtype{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
  const size_t shape[4] = {static_cast<size_t>(o.num_pages), static_cast<size_t>(o.page_size), 1,
                           static_cast<size_t>(fp8 ? c.row_bytes() : o.row_width)};
  const int dev = host_device(o.device) ? nb::device::cpu::value : nb::device::cuda::value;
  return nb::ndarray<F>(c.storage(), 4, shape, self, nullptr, dt, dev);
}

[[noreturn]] void file_not_found(const std::string& what) {
  PyErr_SetString(PyExc_FileNotFoundError, what.c_str());
  throw nb::python_error();
}

// A checkpoint folder or its config.json.
mla::Config config_from_pretrained(const std::filesystem::path& path) {
  std::error_code ec;  // the non-throwing overloads: a symlink loop is then "does not exist", not a filesystem_error
  const std::filesystem::path file = std::filesystem::is_directory(path, ec) ? path / "config.json" : path;
  if (!std::filesystem::exists(file, ec))
    file_not_found("Config.from_pretrained: '" + file.string() + "' does not exist");
  return mla::Config::from_file(file);
}

// tp_rank of tp_world: only that rank's heads are read (LayerWeights::load with a HeadShard).
mla::LayerWeights load_weights(const std::filesystem::path& dir, int64_t layer, int64_t tp_rank, int64_t tp_world) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    file_not_found("from_pretrained: checkpoint folder '" + dir.string() + "' does not exist");
  nb::gil_scoped_release release;
  return mla::LayerWeights::load(dir, layer, mla::HeadShard{tp_rank, tp_world});
}

// hidden [N, D] f32 and out [N, D] f32 in the layer's device memory (or host memory: staged), one chunk per
// sequence in order; positions [N] int64 host or None.
// Returns the path of each chunk (the Python layer keeps them per thread: see Attention.last_paths).
std::vector<std::string> forward(mla::Attention& layer, Array hidden, OutArray out_w,
                                 const std::vector<int64_t>& sequences, const std::vector<int64_t>& num_tokens,
                                 std::optional<Array> positions, mla::LatentCache& cache) {
  constexpr const char* op = "Attention";
  const Array out = ro(out_w);
  const int64_t D = layer.config().hidden_size;
  expect_dtype(hidden, nb::dtype<float>(), op, "hidden", "float32");
  expect_dtype(out, nb::dtype<float>(), op, "out", "float32");
  expect_ndim(hidden, 2, op, "hidden", "[tokens, hidden_size]");
  expect_dim(hidden, 1, D, op, "hidden", "hidden_size");
  expect_ndim(out, 2, op, "out", "[tokens, hidden_size]");
  expect_dim(out, 0, hidden.shape(0), op, "out", "tokens"), expect_dim(out, 1, D, op, "out", "hidden_size");
  expect_contiguous(hidden, op, "hidden"), expect_contiguous(out, op, "out");
  expect_same_device(out, hidden, op, "out");
  if (sequences.size() != num_tokens.size())
    throw mla::InvalidArgument("Attention: " + std::to_string(sequences.size()) + " sequences but " +
                               std::to_string(num_tokens.size()) + " token counts");
  // Checked: counts of [1000000, -999998] summed to 2 rows, and [2^63-1, 2^63-1, 3] wrapped to 1.
  int64_t total = 0;
  for (size_t i = 0; i < num_tokens.size(); ++i) {
    if (num_tokens[i] < 0)
      throw mla::InvalidArgument("Attention: num_tokens[" + std::to_string(i) + "] (sequence " +
                                 std::to_string(sequences[i]) + ") is " + std::to_string(num_tokens[i]) +
                                 ", a negative token count");
    if (__builtin_add_overflow(total, num_tokens[i], &total))
      throw mla::InvalidArgument("Attention: num_tokens add up to more than 2^63-1 at num_tokens[" +
                                 std::to_string(i) + "]; hidden has " + std::to_string(hidden.shape(0)) + " rows");
  }
  if (total != static_cast<int64_t>(hidden.shape(0)))
    throw mla::InvalidArgument("Attention: the token counts add up to " + std::to_string(total) + " but hidden has " +
                               std::to_string(hidden.shape(0)) + " rows");
  const int64_t* pos = nullptr;
  if (positions) {
    expect_dtype(*positions, nb::dtype<int64_t>(), op, "positions", "int64");
    expect_ndim(*positions, 1, op, "positions", "[tokens]");
    expect_dim(*positions, 0, total, op, "positions", "tokens");
    if (positions->device_type() != nb::device::cpu::value)
      throw mla::InvalidArgument("Attention: positions must be in host memory");
    expect_contiguous(*positions, op, "positions");
    pos = static_cast<const int64_t*>(positions->data());
  }
  const std::string& dev = layer.options().device;
  const bool host_arrays = hidden.device_type() == nb::device::cpu::value;
  if (!host_arrays && (host_device(dev) || hidden.device_type() != nb::device::cuda::value))
    throw mla::InvalidArgument("Attention: hidden is on " + device_of(hidden, op, "hidden") + " but the layer runs on '" +
                               dev + "'");
  std::vector<mla::SequenceChunk> batch;
  int64_t row = 0;
  for (size_t i = 0; i < sequences.size(); ++i) {
    batch.push_back({sequences[i], num_tokens[i], pos ? pos + row : nullptr});
    row += num_tokens[i];
  }
  const auto* x = static_cast<const float*>(hidden.data());
  auto* y = static_cast<float*>(out_w.data());
  std::vector<mla::Path> paths;
  {
    // Other Python threads run meanwhile: a layer may be shared between threads that each use their own cache
    // (the contract in mla/attention.hpp).
    nb::gil_scoped_release release;
    paths = host_arrays ? layer.forward_host(batch, x, y, cache) : layer.forward(batch, x, y, cache);
  }
  std::vector<std::string> names;
  for (mla::Path p : paths) names.emplace_back(mla::path_name(p));
  return names;
}

}  // namespace

NB_MODULE(_mla, m) {
  m.doc() = "Bindings of the mla C++ library (DeepSeek Multi-head Latent Attention). Use the `mla` package.";

  static PyObject* out_of_pages = PyErr_NewExceptionWithDoc(
      "mla.OutOfPages", "The latent cache has no free page for a request; nothing was changed.", PyExc_RuntimeError,
      nullptr);
  m.attr("OutOfPages") = nb::handle(out_of_pages);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const mla::OutOfPages& e) {
      PyErr_SetString(out_of_pages, e.what());
    } catch (const mla::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const mla::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const mla::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const std::bad_alloc&) {
      // The core names the argument where it can (mla::OutOfMemory); these are what any other allocation throws.
      PyErr_SetString(PyExc_MemoryError, "mla: the request is larger than this machine can allocate (std::bad_alloc)");
    } catch (const std::length_error& e) {
      PyErr_SetString(PyExc_MemoryError, (std::string("mla: the request is larger than a container can hold (") +
                                          e.what() + ")").c_str());
    }
  });

  nb::class_<mla::Config>(m, "Config", "The shape of one MLA layer, as a Hugging Face DeepSeek config.json describes it.")
      .def_static("from_pretrained", &config_from_pretrained, "path"_a,
                  "Reads a checkpoint folder's config.json (or the file itself).")
      .def_static("from_json", [](const std::string& text) { return mla::Config::from_json(text, "json"); }, "text"_a,
                  "Parses config.json text.")
      .def_static("preset", [](const std::string& name) { return mla::Config::preset(name); }, "name"_a,
                  "A released model's attention shape: 'v2-lite', 'v2', 'v3' (or 'r1').")
      .def_static("preset_names", &mla::Config::preset_names)
      .def_ro("hidden_size", &mla::Config::hidden_size)
      .def_ro("num_heads", &mla::Config::num_heads)
      .def_ro("q_lora_rank", &mla::Config::q_lora_rank)
      .def_ro("kv_lora_rank", &mla::Config::kv_lora_rank)
      .def_ro("qk_nope_head_dim", &mla::Config::qk_nope_head_dim)
      .def_ro("qk_rope_head_dim", &mla::Config::qk_rope_head_dim)
      .def_ro("v_head_dim", &mla::Config::v_head_dim)
      .def_ro("num_layers", &mla::Config::num_layers)
      .def_ro("rms_norm_eps", &mla::Config::rms_norm_eps)
      .def_ro("attention_bias", &mla::Config::attention_bias)
      .def_ro("name", &mla::Config::name)
      .def_prop_ro("qk_head_dim", &mla::Config::qk_head_dim)
      .def_prop_ro("latent_dim", &mla::Config::latent_dim, "Width of one cache row: kv_lora_rank + qk_rope_head_dim.")
      .def_prop_ro("softmax_scale",
                   [](const mla::Config& c) { return mla::DerivedConstants::compute(c).softmax_scale; },
                   "The layer's softmax scale (with YaRN's mscale), not head_dim^-0.5 of the 576-wide rows.")
      .def_prop_ro("rope_type",
                   [](const mla::Config& c) { return c.rope.type == mla::RopeType::Yarn ? "yarn" : "default"; })
      .def_prop_ro("rope_inv_freq", [](const mla::Config& c) { return mla::DerivedConstants::compute(c).inv_freq; },
                   "RoPE's fp32 frequencies ω_i (YaRN applied), qk_rope_head_dim / 2 values: pair i of the rope dims "
                   "at position p turns by fp32(p)·ω_i.")
      .def_prop_ro("rope_magnitude",
                   [](const mla::Config& c) { return mla::DerivedConstants::compute(c).rope_magnitude; },
                   "YaRN's magnitude A multiplying RoPE's cos and sin (1 for every released checkpoint).")
      .def("__repr__", [](const mla::Config& c) {
        return "mla.Config(name='" + c.name + "', hidden_size=" + std::to_string(c.hidden_size) +
               ", num_heads=" + std::to_string(c.num_heads) + ", q_lora_rank=" + std::to_string(c.q_lora_rank) +
               ", kv_lora_rank=" + std::to_string(c.kv_lora_rank) + ", qk_nope_head_dim=" +
               std::to_string(c.qk_nope_head_dim) + ", qk_rope_head_dim=" + std::to_string(c.qk_rope_head_dim) +
               ", v_head_dim=" + std::to_string(c.v_head_dim) + ")";
      });

  nb::class_<mla::LayerWeights>(m, "LayerWeights", "The attention weights of one layer (f32, host memory).")
      .def_static("load", &load_weights, "path"_a, "layer"_a = 0, "tp_rank"_a = 0, "tp_world"_a = 1)
      .def_static("random", &mla::LayerWeights::random, "config"_a, "seed"_a = 0)
      .def_ro("config", &mla::LayerWeights::config)
      .def_ro("layer", &mla::LayerWeights::layer)
      .def_prop_ro("tp_rank", [](const mla::LayerWeights& w) { return w.heads.rank; })
      .def_prop_ro("tp_world", [](const mla::LayerWeights& w) { return w.heads.world; });

  nb::class_<mla::LatentCache>(m, "LatentCache")
      .def("__init__",
           [](mla::LatentCache* self, int64_t num_pages, int64_t page_size, int64_t row_width, const std::string& dtype,
              const std::string& device, uint64_t seed, int64_t rope_width) {
             mla::CacheOptions o;
             o.num_pages = num_pages, o.page_size = page_size, o.row_width = row_width;
             o.dtype = parse_cache_dtype(dtype), o.device = device, o.page_order_seed = seed;
             o.rope_width = rope_width;
             new (self) mla::LatentCache(o);
           },
           "num_pages"_a, "page_size"_a = 64, "row_width"_a = 576, "dtype"_a = "bf16", "device"_a = "cpu",
           "page_order_seed"_a = 0, "rope_width"_a = 64)
      .def("add_sequence", &mla::LatentCache::add_sequence)
      .def("free_sequence", &mla::LatentCache::free_sequence, "seq"_a)
      .def("__contains__", &mla::LatentCache::contains, "seq"_a)
      .def("sequences", &mla::LatentCache::sequences)
      .def("length", &mla::LatentCache::length, "seq"_a)
      .def("capacity", &mla::LatentCache::capacity, "seq"_a)
      .def("truncate", &mla::LatentCache::truncate, "seq"_a, "length"_a)
      .def("release_unused", &mla::LatentCache::release_unused, "seq"_a, "keep_tokens"_a = 0)
      .def("fill_unused", &mla::LatentCache::fill_unused, "value"_a)
      .def("block_table",
           [](const mla::LatentCache& c, int64_t seq) {
             auto t = c.block_table(seq);
             return numpy_owning(std::vector<int32_t>(t.begin(), t.end()), {t.size()});
           },
           "seq"_a)
      .def("read",
           [](const mla::LatentCache& c, int64_t seq, int64_t begin, std::optional<int64_t> end) {
             const int64_t e = end ? *end : c.length(seq);
             if (begin < 0 || begin > e || e > c.length(seq))
               throw mla::InvalidArgument("LatentCache.read: rows [" + std::to_string(begin) + ", " +
                                          std::to_string(e) + ") are not within the sequence's " +
                                          std::to_string(c.length(seq)) + " tokens");
             std::vector<float> rows = c.read_rows(seq, begin, e);
             return numpy_owning(std::move(rows), {static_cast<size_t>(e - begin),
                                                   static_cast<size_t>(c.options().row_width)});
           },
           "seq"_a, "begin"_a = 0, "end"_a = nb::none())
      .def("_storage_numpy", [](nb::handle self) { return storage_view<nb::numpy>(self, true); },
           "The page pool [num_pages, page_size, 1, row_width] as a NumPy array sharing the cache's memory "
           "(a bf16 cache as uint16 bit patterns).")
      .def("_storage_torch", [](nb::handle self) { return storage_view<nb::pytorch>(self, false); },
           "The page pool [num_pages, page_size, 1, row_width] as a torch tensor sharing the cache's memory.")
      .def_prop_ro("num_pages", &mla::LatentCache::pages_total)
      .def_prop_ro("pages_free", &mla::LatentCache::pages_free)
      .def_prop_ro("page_size", [](const mla::LatentCache& c) { return c.options().page_size; })
      .def_prop_ro("row_width", [](const mla::LatentCache& c) { return c.options().row_width; })
      .def_prop_ro("dtype", [](const mla::LatentCache& c) { return cache_dtype_str(c.options().dtype); })
      .def_prop_ro("rope_width", [](const mla::LatentCache& c) { return c.row_layout().rope; })
      .def_prop_ro("row_bytes", &mla::LatentCache::row_bytes)
      .def_prop_ro("page_bytes", &mla::LatentCache::page_bytes)
      .def_prop_ro("device", [](const mla::LatentCache& c) { return c.options().device; });

  // One NCCL rank (mla/parallel.hpp); mla.Communicator (python/mla/_api.py) wraps it.
  nb::class_<mla::Communicator>(m, "Communicator")
      .def_static("unique_id",
                  [] {
                    const std::string id = mla::Communicator::unique_id();
                    return nb::bytes(id.data(), id.size());
                  },
                  "ncclGetUniqueId: 128 bytes for every rank's from_unique_id.")
      .def_static("from_unique_id",
                  [](nb::bytes id, int rank, int world, int device) {
                    std::string bytes(id.c_str(), id.size());
                    nb::gil_scoped_release release;  // ncclCommInitRank waits for every rank
                    return mla::Communicator::from_unique_id(bytes, rank, world, device);
                  },
                  "id"_a, "rank"_a, "world"_a, "device"_a)
      .def_prop_ro("rank", &mla::Communicator::rank)
      .def_prop_ro("world", &mla::Communicator::world)
      .def_prop_ro("device", &mla::Communicator::device)
      .def_prop_ro("nccl_comm", [](const mla::Communicator& c) { return reinterpret_cast<uintptr_t>(c.nccl_comm()); });

  nb::class_<mla::Attention>(m, "Attention")
      .def("__init__",
           [](mla::Attention* self, const mla::LayerWeights& w, const std::string& device, const std::string& dtype,
              const std::string& path, const std::string& cache_dtype, const mla::Communicator* communicator) {
             mla::LayerOptions o;
             o.device = device, o.precision = parse_dtype(dtype), o.path = parse_path(path);
             o.cache_dtype = parse_layer_cache_dtype(cache_dtype);
             o.communicator = communicator;
             nb::gil_scoped_release release;
             new (self) mla::Attention(w, o);
           },
           "weights"_a, "device"_a = "cpu", "dtype"_a = "bf16", "path"_a = "auto", "cache_dtype"_a = "auto",
           "communicator"_a.none() = nb::none(),
           nb::keep_alive<1, 7>())  // the layer holds a pointer to the communicator (LayerOptions::communicator)
      .def_prop_ro("config", &mla::Attention::config)
      .def_prop_ro("device", [](const mla::Attention& a) { return a.options().device; })
      .def_prop_ro("dtype", [](const mla::Attention& a) { return std::string(mla::precision_name(a.options().precision)); })
      .def_prop_ro("path", [](const mla::Attention& a) { return std::string(mla::path_name(a.options().path)); })
      .def_prop_ro("cache_dtype",
                   [](const mla::Attention& a) { return std::string(mla::cache_dtype_name(a.options().cache_dtype)); })
      .def_prop_ro("last_paths",
                   [](const mla::Attention& a) {
                     std::vector<std::string> v;
                     for (mla::Path p : a.last_paths()) v.emplace_back(mla::path_name(p));
                     return v;
                   },
                   "The paths of the most recent successful forward of any thread (mla.Attention keeps its own "
                   "per thread).")
      .def("make_cache", &mla::Attention::make_cache, "num_pages"_a, "page_size"_a = 64, "page_order_seed"_a = 0)
      .def("forward", &forward, "hidden"_a, "out"_a, "sequences"_a, "num_tokens"_a, "positions"_a.none(), "cache"_a);

  m.def("decode", &decode, "q"_a, "kv_cache"_a, "block_table"_a, "cache_seqlens"_a, "out"_a, "lse"_a.none(),
        "head_dim_v"_a, "softmax_scale"_a, "causal"_a, "device"_a = "", "workspace"_a.none() = nb::none(),
        "stream"_a = 0, "splits_ready"_a = false, "is_fp8_kvcache"_a = false);
  m.def("decode_workspace_bytes", &decode_workspace_bytes, "batch"_a, "s_q"_a, "h_q"_a, "head_dim"_a, "head_dim_v"_a,
        "page_size"_a, "dtype"_a, "device"_a, "is_fp8_kvcache"_a = false);
  m.def("fp8_row_bytes", &fp8_row_bytes, "head_dim"_a, "head_dim_v"_a,
        "Bytes of one fp8_ds_mla cache row of head_dim values whose first head_dim_v are quantised (656 for 576, 512).");
  m.def("quantize_fp8_rows", &quantize_fp8_rows, "rows"_a, "out"_a, "head_dim_v"_a);
  m.def("dequantize_fp8_rows", &dequantize_fp8_rows, "kv_cache"_a, "out"_a, "head_dim_v"_a);
  m.def("prefill", &prefill, "q"_a, "k"_a, "v"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "out"_a, "lse"_a.none(),
        "softmax_scale"_a, "causal"_a, "device"_a = "", "stream"_a = 0);
  m.def("prefill_backward", &prefill_backward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "d_out"_a, "cu_seqlens_q"_a,
        "cu_seqlens_k"_a, "d_q"_a, "d_k"_a, "d_v"_a, "softmax_scale"_a, "causal"_a, "device"_a = "",
        "workspace"_a.none() = nb::none(), "stream"_a = 0);
  m.def("prefill_backward_workspace_bytes", &prefill_backward_workspace_bytes, "total_q"_a, "num_heads"_a,
        "head_dim_qk"_a, "head_dim_v"_a, "dtype"_a, "device"_a);
  bind_train(m);
  m.def("available_devices", &mla::available_devices, "The backends compiled in and usable here.");
  m.def("run_sequences",
        [](mla::Attention& layer, Array hidden, std::optional<Array> positions, int64_t chunk, int64_t decode_after,
           int64_t page_size, uint64_t page_order_seed, bool poison_unused) {
          constexpr const char* op = "run_sequences";
          expect_dtype(hidden, nb::dtype<float>(), op, "hidden", "float32");
          expect_ndim(hidden, 3, op, "hidden", "[batch, tokens, hidden_size]");
          expect_dim(hidden, 2, layer.config().hidden_size, op, "hidden", "hidden_size");
          expect_contiguous(hidden, op, "hidden");
          if (hidden.device_type() != nb::device::cpu::value)
            throw mla::InvalidArgument("run_sequences: hidden must be in host memory");
          const int64_t B = hidden.shape(0), T = hidden.shape(1);
          const int64_t* pos = nullptr;
          if (positions) {
            expect_dtype(*positions, nb::dtype<int64_t>(), op, "positions", "int64");
            expect_ndim(*positions, 2, op, "positions", "[batch, tokens]");
            expect_dim(*positions, 0, B, op, "positions", "batch"), expect_dim(*positions, 1, T, op, "positions", "tokens");
            expect_contiguous(*positions, op, "positions");
            if (positions->device_type() != nb::device::cpu::value)
              throw mla::InvalidArgument("run_sequences: positions must be in host memory");
            pos = static_cast<const int64_t*>(positions->data());
          }
          mla::RunOptions o;
          o.chunk = chunk, o.decode_after = decode_after, o.page_size = page_size;
          o.page_order_seed = page_order_seed, o.poison_unused = poison_unused;
          mla::RunResult r;
          {
            nb::gil_scoped_release release;
            r = mla::run_sequences(layer, static_cast<const float*>(hidden.data()), pos, B, T, o);
          }
          const auto W = static_cast<size_t>(layer.config().latent_dim());
          return nb::make_tuple(
              numpy_owning(std::move(r.output), {size_t(B), size_t(T), size_t(layer.config().hidden_size)}),
              numpy_owning(std::move(r.latent), {size_t(B), size_t(T), W}), r.calls);
        },
        "layer"_a, "hidden"_a, "positions"_a.none() = nb::none(), "chunk"_a = 0, "decode_after"_a = -1,
        "page_size"_a = 64, "page_order_seed"_a = 0, "poison_unused"_a = false);
}
