#include "core/backend.hpp"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <new>

#include "mla/error.hpp"

namespace mla::detail {

// Each backend defines its accessor in its own folder; the CUDA one exists only in CUDA builds.
const Backend& cpu_backend();
const Backend& cpu_reference_backend();
#ifdef MLA_WITH_CUDA
const Backend* cuda_backend_if_usable();  // null when no GPU is present
#endif

std::vector<const Backend*> all_backends() {
  std::vector<const Backend*> list{&cpu_backend(), &cpu_reference_backend()};
#ifdef MLA_WITH_CUDA
  if (const Backend* cuda = cuda_backend_if_usable()) list.push_back(cuda);
#endif
  return list;
}

const Backend& find_backend(std::string_view name) {
  std::string known;
  for (const Backend* b : all_backends()) {
    if (b->name() == name) return *b;
    known += (known.empty() ? "" : ", ") + std::string(b->name());
  }
  std::string why;
  if (name == "cuda") {
#ifdef MLA_WITH_CUDA
    why = " (this build has CUDA support, but no usable GPU was found)";
#else
    why = " (this build has no CUDA support: configure with -DMLA_WITH_CUDA=ON)";
#endif
  }
  throw InvalidArgument("unknown device '" + std::string(name) + "'" + why + "; available: " + known);
}

namespace {

class HostPages final : public Buffer {
 public:
  // std::bad_alloc when the machine cannot hold `bytes`: the caller names what it was for. Larger than the
  // physical memory is refused before asking: with overcommit the allocation would succeed and the zero fill
  // below would end in the OOM killer instead of an error.
  explicit HostPages(int64_t bytes) {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (bytes < 0 || (pages > 0 && page > 0 && bytes / page >= pages)) throw std::bad_alloc();
    const size_t rounded = (static_cast<size_t>(bytes) + 63) / 64 * 64;
    data_ = static_cast<std::byte*>(std::aligned_alloc(64, rounded));
    if (!data_) throw std::bad_alloc();
    std::memset(data_, 0, rounded);
  }
  ~HostPages() override { std::free(data_); }
  void* data() override { return data_; }
  void copy_to_host(int64_t offset, int64_t bytes, void* dst) const override {
    std::memcpy(dst, data_ + offset, static_cast<size_t>(bytes));
  }
  void copy_from_host(int64_t offset, int64_t bytes, const void* src) override {
    std::memcpy(data_ + offset, src, static_cast<size_t>(bytes));
  }

 private:
  std::byte* data_;
};

}  // namespace

std::unique_ptr<Buffer> allocate_host(int64_t bytes) { return std::make_unique<HostPages>(bytes); }

}  // namespace mla::detail
