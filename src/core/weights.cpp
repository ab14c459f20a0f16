#include "mla/weights.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>

#include "core/input.hpp"
#include "mla/error.hpp"
#include "mla/safetensors.hpp"

namespace mla {
namespace {

void validate_weights(const LayerWeights& w, bool finite);  // below

void expect_shape(const TensorRef& t, const std::vector<int64_t>& want, const std::string& dir) {
  if (t.info.shape != want)
    throw Error("checkpoint '" + dir + "': tensor '" + t.info.name + "' has shape " + shape_string(t.info.shape) +
                " but the config implies " + shape_string(want) + " (" + t.file + ")");
}

// "[r, c]" of flat index i in a matrix with `cols` columns, "[i]" for a vector (cols == 0); a slice read from
// the checkpoint names the element's place in the checkpoint tensor: row0 and col0 are the slice's origin there.
std::string position(size_t i, int64_t cols, int64_t row0 = 0, int64_t col0 = 0) {
  if (cols <= 0) return "[" + std::to_string(static_cast<int64_t>(i) + col0) + "]";
  const auto c = static_cast<size_t>(cols);
  return "[" + std::to_string(static_cast<int64_t>(i / c) + row0) + ", " +
         std::to_string(static_cast<int64_t>(i % c) + col0) + "]";
}

std::string value_text(float v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// NaN or Inf in a weight makes every output non-finite without any error: refuse it at load, naming the
// tensor and the first bad element.
void check_finite(const std::vector<float>& v, int64_t cols, const std::string& what, int64_t row0 = 0,
                  int64_t col0 = 0) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i]))
      throw Error(what + " holds " + value_text(v[i]) + " at " + position(i, cols, row0, col0));
  }
}

std::string tensor_where(const Checkpoint& ckpt, const TensorRef& t) {
  return "checkpoint '" + ckpt.dir().string() + "': tensor '" + t.info.name + "' (" + t.file + ")";
}

// `count` f32 values, or mla::Error naming the tensor instead of std::bad_alloc.
std::vector<float> allocate(int64_t count, const std::string& what) {
  try {
    return std::vector<float>(static_cast<size_t>(count));
  } catch (const std::bad_alloc&) {
    throw Error(what + ": out of memory for " + std::to_string(count) + " f32 values");
  }
}

// The part of a checkpoint tensor [rows, cols] (a vector: one row) a rank reads: rows [row0, row0 + n_rows),
// of each only columns [col0, col0 + n_cols).
struct Slice {
  int64_t row0 = 0, n_rows = 0, col0 = 0, n_cols = 0;
  static Slice whole(int64_t rows, int64_t cols) { return {0, rows, 0, cols}; }
};

// FP8 weights: W[r,c] = fp8(W8[r,c]) · S[r/128, c/128]; "scale_inv" multiplies despite its name. rows and cols
// are the whole tensor's; m holds its slice s, whose edges may cut 128-blocks: only the blocks it touches are
// read, and each element takes the scale of the block its checkpoint row and column fall in.
void apply_block_scales(const Checkpoint& ckpt, const std::string& name, int64_t rows, int64_t cols, const Slice& s,
                        Matrix& m) {
  const std::string scale_name = name + "_scale_inv";
  if (!ckpt.contains(scale_name))
    throw Error("checkpoint '" + ckpt.dir().string() + "': FP8 tensor '" + name + "' has no '" + scale_name + "'");
  TensorRef st = ckpt.tensor(scale_name);
  const int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
  expect_shape(st, {br, bc}, ckpt.dir().string());
  if (m.data.empty()) return;
  const int64_t b_row0 = s.row0 / 128, b_rows = (s.row0 + s.n_rows - 1) / 128 - b_row0 + 1;
  const int64_t b_col0 = s.col0 / 128, b_cols = (s.col0 + s.n_cols - 1) / 128 - b_col0 + 1;
  std::vector<float> scale = allocate(b_rows * b_cols, tensor_where(ckpt, st));
  convert_block_to_f32(st, b_row0, b_rows, b_col0, b_cols, scale.data());
  for (size_t i = 0; i < scale.size(); ++i) {
    if (!(std::isfinite(scale[i]) && scale[i] > 0.f))
      throw Error(tensor_where(ckpt, st) + " holds " + value_text(scale[i]) + " at " +
                  position(i, b_cols, b_row0, b_col0) + "; a block scale must be positive and finite");
  }
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* scale_row = scale.data() + ((s.row0 + r) / 128 - b_row0) * b_cols;
    for (int64_t c = 0; c < m.cols; ++c) m.data[r * m.cols + c] *= scale_row[(s.col0 + c) / 128 - b_col0];
  }
  // Finite fp8 values times finite scales can still overflow f32.
  check_finite(m.data, m.cols, tensor_where(ckpt, ckpt.tensor(name)) + " times '" + scale_name + "'", s.row0,
               s.col0);
}

// Slice s of the checkpoint matrix `name` of shape [rows, cols] (the whole of it by default).
Matrix load_matrix(const Checkpoint& ckpt, const std::string& name, int64_t rows, int64_t cols,
                   std::optional<Slice> slice = std::nullopt) {
  TensorRef t = ckpt.tensor(name);
  expect_shape(t, {rows, cols}, ckpt.dir().string());
  const Slice s = slice.value_or(Slice::whole(rows, cols));
  Matrix m;
  m.rows = s.n_rows, m.cols = s.n_cols;
  m.data = allocate(detail::checked_mul(s.n_rows, s.n_cols, name), tensor_where(ckpt, t));
  convert_block_to_f32(t, s.row0, s.n_rows, s.col0, s.n_cols, m.data.data());
  check_finite(m.data, m.cols, tensor_where(ckpt, t), s.row0, s.col0);
  if (t.info.dtype == DType::F8_E4M3) apply_block_scales(ckpt, name, rows, cols, s, m);
  return m;
}

// Elements [first, first + count) of the checkpoint vector `name` of length n (the whole of it by default).
std::vector<float> load_vector(const Checkpoint& ckpt, const std::string& name, int64_t n, int64_t first = 0,
                               int64_t count = -1) {
  TensorRef t = ckpt.tensor(name);
  expect_shape(t, {n}, ckpt.dir().string());
  if (count < 0) count = n;
  std::vector<float> v = allocate(count, tensor_where(ckpt, t));
  convert_block_to_f32(t, 0, 1, first, count, v.data());
  check_finite(v, 0, tensor_where(ckpt, t), 0, first);
  return v;
}

// The InvalidArgument of shard_heads and the sliced load: `who` names the call.
void check_head_shard(const std::string& who, int64_t num_heads, HeadShard s) {
  if (s.world < 1)
    throw InvalidArgument(who + ": the world size must be at least 1, got " + std::to_string(s.world));
  if (s.rank < 0 || s.rank >= s.world)
    throw InvalidArgument(who + ": rank " + std::to_string(s.rank) + " is outside [0, " + std::to_string(s.world) +
                          ")");
  if (num_heads % s.world != 0)
    throw InvalidArgument(who + ": num_heads " + std::to_string(num_heads) + " does not divide over " +
                          std::to_string(s.world) + " ranks");
}

// splitmix64: fast, deterministic, good enough for random test weights.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f; }  // [-1, 1)
};

// Uniform with variance 1/cols, like a trained projection's scale; values exactly representable in bf16 so
// that the f32 and bf16 paths start from the same weights.
Matrix random_matrix(Rng& rng, int64_t rows, int64_t cols) {
  Matrix m;
  m.rows = rows, m.cols = cols;
  m.data.resize(static_cast<size_t>(rows * cols));
  const float a = std::sqrt(3.0f / static_cast<float>(cols));
  for (float& v : m.data) v = round_bf16(a * rng.uniform());
  return m;
}

std::vector<float> random_gain(Rng& rng, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = round_bf16(1.0f + 0.1f * rng.uniform());
  return v;
}

}  // namespace

LayerWeights LayerWeights::load(const std::filesystem::path& dir, int64_t layer) { return load(dir, layer, {}); }

LayerWeights LayerWeights::load(const std::filesystem::path& dir, int64_t layer, HeadShard shard) {
  detail::check_checkpoint_folder(dir);  // "is not a folder", not "config.json: cannot open"
  const Config config = Config::from_file(dir / "config.json");
  Checkpoint ckpt(dir);
  return load(ckpt, config, layer, shard);
}

LayerWeights LayerWeights::load(const Checkpoint& ckpt, const Config& c, int64_t layer) {
  return load(ckpt, c, layer, {});
}

LayerWeights LayerWeights::load(const Checkpoint& ckpt, const Config& c, int64_t layer, HeadShard shard) {
  c.validate();  // bounds every size derived below
  if (layer < 0 || layer >= c.num_layers)
    throw InvalidArgument("layer " + std::to_string(layer) + " is out of range: the config has " +
                          std::to_string(c.num_layers) + " layers (num_hidden_layers)");
  check_head_shard("LayerWeights::load", c.num_heads, shard);
  const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
  const int64_t H = c.num_heads, D = c.hidden_size, dqk = c.qk_head_dim();
  const int64_t dkv = c.qk_nope_head_dim + c.v_head_dim, dv = c.v_head_dim;
  const int64_t heads = H / shard.world, h0 = shard.rank * heads;
  // The rank's heads: whole rows of the per-head projections, a contiguous run of columns of o_proj.
  auto head_rows = [&](int64_t per_head, int64_t cols) { return Slice{h0 * per_head, heads * per_head, 0, cols}; };
  LayerWeights w;
  w.config = c;
  w.config.num_heads = heads;
  w.layer = layer;
  w.heads = shard;
  if (c.has_q_lora()) {
    w.q_a_proj = load_matrix(ckpt, p + "q_a_proj.weight", c.q_lora_rank, D);
    w.q_a_norm = load_vector(ckpt, p + "q_a_layernorm.weight", c.q_lora_rank);
    w.q_b_proj = load_matrix(ckpt, p + "q_b_proj.weight", H * dqk, c.q_lora_rank, head_rows(dqk, c.q_lora_rank));
  } else {
    w.q_proj = load_matrix(ckpt, p + "q_proj.weight", H * dqk, D, head_rows(dqk, D));
  }
  w.kv_a_proj = load_matrix(ckpt, p + "kv_a_proj_with_mqa.weight", c.latent_dim(), D);
  w.kv_a_norm = load_vector(ckpt, p + "kv_a_layernorm.weight", c.kv_lora_rank);
  w.kv_b_proj = load_matrix(ckpt, p + "kv_b_proj.weight", H * dkv, c.kv_lora_rank, head_rows(dkv, c.kv_lora_rank));
  w.o_proj = load_matrix(ckpt, p + "o_proj.weight", D, H * dv, Slice{0, D, h0 * dv, heads * dv});
  if (c.attention_bias) {
    if (c.has_q_lora())
      w.q_bias = load_vector(ckpt, p + "q_a_proj.bias", c.q_lora_rank);  // on q_a: replicated
    else
      w.q_bias = load_vector(ckpt, p + "q_proj.bias", H * dqk, h0 * dqk, heads * dqk);
    w.kv_a_bias = load_vector(ckpt, p + "kv_a_proj_with_mqa.bias", c.latent_dim());
    // Every rank reads o_proj's bias (D values), so that every rank refuses the same bad one.
    w.o_bias = load_vector(ckpt, p + "o_proj.bias", D);
    if (shard.world > 1) {
      w.o_bias_layer = w.o_bias;
      if (shard.rank != 0) std::fill(w.o_bias.begin(), w.o_bias.end(), 0.f);
    }
  }
  validate_weights(w, /*finite=*/false);  // every tensor was checked finite as it was read
  return w;
}

LayerWeights LayerWeights::random(const Config& c, uint64_t seed) {
  c.validate();
  Rng rng{seed * 0x2545f4914f6cdd1dull + 1};
  const int64_t H = c.num_heads, D = c.hidden_size, dqk = c.qk_head_dim();
  LayerWeights w;
  w.config = c;
  if (c.has_q_lora()) {
    w.q_a_proj = random_matrix(rng, c.q_lora_rank, D);
    w.q_a_norm = random_gain(rng, c.q_lora_rank);
    w.q_b_proj = random_matrix(rng, H * dqk, c.q_lora_rank);
  } else {
    w.q_proj = random_matrix(rng, H * dqk, D);
  }
  w.kv_a_proj = random_matrix(rng, c.latent_dim(), D);
  w.kv_a_norm = random_gain(rng, c.kv_lora_rank);
  w.kv_b_proj = random_matrix(rng, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  w.o_proj = random_matrix(rng, D, H * c.v_head_dim);
  if (c.attention_bias) {
    auto bias = [&](int64_t n) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = round_bf16(0.02f * rng.uniform());
      return v;
    };
    w.q_bias = bias(c.has_q_lora() ? c.q_lora_rank : H * dqk);
    w.kv_a_bias = bias(c.latent_dim());
    w.o_bias = bias(D);
  }
  return w;
}

namespace {

// Shapes against the config, and (finite) every value finite. The loader reads every tensor through
// check_finite already (naming its file), so it asks for the shapes alone: one pass over the weights, not two.
void validate_weights(const LayerWeights& w, bool finite) {
  const Config& c = w.config;
  c.validate();
  const int64_t H = c.num_heads, D = c.hidden_size, dqk = c.qk_head_dim();
  auto check = [&](const Matrix& m, const char* name, int64_t rows, int64_t cols) {
    if (m.rows != rows || m.cols != cols || static_cast<int64_t>(m.data.size()) != rows * cols)
      throw Error(std::string("weights: ") + name + " is " + shape_string(std::vector<int64_t>{m.rows, m.cols}) +
                  ", expected " + shape_string(std::vector<int64_t>{rows, cols}));
    if (finite) check_finite(m.data, cols, std::string("weights: ") + name);
  };
  auto check_vec = [&](const std::vector<float>& v, const char* name, int64_t n) {
    if (static_cast<int64_t>(v.size()) != n)
      throw Error(std::string("weights: ") + name + " has " + std::to_string(v.size()) + " values, expected " +
                  std::to_string(n));
    if (finite) check_finite(v, 0, std::string("weights: ") + name);
  };
  if (c.has_q_lora()) {
    check(w.q_a_proj, "q_a_proj", c.q_lora_rank, D);
    check_vec(w.q_a_norm, "q_a_layernorm", c.q_lora_rank);
    check(w.q_b_proj, "q_b_proj", H * dqk, c.q_lora_rank);
  } else {
    check(w.q_proj, "q_proj", H * dqk, D);
  }
  check(w.kv_a_proj, "kv_a_proj_with_mqa", c.latent_dim(), D);
  check_vec(w.kv_a_norm, "kv_a_layernorm", c.kv_lora_rank);
  check(w.kv_b_proj, "kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  check(w.o_proj, "o_proj", D, H * c.v_head_dim);
  if (c.attention_bias) {
    check_vec(w.q_bias, "q bias", c.has_q_lora() ? c.q_lora_rank : H * dqk);
    check_vec(w.kv_a_bias, "kv_a_proj_with_mqa.bias", c.latent_dim());
    check_vec(w.o_bias, "o_proj.bias", D);
  }
  if (w.heads.world < 1 || w.heads.rank < 0 || w.heads.rank >= w.heads.world)
    throw Error("weights: heads is rank " + std::to_string(w.heads.rank) + " of " + std::to_string(w.heads.world) +
                ", not a rank in [0, world)");
  check_vec(w.o_bias_layer, "o_bias_layer (the layer's o_proj.bias, kept by a shard)",
            c.attention_bias && w.heads.world > 1 ? D : 0);
}

}  // namespace

void LayerWeights::validate() const { validate_weights(*this, /*finite=*/true); }

LayerWeights LayerWeights::shard_heads(int64_t rank, int64_t world) const {
  const Config& c = config;
  check_head_shard("shard_heads", c.num_heads, HeadShard{rank, world});
  if (heads.world != 1)
    throw InvalidArgument("shard_heads: these weights are rank " + std::to_string(heads.rank) + " of " +
                          std::to_string(heads.world) + " already; shard the whole layer");
  const int64_t n_heads = c.num_heads / world, h0 = rank * n_heads;
  const int64_t dqk = c.qk_head_dim(), dkv = c.qk_nope_head_dim + c.v_head_dim, dv = c.v_head_dim;
  auto rows = [](const Matrix& m, int64_t first, int64_t count) {
    Matrix out;
    out.rows = count, out.cols = m.cols;
    out.data.assign(m.data.begin() + first * m.cols, m.data.begin() + (first + count) * m.cols);
    return out;
  };
  LayerWeights s;
  s.config = c;
  s.config.num_heads = n_heads;
  s.layer = layer;
  s.heads = HeadShard{rank, world};
  if (c.has_q_lora()) {
    s.q_a_proj = q_a_proj, s.q_a_norm = q_a_norm;
    s.q_b_proj = rows(q_b_proj, h0 * dqk, n_heads * dqk);
    s.q_bias = q_bias;  // on q_a: replicated
  } else {
    s.q_proj = rows(q_proj, h0 * dqk, n_heads * dqk);
    if (!q_bias.empty()) s.q_bias.assign(q_bias.begin() + h0 * dqk, q_bias.begin() + (h0 + n_heads) * dqk);
  }
  s.kv_a_proj = kv_a_proj, s.kv_a_norm = kv_a_norm, s.kv_a_bias = kv_a_bias;
  s.kv_b_proj = rows(kv_b_proj, h0 * dkv, n_heads * dkv);
  s.o_proj.rows = o_proj.rows, s.o_proj.cols = n_heads * dv;
  s.o_proj.data.resize(static_cast<size_t>(s.o_proj.rows * s.o_proj.cols));
  for (int64_t r = 0; r < o_proj.rows; ++r)
    std::copy_n(o_proj.row(r) + h0 * dv, n_heads * dv, s.o_proj.data.begin() + r * n_heads * dv);
  if (!o_bias.empty()) {
    s.o_bias = rank == 0 ? o_bias : std::vector<float>(o_bias.size(), 0.f);
    if (world > 1) s.o_bias_layer = o_bias;
  }
  validate_weights(s, /*finite=*/false);  // slices of weights that were validated (or loaded) already
  return s;
}

}  // namespace mla
