#include "cpu/ops.hpp"

#include "mla/error.hpp"

namespace mla::cpu {

void decode_attention(const DecodeParams&) { throw Error("decode_attention: not yet implemented on the CPU"); }
void prefill_attention(const PrefillParams&) { throw Error("prefill_attention: not yet implemented on the CPU"); }

}  // namespace mla::cpu
