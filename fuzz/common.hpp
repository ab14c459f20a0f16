// Helpers shared by the libFuzzer targets: the library's parsers take paths, so each input is handed to them as
// a file that lives in memory (memfd), reached through /proc/self/fd. No disk I/O per input, and the real
// open/fstat/mmap path runs exactly as it does for a checkpoint on disk.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace mla_fuzz {

// One in-memory file, rewritten for every input.
class MemFile {
 public:
  explicit MemFile(const char* name) : fd_(::memfd_create(name, MFD_CLOEXEC)) {
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;

  void replace(const uint8_t* data, size_t size) const {
    if (::ftruncate(fd_, 0) != 0) fatal("ftruncate");
    size_t done = 0;
    while (done < size) {
      const ssize_t w = ::pwrite(fd_, data + done, size - done, static_cast<off_t>(done));
      if (w <= 0) fatal("pwrite");
      done += static_cast<size_t>(w);
    }
  }
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] static void fatal(const char* what) {
    std::perror(what);   // a harness failure, not a finding: stop loudly rather than fuzz nothing
    std::abort();
  }
  int fd_;
  std::string path_;
};

}  // namespace mla_fuzz
