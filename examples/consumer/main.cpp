// Prefill 8 tokens and decode one with a random V2-Lite-shaped layer through the installed library.
#include <mla/mla.hpp>

#include <cstdio>
#include <vector>

int main() {
  mla::Config c = mla::Config::preset("v2-lite");
  mla::Attention layer(mla::LayerWeights::random(c, 1), {.device = "cpu", .precision = mla::Precision::BF16});
  mla::LatentCache cache = layer.make_cache(4, 16);
  const mla::SeqId s = cache.add_sequence();
  std::vector<float> x(9 * c.hidden_size, 0.25f), out(x.size());
  const mla::SequenceChunk prefill{s, 8, nullptr}, decode{s, 1, nullptr};
  layer.forward({&prefill, 1}, x.data(), out.data(), cache);
  layer.forward({&decode, 1}, x.data() + 8 * c.hidden_size, out.data() + 8 * c.hidden_size, cache);
  std::printf("consumer: %lld tokens cached, out[0] = %g\n", static_cast<long long>(cache.length(s)), out[0]);
  return cache.length(s) == 9 ? 0 : 1;
}
