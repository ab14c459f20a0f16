#include "mla/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string_view>
#include <system_error>

#include <nlohmann/json.hpp>

#include "core/input.hpp"
#include "mla/error.hpp"

namespace mla {

// The format is little-endian and tensors are read in place from the mapping.
static_assert(std::endian::native == std::endian::little, "safetensors data is read in place: needs a little-endian host");

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kIndexName = "model.safetensors.index.json";
constexpr std::string_view kSingleName = "model.safetensors";
// The official reader's limit (safetensors MAX_HEADER_SIZE); V3's largest shard header is about 40 kB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::string errno_text(int err) { return std::system_category().message(err); }

std::optional<DType> known_dtype(std::string_view name) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::F8_E4M3, DType::I64, DType::I32}) {
    if (dtype_name(t) == name) return t;
  }
  return std::nullopt;
}

// Bits per element of the safetensors dtypes this library cannot convert: still size-checked at open so that a
// corrupt header is caught early, even for tensors nobody will ask for. A name in neither list is refused.
std::optional<uint64_t> other_dtype_bits(std::string_view name) {
  if (name == "F4") return 4;
  if (name == "F6_E2M3" || name == "F6_E3M2") return 6;
  if (name == "BOOL" || name == "U8" || name == "I8" || name == "F8_E5M2" || name == "F8_E8M0") return 8;
  if (name == "U16" || name == "I16") return 16;
  if (name == "U32") return 32;
  if (name == "U64" || name == "C64") return 64;
  return std::nullopt;
}

std::optional<uint64_t> as_non_negative(const json& j) {
  if (j.is_number_unsigned()) return j.get<uint64_t>();
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v >= 0) return static_cast<uint64_t>(v);
  }
  return std::nullopt;
}

// Element count, or nullopt on overflow: a hostile header must not wrap around the size checks.
std::optional<uint64_t> checked_numel(std::span<const int64_t> shape) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

struct Entry {
  std::string dtype_name;
  std::optional<DType> dtype;   // nullopt: listed in the file but not convertible by this library
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, d, &n))
      throw Error("tensor '" + name + "': element count of shape " + shape_string(shape) + " overflows int64");
  }
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// SafetensorsFile

struct SafetensorsFile::Impl {
  fs::path path;
  std::string where;   // path as text, the prefix of every message
  void* map = nullptr;
  size_t map_size = 0;
  const std::byte* data = nullptr;   // start of the data section
  uint64_t data_size = 0;
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;

  ~Impl() {
    if (map) munmap(map, map_size);
  }

  [[noreturn]] void fail(const std::string& msg) const { throw Error(where + ": " + msg); }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& msg) const {
    fail("tensor '" + name + "': " + msg);
  }

  void map_file();
  json parse_header();
  void parse_metadata(const json& j);
  void parse_entry(const std::string& name, const json& j);
  void check_layout() const;
  const Entry& find(const std::string& name) const;
  TensorRef ref(const std::string& name) const;
  void check_shape(const TensorRef& t, std::span<const int64_t> expected) const;
};

void SafetensorsFile::Impl::map_file() {
  const detail::OpenFile f = detail::open_regular_file(path);  // refuses FIFOs and devices before opening
  const uint64_t size = f.size;
  if (size == 0) {
    ::close(f.fd);
    fail("file is empty (0 bytes); a safetensors file starts with an 8-byte header length");
  }
  if (size < 8) {
    ::close(f.fd);
    fail("file is only " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, f.fd, 0);
  const int err = errno;
  ::close(f.fd);   // the mapping keeps the file alive
  if (p == MAP_FAILED) fail("cannot mmap " + std::to_string(size) + " bytes: " + errno_text(err));
  map = p;
  map_size = size;
}

json SafetensorsFile::Impl::parse_header() {
  const auto* bytes = static_cast<const unsigned char*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  const uint64_t file_size = map_size;
  if (header_len > file_size - 8) {
    fail("header length " + std::to_string(header_len) + " exceeds the file size " + std::to_string(file_size) +
         " (not a safetensors file, or truncated?)");
  }
  if (header_len > kMaxHeaderBytes) {
    fail("header length " + std::to_string(header_len) + " is over the format's limit of " +
         std::to_string(kMaxHeaderBytes) + " bytes");
  }
  const char* begin = reinterpret_cast<const char*>(bytes + 8);
  data = reinterpret_cast<const std::byte*>(begin + header_len);
  data_size = file_size - 8 - header_len;
  json header;
  try {
    // The header is one JSON object filling bytes [8, 8+N) exactly: strict parsing refuses trailing bytes other
    // than whitespace (the padding writers add), and check_layout() a length that cuts into the padding.
    header = json::parse(begin, begin + header_len);
  } catch (const json::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) fail("header is not a JSON object");
  return header;
}

void SafetensorsFile::Impl::parse_metadata(const json& j) {
  if (!j.is_object()) fail("__metadata__ is not a JSON object");
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string()) fail("__metadata__ entry '" + key + "' is not a string");
    metadata[key] = value.get<std::string>();
  }
}

void SafetensorsFile::Impl::parse_entry(const std::string& name, const json& j) {
  if (!j.is_object()) fail_tensor(name, "entry is not a JSON object");
  Entry e;

  const auto dt = j.find("dtype");
  if (dt == j.end() || !dt->is_string()) fail_tensor(name, "missing or non-string 'dtype'");
  e.dtype_name = dt->get<std::string>();
  e.dtype = known_dtype(e.dtype_name);
  const std::optional<uint64_t> bits =
      e.dtype ? std::optional<uint64_t>(8 * dtype_size(*e.dtype)) : other_dtype_bits(e.dtype_name);
  if (!bits) fail_tensor(name, "unknown dtype '" + e.dtype_name + "' (not a safetensors dtype)");

  const auto sh = j.find("shape");
  if (sh == j.end() || !sh->is_array()) fail_tensor(name, "missing or non-array 'shape'");
  for (const json& d : *sh) {
    const auto v = as_non_negative(d);
    if (!v || *v > static_cast<uint64_t>(INT64_MAX)) {
      fail_tensor(name, "'shape' must hold non-negative integers, got " + sh->dump());
    }
    e.shape.push_back(static_cast<int64_t>(*v));
  }

  const auto off = j.find("data_offsets");
  if (off == j.end() || !off->is_array() || off->size() != 2) {
    fail_tensor(name, "missing 'data_offsets' [begin, end]");
  }
  const auto b = as_non_negative((*off)[0]);
  const auto en = as_non_negative((*off)[1]);
  if (!b || !en) fail_tensor(name, "'data_offsets' must be non-negative integers, got " + off->dump());
  e.begin = *b;
  e.end = *en;
  const std::string offsets = "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
  if (e.begin > e.end) fail_tensor(name, offsets + " begin after end");
  if (e.end > data_size) {
    fail_tensor(name, offsets + " extend beyond the " + std::to_string(data_size) +
                          " data bytes of the file (truncated?)");
  }

  const auto numel = checked_numel(e.shape);
  uint64_t expected_bits = 0;
  const uint64_t actual = e.end - e.begin;
  if (!numel || __builtin_mul_overflow(*numel, *bits, &expected_bits)) {
    fail_tensor(name, "shape " + shape_string(e.shape) + " is too large (" + offsets + " hold " +
                          std::to_string(actual) + " bytes)");
  }
  if (expected_bits % 8 != 0) {
    fail_tensor(name, "dtype " + e.dtype_name + " and shape " + shape_string(e.shape) + " do not fill whole bytes");
  }
  const uint64_t expected = expected_bits / 8;
  if (expected != actual) {
    fail_tensor(name, "dtype " + e.dtype_name + " and shape " + shape_string(e.shape) + " need " +
                          std::to_string(expected) + " bytes, but " + offsets + " hold " + std::to_string(actual) +
                          " bytes");
  }
  entries.emplace(name, std::move(e));
}

// The format requires the tensors to tile the data section: sorted, no overlap, no hole, nothing after the last.
// This is what catches a header length or offsets moved by a few bytes, which would otherwise read every
// tensor shifted (and, with the header's trailing spaces, still parse).
void SafetensorsFile::Impl::check_layout() const {
  std::vector<std::pair<const std::string*, const Entry*>> order;
  order.reserve(entries.size());
  for (const auto& [name, e] : entries) order.emplace_back(&name, &e);
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return std::pair(a.second->begin, a.second->end) < std::pair(b.second->begin, b.second->end);
  });
  auto span = [](const Entry& e) {
    std::string s = "[";  // built by += : GCC 12 warns falsely (-Wrestrict) on "[" + std::string here
    s += std::to_string(e.begin);
    s += ", ";
    s += std::to_string(e.end);
    return s + "]";
  };
  uint64_t covered = 0;
  const std::string* previous = nullptr;
  for (const auto& [name, e] : order) {
    if (e->begin < covered) {
      fail_tensor(*name, "data_offsets " + span(*e) + " overlap tensor '" + *previous + "', which ends at " +
                             std::to_string(covered));
    }
    if (e->begin > covered) {
      fail_tensor(*name, "data_offsets " + span(*e) + " leave data bytes [" + std::to_string(covered) + ", " +
                             std::to_string(e->begin) + ") in no tensor (the format allows no holes; offsets or "
                             "header length wrong?)");
    }
    covered = e->end;
    previous = name;
  }
  if (covered != data_size) {
    fail("the tensors cover " + std::to_string(covered) + " of the " + std::to_string(data_size) +
         " data bytes; the rest belongs to no tensor (header length or offsets wrong?)");
  }
}

const Entry& SafetensorsFile::Impl::find(const std::string& name) const {
  const auto it = entries.find(name);
  if (it == entries.end()) fail("no tensor '" + name + "'");
  return it->second;
}

TensorRef SafetensorsFile::Impl::ref(const std::string& name) const {
  const Entry& e = find(name);
  if (!e.dtype) {
    fail_tensor(name, "unsupported dtype '" + e.dtype_name + "' (supported: F64, F32, F16, BF16, F8_E4M3, I64, I32)");
  }
  TensorRef t;
  t.info.name = name;
  t.info.dtype = *e.dtype;
  t.info.shape = e.shape;
  t.data = data + e.begin;
  t.file = where;
  return t;
}

void SafetensorsFile::Impl::check_shape(const TensorRef& t, std::span<const int64_t> expected) const {
  if (expected.empty()) return;
  if (std::equal(expected.begin(), expected.end(), t.info.shape.begin(), t.info.shape.end())) return;
  fail("tensor '" + t.info.name + "' has shape " + shape_string(t.info.shape) + ", expected " + shape_string(expected));
}

SafetensorsFile::SafetensorsFile(const fs::path& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->where = path.string();
  impl_->map_file();
  const json header = impl_->parse_header();
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      impl_->parse_metadata(value);
    } else {
      impl_->parse_entry(key, value);
    }
  }
  impl_->check_layout();
}

SafetensorsFile::~SafetensorsFile() = default;
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;

const fs::path& SafetensorsFile::path() const { return impl_->path; }

bool SafetensorsFile::contains(const std::string& name) const { return impl_->entries.count(name) != 0; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->entries.size());
  for (const auto& [name, entry] : impl_->entries) out.push_back(name);
  return out;
}

TensorRef SafetensorsFile::tensor(const std::string& name) const { return impl_->ref(name); }

const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }

std::vector<float> SafetensorsFile::read_f32(const std::string& name, std::span<const int64_t> expected_shape) const {
  const TensorRef t = impl_->ref(name);
  impl_->check_shape(t, expected_shape);
  std::vector<float> out;
  try {
    out.resize(static_cast<size_t>(t.info.numel()));
  } catch (const std::bad_alloc&) {
    impl_->fail_tensor(name, "out of memory for " + std::to_string(t.info.numel()) + " f32 values");
  }
  convert_to_f32(t, out.data());
  return out;
}

std::vector<int64_t> SafetensorsFile::read_i64(const std::string& name, std::span<const int64_t> expected_shape) const {
  const TensorRef t = impl_->ref(name);
  impl_->check_shape(t, expected_shape);
  const auto n = static_cast<size_t>(t.info.numel());
  std::vector<int64_t> out(n);
  if (t.info.dtype == DType::I64) {
    if (n) std::memcpy(out.data(), t.data, n * sizeof(int64_t));
  } else if (t.info.dtype == DType::I32) {
    for (size_t i = 0; i < n; ++i) {
      int32_t v;
      std::memcpy(&v, t.data + i * sizeof v, sizeof v);
      out[i] = v;
    }
  } else {
    impl_->fail_tensor(name, "has dtype " + std::string(dtype_name(t.info.dtype)) + ", expected I64 or I32");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Conversion

namespace {

// memcpy per element: mapped tensors start at arbitrary byte offsets, so typed loads could be misaligned.
template <typename Raw, typename Decode>
void convert_each(const std::byte* src, size_t n, float* out, Decode decode) {
  for (size_t i = 0; i < n; ++i) {
    Raw v;
    std::memcpy(&v, src + i * sizeof(Raw), sizeof(Raw));
    out[i] = decode(v);
  }
}

}  // namespace

std::string shape_string(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {

// n elements of t's dtype starting at src, to f32.
void convert_run(const TensorRef& t, const std::byte* src, size_t n, float* out) {
  switch (t.info.dtype) {
    case DType::F32:
      if (n) std::memcpy(out, src, n * sizeof(float));
      return;
    case DType::F64:
      convert_each<double>(src, n, out, [](double v) { return static_cast<float>(v); });
      return;
    case DType::BF16:
      convert_each<uint16_t>(src, n, out, bf16_to_float);
      return;
    case DType::F16:
      convert_each<uint16_t>(src, n, out, f16_to_float);
      return;
    case DType::F8_E4M3:
      convert_each<uint8_t>(src, n, out, fp8_e4m3_to_float);
      return;
    case DType::I64:
    case DType::I32:
      break;
  }
  throw Error(t.file + ": tensor '" + t.info.name + "' has dtype " + std::string(dtype_name(t.info.dtype)) +
              ", which is not a float dtype");
}

}  // namespace

void convert_to_f32(const TensorRef& t, float* out) {
  convert_run(t, t.data, static_cast<size_t>(t.info.numel()), out);
}

void convert_block_to_f32(const TensorRef& t, int64_t row0, int64_t rows, int64_t col0, int64_t cols, float* out) {
  const std::vector<int64_t>& shape = t.info.shape;
  if (shape.size() != 1 && shape.size() != 2)
    throw Error(t.file + ": tensor '" + t.info.name + "' has shape " + shape_string(shape) +
                "; a block is read from a 1-D or 2-D tensor");
  const int64_t n_rows = shape.size() == 2 ? shape[0] : 1, n_cols = shape.back();
  if (row0 < 0 || rows < 0 || col0 < 0 || cols < 0 || row0 > n_rows - rows || col0 > n_cols - cols)
    throw Error(t.file + ": tensor '" + t.info.name + "' of shape " + shape_string(shape) + ": block rows [" +
                std::to_string(row0) + ", +" + std::to_string(rows) + "), columns [" + std::to_string(col0) + ", +" +
                std::to_string(cols) + ") is not inside it");
  const auto size = static_cast<size_t>(dtype_size(t.info.dtype));
  for (int64_t r = 0; r < rows; ++r) {
    const std::byte* src = t.data + (static_cast<size_t>(row0 + r) * static_cast<size_t>(n_cols) +
                                     static_cast<size_t>(col0)) * size;
    convert_run(t, src, static_cast<size_t>(cols), out + r * cols);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Writing

namespace {

// Owns the temporary file until it is renamed into place; removes it on every failure path.
class TempFile {
 public:
  explicit TempFile(const fs::path& target) : target_(target.string()) {
    static std::atomic<uint64_t> counter{0};
    // pid + counter keep concurrent writers (other processes, other threads) off each other's temporaries.
    tmp_ = target;
    tmp_ += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) fail("cannot create temporary file");
  }
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  void write_all(const void* p, size_t n) {
    const auto* bytes = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd_, bytes, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write temporary file");
      }
      bytes += w;
      n -= static_cast<size_t>(w);
    }
  }

  void commit() {
    // fsync before rename: otherwise a crash can leave `target` renamed but holding no data.
    if (::fsync(fd_) != 0) fail("cannot fsync temporary file");
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail("cannot close temporary file");
    if (::rename(tmp_.c_str(), target_.c_str()) != 0) fail("cannot rename temporary file into place");
    committed_ = true;
    sync_parent();
  }

 private:
  // Reads errno first: building the message may call functions that overwrite it.
  [[noreturn]] void fail(const char* what) const {
    const int err = errno;
    throw Error(target_ + ": " + what + " '" + tmp_.string() + "': " + errno_text(err));
  }

  // Makes the rename itself durable. Best effort: the new file is already complete and in place.
  void sync_parent() const {
    fs::path parent = fs::path(target_).parent_path();
    if (parent.empty()) parent = ".";
    const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return;
    ::fsync(dfd);
    ::close(dfd);
  }

  std::string target_;
  fs::path tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

std::string make_header(const std::string& where, std::span<const TensorToWrite> tensors,
                        const std::map<std::string, std::string>& metadata, std::vector<uint64_t>& sizes) {
  json header = json::object();
  if (!metadata.empty()) header[std::string(kMetadataKey)] = metadata;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    const std::string what = where + ": tensor '" + t.name + "': ";
    if (t.name.empty() || t.name == kMetadataKey) throw Error(what + "invalid tensor name");
    if (header.contains(t.name)) throw Error(what + "written twice");
    for (int64_t d : t.shape) {
      if (d < 0) throw Error(what + "negative dimension in shape " + shape_string(t.shape));
    }
    uint64_t bytes = 0;
    const auto numel = checked_numel(t.shape);
    if (!numel || __builtin_mul_overflow(*numel, static_cast<uint64_t>(dtype_size(t.dtype)), &bytes)) {
      throw Error(what + "shape " + shape_string(t.shape) + " is too large");
    }
    if (bytes > 0 && t.data == nullptr) throw Error(what + "no data");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    sizes.push_back(bytes);
  }
  std::string text = header.dump();
  // Padding keeps the data section 8-byte aligned within the file, as other writers do.
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

}  // namespace

void write_safetensors(const fs::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string where = path.string();
  std::vector<uint64_t> sizes;
  const std::string header = make_header(where, tensors, metadata, sizes);

  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(header.size()) >> (8 * i));

  TempFile tmp(path);
  tmp.write_all(len, sizeof len);
  tmp.write_all(header.data(), header.size());
  for (size_t i = 0; i < tensors.size(); ++i) tmp.write_all(tensors[i].data, sizes[i]);
  tmp.commit();
}

// ---------------------------------------------------------------------------------------------------------
// Checkpoint

struct Checkpoint::Impl {
  fs::path dir;
  std::string where;   // "checkpoint 'dir'"
  std::optional<std::map<std::string, std::string>> weight_map;   // set when the checkpoint is sharded
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards;   // by file name, opened on demand

  void check_dir() const;
  void load_index(const fs::path& index_path);
  const SafetensorsFile& shard(const std::string& file, const std::string& tensor_name) const;
  const SafetensorsFile* file_for(const std::string& name) const;
};

void Checkpoint::Impl::check_dir() const { detail::check_checkpoint_folder(dir); }

namespace {

// A shard the index names must be a file inside the checkpoint folder: a relative path without "..", so that
// a downloaded index cannot make the loader map /etc/passwd or ../other-model. The check is on the name, not on
// where symlinks lead: the Hugging Face cache links every file of a snapshot to ../../blobs/<hash>.
void check_shard_name(const std::string& where_index, const std::string& tensor, const std::string& file) {
  auto bad = [&](const std::string& why) {
    throw Error(where_index + ": weight_map entry '" + tensor + "' names shard '" + file + "', which " + why +
                "; shards must be files inside the checkpoint folder");
  };
  if (file.empty()) bad("is empty");
  if (file.find('\0') != std::string::npos) bad("holds a NUL byte");
  const fs::path p(file);
  if (p.has_root_path()) bad("is an absolute path");
  for (const fs::path& part : p) {
    if (part == "..") bad("goes up with '..'");
  }
  if (p.lexically_normal().empty() || p.lexically_normal() == ".") bad("is the folder itself");
}

}  // namespace

void Checkpoint::Impl::load_index(const fs::path& index_path) {
  const std::string where_index = index_path.string();
  const std::string text = detail::read_small_file(index_path);  // a regular file of at most 64 MiB
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(where_index + ": not valid JSON: " + e.what());
  }
  const auto wm = index.is_object() ? index.find("weight_map") : index.end();
  if (!index.is_object() || wm == index.end() || !wm->is_object()) {
    throw Error(where_index + ": has no 'weight_map' object");
  }
  std::map<std::string, std::string> map;
  for (const auto& [name, file] : wm->items()) {
    if (!file.is_string()) throw Error(where_index + ": weight_map entry '" + name + "' is not a file name");
    check_shard_name(where_index, name, file.get<std::string>());
    map[name] = file.get<std::string>();
  }
  weight_map = std::move(map);
}

const SafetensorsFile& Checkpoint::Impl::shard(const std::string& file, const std::string& tensor_name) const {
  auto it = shards.find(file);
  if (it != shards.end()) return *it->second;
  const fs::path p = dir / file;
  std::error_code ec;
  if (!fs::exists(p, ec)) {
    throw Error(where + ": tensor '" + tensor_name + "' is listed in " + std::string(kIndexName) + " under shard '" +
                file + "', but that shard file is missing");
  }
  auto opened = std::make_unique<SafetensorsFile>(p);
  return *shards.emplace(file, std::move(opened)).first->second;
}

// The file that holds `name`, or nullptr when no file is expected to hold it.
const SafetensorsFile* Checkpoint::Impl::file_for(const std::string& name) const {
  if (!weight_map) return shards.begin()->second.get();
  const auto it = weight_map->find(name);
  if (it == weight_map->end()) return nullptr;
  return &shard(it->second, name);
}

Checkpoint::Checkpoint(const fs::path& dir) : impl_(std::make_unique<Impl>()) {
  impl_->dir = dir;
  impl_->where = "checkpoint '" + dir.string() + "'";
  impl_->check_dir();
  std::error_code ec;
  const fs::path index_path = dir / kIndexName;
  if (fs::exists(index_path, ec)) {
    impl_->load_index(index_path);
    return;
  }
  const fs::path single = dir / kSingleName;
  if (!fs::exists(single, ec)) {
    throw Error(impl_->where + ": found neither " + std::string(kIndexName) + " nor " + std::string(kSingleName));
  }
  // A single file is opened now: contains() needs its header, and reading it costs one page.
  impl_->shards.emplace(std::string(kSingleName), std::make_unique<SafetensorsFile>(single));
}

Checkpoint::~Checkpoint() = default;
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;

const fs::path& Checkpoint::dir() const { return impl_->dir; }

bool Checkpoint::contains(const std::string& name) const {
  if (impl_->weight_map) return impl_->weight_map->count(name) != 0;
  return impl_->shards.begin()->second->contains(name);
}

TensorRef Checkpoint::tensor(const std::string& name) const {
  const SafetensorsFile* file = impl_->file_for(name);
  if (!file) {
    throw Error(impl_->where + ": no tensor '" + name + "' (not listed in " + std::string(kIndexName) + ")");
  }
  if (!file->contains(name)) {
    std::string msg = impl_->where + ": no tensor '" + name + "' in " + file->path().filename().string();
    if (impl_->weight_map) msg += ", although " + std::string(kIndexName) + " lists it there";
    throw Error(msg);
  }
  return file->tensor(name);
}

}  // namespace mla
