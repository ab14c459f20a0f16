// Guards for reading untrusted checkpoint files (docs/mla.md, "Input limits"): opening that never blocks on a
// FIFO nor reads a device, bounded reads of small JSON files, and overflow-checked size arithmetic.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace mla::detail {

// config.json and model.safetensors.index.json: real ones are a few kB and a few MB (V3's index: 8.9 MB).
inline constexpr uint64_t kMaxJsonFileBytes = uint64_t{64} << 20;

struct OpenFile {
  int fd = -1;        // the caller closes it
  uint64_t size = 0;  // bytes, from fstat of the opened file
};

// Opens `path` read-only. Symlinks are followed, but the target must be a regular file, checked before open()
// (a FIFO would block it, /dev/zero never ends) and again on the opened descriptor (O_NONBLOCK, so a file
// swapped for a FIFO in between cannot block either). Throws mla::Error "<path>: <what is wrong>".
OpenFile open_regular_file(const std::filesystem::path& path);

// Throws mla::Error "checkpoint folder '<dir>' ..." unless `dir` is a folder (symlinks followed): says whether it
// does not exist, is something else, or cannot be read, instead of a filesystem_error.
void check_checkpoint_folder(const std::filesystem::path& dir);

// The whole file as text, refused by name when larger than max_bytes.
std::string read_small_file(const std::filesystem::path& path, uint64_t max_bytes = kMaxJsonFileBytes);

// a·b for sizes derived from untrusted numbers; throws mla::Error "<what>: a x b overflows" instead of wrapping.
int64_t checked_mul(int64_t a, int64_t b, std::string_view what);

}  // namespace mla::detail
