// One error type for the whole library. Messages name the file, tensor, expected and actual values.
#pragma once

#include <stdexcept>
#include <string>

namespace mla {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Bad arguments from the caller (shapes, ids, options): bindings map this to ValueError.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// The latent cache has no free page for a request; nothing was changed.
class OutOfPages : public Error {
 public:
  using Error::Error;
};

// A request the memory of this machine (or device) cannot hold; the message names the argument that sized it.
// Bindings map this to MemoryError.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

}  // namespace mla
