// Appends a short stream and checks the attention output is finite: proves headers, library and
// its dependencies all reach a consumer.
#include <cmath>
#include <cstdio>
#include <vector>

#include <packkv/packkv.hpp>
#include <packkv/synthetic.hpp>

int main() {
  packkv::CacheConfig config;
  config.num_kv_heads = 2;
  config.num_q_heads = 4;
  config.head_dim = 64;
  config.block_tokens = 32;
  packkv::PackedKVCache<float> cache(config);
  cache.add_sequence(1);
  packkv::synthetic::KVStream stream(2, 64);
  std::vector<float> k, v;
  stream.next(100, k, v);
  cache.append(1, 0, k.data(), v.data(), 100);
  std::vector<float> q(4 * 64, 0.1f), out(4 * 64);
  const packkv::SeqId ids[] = {1};
  cache.attention(ids, 0, q.data(), out.data(), 0.125f);
  for (float x : out) {
    if (!std::isfinite(x)) return 1;
  }
  std::printf("consumer ok: ratio vs fp16 %.2f\n", cache.memory_stats().total.ratio_vs_fp16());
  return 0;
}
