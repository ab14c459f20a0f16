#include "mla/ops.hpp"

#include "core/backend.hpp"
#include "mla/error.hpp"

namespace mla {

void decode_attention(std::string_view device, const DecodeParams& p) {
  detail::find_backend(device).decode_attention(p);
}

void prefill_attention(std::string_view device, const PrefillParams& p) {
  detail::find_backend(device).prefill_attention(p);
}

}  // namespace mla
