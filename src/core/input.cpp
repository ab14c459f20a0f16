#include "core/input.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

#include "mla/error.hpp"

namespace mla::detail {
namespace fs = std::filesystem;

namespace {

std::string errno_text(int err) { return std::system_category().message(err); }

const char* kind_name(fs::file_type t) {
  switch (t) {
    case fs::file_type::directory: return "a folder";
    case fs::file_type::character: return "a character device";
    case fs::file_type::block: return "a block device";
    case fs::file_type::fifo: return "a FIFO (named pipe)";
    case fs::file_type::socket: return "a socket";
    default: return "not a regular file";
  }
}

const char* kind_name(mode_t m) {
  if (S_ISDIR(m)) return kind_name(fs::file_type::directory);
  if (S_ISCHR(m)) return kind_name(fs::file_type::character);
  if (S_ISBLK(m)) return kind_name(fs::file_type::block);
  if (S_ISFIFO(m)) return kind_name(fs::file_type::fifo);
  if (S_ISSOCK(m)) return kind_name(fs::file_type::socket);
  return "not a regular file";
}

[[noreturn]] void fail(const fs::path& path, const std::string& what) { throw Error(path.string() + ": " + what); }

// Why `path` cannot be opened, checked without opening it.
void check_before_open(const fs::path& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);  // follows symlinks
  if (st.type() == fs::file_type::not_found) {
    // "model/config.json" where "model" is a file: say so rather than "does not exist".
    const fs::path parent = path.parent_path();
    std::error_code pec;
    if (!parent.empty() && fs::exists(parent, pec) && !fs::is_directory(parent, pec))
      fail(path, "cannot open: '" + parent.string() + "' is a file, not a folder");
    fail(path, "cannot open: " + (ec ? ec.message() : errno_text(ENOENT)));
  }
  if (ec) fail(path, "cannot access: " + ec.message());
  if (st.type() != fs::file_type::regular) fail(path, std::string("is ") + kind_name(st.type()) + ", not a regular file");
}

}  // namespace

OpenFile open_regular_file(const fs::path& path) {
  check_before_open(path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, "cannot stat: " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, std::string("is ") + kind_name(st.st_mode) + ", not a regular file");
  }
  return {fd, static_cast<uint64_t>(st.st_size)};
}

void check_checkpoint_folder(const fs::path& dir) {
  const std::string where = "checkpoint folder '" + dir.string() + "'";
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (st.type() == fs::file_type::not_found) throw Error(where + " does not exist");
  if (ec) throw Error(where + ": cannot access: " + ec.message());
  if (st.type() != fs::file_type::directory) throw Error(where + " is not a folder");
}

std::string read_small_file(const fs::path& path, uint64_t max_bytes) {
  const OpenFile f = open_regular_file(path);
  auto too_large = [&](uint64_t bytes) {
    ::close(f.fd);
    fail(path, "is " + std::to_string(bytes) + " bytes, more than the limit of " + std::to_string(max_bytes) +
                   " bytes for a JSON file");
  };
  if (f.size > max_bytes) too_large(f.size);
  std::string text(static_cast<size_t>(f.size), '\0');
  size_t done = 0;
  for (;;) {
    // The file may grow after fstat: keep reading to EOF, but never past the limit.
    if (done == text.size()) {
      if (text.size() > max_bytes) too_large(text.size());
      text.resize(std::min<size_t>(text.size() + 65536, static_cast<size_t>(max_bytes) + 1));
    }
    const ssize_t n = ::read(f.fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(f.fd);
      fail(path, "cannot read: " + errno_text(err));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(f.fd);
  text.resize(done);
  return text;
}

int64_t checked_mul(int64_t a, int64_t b, std::string_view what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r))
    throw Error(std::string(what) + ": " + std::to_string(a) + " x " + std::to_string(b) + " overflows int64");
  return r;
}

}  // namespace mla::detail
