// Reading and writing the safetensors format: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
// Files are memory-mapped: opening a 100 GB shard reads only its header; a tensor's bytes are read on access.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mla/dtype.hpp"

namespace mla {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int64_t numel() const;
};

// A read-only view of one tensor inside a mapped file. Valid while its SafetensorsFile lives.
struct TensorRef {
  TensorInfo info;
  const std::byte* data = nullptr;   // info.numel() * dtype_size(info.dtype) bytes, any alignment
  std::string file;                  // for messages
};

class SafetensorsFile {
 public:
  // Maps the file and validates the whole header: JSON, dtypes, shapes, offsets within the file and
  // matching numel·sizeof. Throws mla::Error naming the file and the tensor otherwise.
  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;

  const std::filesystem::path& path() const;
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;
  // Throws mla::Error "file: no tensor 'name'" when absent.
  TensorRef tensor(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const;

  // Element-converting readers (F32/F64/BF16/F16/F8_E4M3 -> f32; I64/I32 -> i64). Check rank and shape.
  std::vector<float> read_f32(const std::string& name, std::span<const int64_t> expected_shape = {}) const;
  std::vector<int64_t> read_i64(const std::string& name, std::span<const int64_t> expected_shape = {}) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "[2, 37, 256]": how every error message prints a shape.
std::string shape_string(std::span<const int64_t> shape);

// Converts any supported float dtype to f32 (numel elements).
void convert_to_f32(const TensorRef& t, float* out);

// Converts rows [row0, row0 + rows) of a 2-D tensor (a 1-D tensor is one row), and of each row only columns
// [col0, col0 + cols), to f32: out is row-major [rows, cols]. Reads those elements' bytes and no others (a
// tensor-parallel rank's slice of a projection; the OS still pages in whole pages around them). Throws
// mla::Error naming the tensor when it has another rank or the block is not inside its shape.
void convert_block_to_f32(const TensorRef& t, int64_t row0, int64_t rows, int64_t col0, int64_t cols, float* out);

// A tensor to write: f32 or i64 data owned by the caller.
struct TensorToWrite {
  std::string name;
  DType dtype;                       // F32 or I64
  std::vector<int64_t> shape;
  const void* data;
};

// Writes atomically: to a temporary file in the same folder, fsync, then rename over `path`.
// On any error the temporary is removed and `path` is untouched.
void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A checkpoint folder: model.safetensors, or shards listed in model.safetensors.index.json.
// Shards are opened lazily, only when one of their tensors is asked for.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& dir);
  ~Checkpoint();
  Checkpoint(Checkpoint&&) noexcept;

  const std::filesystem::path& dir() const;
  bool contains(const std::string& name) const;
  TensorRef tensor(const std::string& name) const;   // throws naming the tensor and the folder

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mla
