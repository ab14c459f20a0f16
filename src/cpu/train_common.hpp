// What the training reference (train_reference.cpp) and the fast path (train.cpp) share: the argument checks, so
// that both reject the same inputs with the same messages, and the rope positions of every token.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "mla/config.hpp"
#include "mla/error.hpp"

namespace mla::train::detail {

inline void check_lengths(std::span<const int32_t> cu, int64_t tokens, const char* what) {
  if (cu.size() < 1 || cu.front() != 0)
    throw InvalidArgument(std::string(what) + ": cu_seqlens must start with 0 (got " +
                          (cu.empty() ? std::string("an empty array") : std::to_string(cu.front())) + ")");
  for (size_t b = 1; b < cu.size(); ++b)
    if (cu[b] < cu[b - 1])
      throw InvalidArgument(std::string(what) + ": cu_seqlens[" + std::to_string(b) + "] = " + std::to_string(cu[b]) +
                            " is below cu_seqlens[" + std::to_string(b - 1) + "] = " + std::to_string(cu[b - 1]));
  if (cu.back() != tokens)
    throw InvalidArgument(std::string(what) + ": cu_seqlens ends at " + std::to_string(cu.back()) + " but there are " +
                          std::to_string(tokens) + " tokens");
}

inline void check_finite(std::span<const float> v, int64_t width, const char* what, const char* name) {
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      throw InvalidArgument(std::string(what) + ": " + name + "[" + std::to_string(static_cast<int64_t>(i) / width) +
                            ", " + std::to_string(static_cast<int64_t>(i) % width) + "] is not finite");
}

// Checks forward's arguments (hidden [T, D], cu_seqlens [batch + 1], positions [T] or empty) and returns the rope
// position of every token: positions, or 0 .. n-1 within each sequence.
inline std::vector<int64_t> check_forward_args(const Config& c, std::span<const float> hidden,
                                               std::span<const int32_t> cu_seqlens, std::span<const int64_t> positions,
                                               const char* op) {
  const int64_t D = c.hidden_size;
  if (hidden.size() % static_cast<size_t>(D) != 0)
    throw InvalidArgument(std::string(op) + ": hidden has " + std::to_string(hidden.size()) +
                          " values, not a multiple of hidden_size " + std::to_string(D));
  const int64_t T = static_cast<int64_t>(hidden.size()) / D;
  check_lengths(cu_seqlens, T, op);
  if (!positions.empty() && static_cast<int64_t>(positions.size()) != T)
    throw InvalidArgument(std::string(op) + ": positions has " + std::to_string(positions.size()) + " entries for " +
                          std::to_string(T) + " tokens");
  check_finite(hidden, D, op, "hidden");
  std::vector<int64_t> pos(static_cast<size_t>(T));
  for (size_t b = 0; b + 1 < cu_seqlens.size(); ++b)
    for (int32_t t = cu_seqlens[b]; t < cu_seqlens[b + 1]; ++t)
      pos[static_cast<size_t>(t)] = positions.empty() ? t - cu_seqlens[b] : positions[static_cast<size_t>(t)];
  for (int64_t p : pos)
    if (p < 0) throw InvalidArgument(std::string(op) + ": positions must be >= 0 (got " + std::to_string(p) + ")");
  return pos;
}

// Checks backward's d_out [T, D] against the saved forward of `tokens` tokens whose hidden states held x_size values.
inline void check_backward_args(const Config& c, int64_t tokens, size_t x_size, std::span<const float> d_out,
                                const char* op) {
  const int64_t D = c.hidden_size;
  if (static_cast<int64_t>(d_out.size()) != tokens * D || static_cast<int64_t>(x_size) != tokens * D)
    throw InvalidArgument(std::string(op) + ": d_out has " + std::to_string(d_out.size()) +
                          " values; the forward had " + std::to_string(tokens) + " tokens of hidden_size " +
                          std::to_string(D) + " (is `saved` from this layer?)");
  check_finite(d_out, D, op, "d_out");
}

}  // namespace mla::train::detail
