// Training (mla/train.hpp) for Python: the reference and the fast CPU path, and LayerWeights to and from named
// tensors (the checkpoint's names without the "model.layers.N.self_attn." prefix, which are also transformers'
// parameter names). Host memory, float32; the package's mla/train.py wraps these for NumPy and PyTorch.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <iterator>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mla/mla.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using F32 = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32 = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using NumpyF32 = nb::ndarray<nb::numpy, float>;

NumpyF32 to_numpy(std::vector<float>&& v, std::vector<size_t> shape) {
  auto* heap = new std::vector<float>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  return NumpyF32(heap->data(), shape.size(), shape.data(), owner);
}

// The layer's tensors by name: where each lives in LayerWeights / LayerGradients, and its shape.
struct Slot {
  std::string name;
  mla::Matrix* matrix = nullptr;
  std::vector<float>* vector = nullptr;
  std::vector<int64_t> shape;
};

template <class W>  // LayerWeights or train::LayerGradients: the same fields
std::vector<Slot> slots(const mla::Config& c, W& w) {
  const int64_t H = c.num_heads, D = c.hidden_size, dqk = c.qk_head_dim();
  std::vector<Slot> s;
  if (c.has_q_lora()) {
    s.push_back({"q_a_proj.weight", &w.q_a_proj, nullptr, {c.q_lora_rank, D}});
    s.push_back({"q_a_layernorm.weight", nullptr, &w.q_a_norm, {c.q_lora_rank}});
    s.push_back({"q_b_proj.weight", &w.q_b_proj, nullptr, {H * dqk, c.q_lora_rank}});
  } else {
    s.push_back({"q_proj.weight", &w.q_proj, nullptr, {H * dqk, D}});
  }
  s.push_back({"kv_a_proj_with_mqa.weight", &w.kv_a_proj, nullptr, {c.latent_dim(), D}});
  s.push_back({"kv_a_layernorm.weight", nullptr, &w.kv_a_norm, {c.kv_lora_rank}});
  s.push_back({"kv_b_proj.weight", &w.kv_b_proj, nullptr, {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}});
  s.push_back({"o_proj.weight", &w.o_proj, nullptr, {D, H * c.v_head_dim}});
  if (c.attention_bias) {
    s.push_back({c.has_q_lora() ? "q_a_proj.bias" : "q_proj.bias",
                 nullptr,
                 &w.q_bias,
                 {c.has_q_lora() ? c.q_lora_rank : H * dqk}});
    s.push_back({"kv_a_proj_with_mqa.bias", nullptr, &w.kv_a_bias, {c.latent_dim()}});
    s.push_back({"o_proj.bias", nullptr, &w.o_bias, {D}});
  }
  return s;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

mla::LayerWeights weights_from_tensors(const mla::Config& config, nb::dict tensors) {
  config.validate();
  mla::LayerWeights w;
  w.config = config;
  std::set<std::string> used;
  for (Slot& s : slots(config, w)) {
    if (!tensors.contains(s.name.c_str()))
      throw mla::InvalidArgument("LayerWeights.from_tensors: missing '" + s.name + "' " + shape_string(s.shape));
    F32 a;
    if (!nb::try_cast(tensors[s.name.c_str()], a))
      throw nb::type_error(("LayerWeights.from_tensors: '" + s.name +
                            "' must be a C-contiguous float32 array in host "
                            "memory")
                               .c_str());
    std::vector<int64_t> got;
    for (size_t i = 0; i < a.ndim(); ++i) got.push_back(static_cast<int64_t>(a.shape(i)));
    if (got != s.shape)
      throw mla::InvalidArgument("LayerWeights.from_tensors: '" + s.name + "' has shape " + shape_string(got) +
                                 ", the config needs " + shape_string(s.shape));
    std::vector<float> data(a.data(), a.data() + a.size());
    if (s.matrix)
      s.matrix->rows = s.shape[0], s.matrix->cols = s.shape[1], s.matrix->data = std::move(data);
    else
      *s.vector = std::move(data);
    used.insert(s.name);
  }
  for (auto [key, value] : tensors) {
    const std::string name = nb::cast<std::string>(key);
    if (!used.count(name))
      throw mla::InvalidArgument("LayerWeights.from_tensors: '" + name + "' is not a tensor of this layer's config");
  }
  w.validate();
  return w;
}

template <class W>
nb::dict tensors_of(const mla::Config& config, const W& w) {
  nb::dict d;
  for (const Slot& s : slots(config, const_cast<W&>(w))) {  // slots() only takes the fields' addresses; read here
    std::vector<float> data = s.matrix ? s.matrix->data : *s.vector;
    std::vector<size_t> shape(s.shape.begin(), s.shape.end());
    d[s.name.c_str()] = to_numpy(std::move(data), shape);
  }
  return d;
}

// Forward through the reference (Real = double) or the fast path (float): out [T, D] and the saved state.
template <class Real>
std::pair<NumpyF32, mla::train::BasicSaved<Real>> train_forward(const mla::LayerWeights& w, F32 hidden, I32 cu_seqlens,
                                                                std::optional<I64> positions) {
  constexpr bool kFast = std::is_same_v<Real, float>;
  const int64_t D = w.config.hidden_size;
  if (hidden.ndim() != 2 || static_cast<int64_t>(hidden.shape(1)) != D)
    throw mla::InvalidArgument(std::string(kFast ? "train.forward" : "train.forward_reference") +
                               ": hidden must be [tokens, " + std::to_string(D) + "]");
  std::span<const int64_t> pos;
  if (positions) pos = {positions->data(), positions->size()};
  const std::span<const float> x{hidden.data(), hidden.size()};
  const std::span<const int32_t> cu{cu_seqlens.data(), cu_seqlens.size()};
  mla::train::BasicForwardResult<Real> r;
  {
    nb::gil_scoped_release release;
    if constexpr (kFast)
      r = mla::train::forward(w, x, cu, pos);
    else
      r = mla::train::forward_reference(w, x, cu, pos);
  }
  const size_t shape0 = hidden.shape(0);
  return {to_numpy(std::move(r.out), {shape0, static_cast<size_t>(D)}), std::move(r.saved)};
}

template <class Real>
std::pair<NumpyF32, nb::dict> train_backward(const mla::LayerWeights& w, const mla::train::BasicSaved<Real>& saved,
                                             F32 d_out) {
  mla::train::BackwardResult r;
  {
    nb::gil_scoped_release release;
    if constexpr (std::is_same_v<Real, float>)
      r = mla::train::backward(w, saved, {d_out.data(), d_out.size()});
    else
      r = mla::train::backward_reference(w, saved, {d_out.data(), d_out.size()});
  }
  mla::train::LayerGradients& g = r.grads;
  nb::dict grads = tensors_of(w.config, g);
  const size_t T = static_cast<size_t>(saved.tokens), D = static_cast<size_t>(w.config.hidden_size);
  return {to_numpy(std::move(r.d_hidden), {T, D}), grads};
}

// The fast path's saved state as flat arrays and back: the torch operators (mla/train.py) pass only tensors from
// the forward to the backward. Order: positions (int64 [T]), then the float arrays of kSavedFields.
using SavedField = std::vector<float> mla::train::SavedF32::*;
constexpr std::pair<const char*, SavedField> kSavedFields[] = {{"qa", &mla::train::SavedF32::qa},
                                                               {"qa_normed", &mla::train::SavedF32::qa_normed},
                                                               {"q", &mla::train::SavedF32::q},
                                                               {"c", &mla::train::SavedF32::c},
                                                               {"c_normed", &mla::train::SavedF32::c_normed},
                                                               {"k_rope", &mla::train::SavedF32::k_rope},
                                                               {"kv", &mla::train::SavedF32::kv},
                                                               {"lse", &mla::train::SavedF32::lse},
                                                               {"o", &mla::train::SavedF32::o}};

nb::list saved_to_arrays(const mla::train::SavedF32& s) {
  nb::list out;
  auto* pos = new std::vector<int64_t>(s.positions);
  nb::capsule owner(pos, [](void* p) noexcept { delete static_cast<std::vector<int64_t>*>(p); });
  const size_t T = pos->size();
  out.append(nb::ndarray<nb::numpy, int64_t>(pos->data(), 1, &T, owner));
  for (const auto& [name, field] : kSavedFields) {
    std::vector<float> copy = s.*field;
    const size_t n = copy.size();
    out.append(to_numpy(std::move(copy), {n}));
  }
  return out;
}

// Sizes are checked by train::backward.
mla::train::SavedF32 saved_from_arrays(F32 hidden, I32 cu_seqlens, I64 positions, const std::vector<F32>& arrays) {
  if (arrays.size() != std::size(kSavedFields))
    throw mla::InvalidArgument("train saved state: " + std::to_string(arrays.size()) + " arrays, expected " +
                               std::to_string(std::size(kSavedFields)));
  mla::train::SavedF32 s;
  s.tokens = static_cast<int64_t>(positions.size());
  s.cu_seqlens.assign(cu_seqlens.data(), cu_seqlens.data() + cu_seqlens.size());
  s.positions.assign(positions.data(), positions.data() + positions.size());
  s.x.assign(hidden.data(), hidden.data() + hidden.size());
  for (size_t i = 0; i < arrays.size(); ++i)
    s.*kSavedFields[i].second = std::vector<float>(arrays[i].data(), arrays[i].data() + arrays[i].size());
  return s;
}

}  // namespace

void bind_train(nb::module_& m) {
  nb::class_<mla::train::Saved>(m, "TrainSaved", "What train_backward needs from train_forward (opaque).")
      .def_ro("tokens", &mla::train::Saved::tokens);
  nb::class_<mla::train::SavedF32>(m, "TrainSavedF32",
                                   "What train_backward_fast needs from train_forward_fast (opaque).")
      .def_ro("tokens", &mla::train::SavedF32::tokens);
  m.def("weights_from_tensors", &weights_from_tensors, "config"_a, "tensors"_a,
        "LayerWeights from a dict of float32 arrays named as in the checkpoint (q_a_proj.weight, ...).");
  m.def("weights_to_tensors", [](const mla::LayerWeights& w) { return tensors_of(w.config, w); }, "weights"_a,
        "The layer's tensors as float32 arrays named as in the checkpoint.");
  m.def("train_forward", &train_forward<double>, "weights"_a, "hidden"_a, "cu_seqlens"_a,
        "positions"_a.none() = nb::none());
  m.def("train_backward", &train_backward<double>, "weights"_a, "saved"_a, "d_out"_a);
  m.def("train_forward_fast", &train_forward<float>, "weights"_a, "hidden"_a, "cu_seqlens"_a,
        "positions"_a.none() = nb::none());
  m.def("train_backward_fast", &train_backward<float>, "weights"_a, "saved"_a, "d_out"_a);
  m.def(
      "train_saved_to_arrays", &saved_to_arrays, "saved"_a,
      "A TrainSavedF32 as arrays: positions (int64), then qa, qa_normed, q, c, c_normed, k_rope, kv, lse, o (float32, "
      "flat).");
  m.def("train_saved_from_arrays", &saved_from_arrays, "hidden"_a, "cu_seqlens"_a, "positions"_a, "arrays"_a,
        "A TrainSavedF32 from forward's hidden and cu_seqlens and train_saved_to_arrays' arrays (train_backward_fast "
        "checks their sizes).");
}
