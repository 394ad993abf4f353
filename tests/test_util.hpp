// Shared helpers for packkv's tests: data generators, float64 references, cache snapshots.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "packkv/codec.hpp"
#include "packkv/format.hpp"
#include "packkv/packkv.hpp"
#include "packkv/synthetic.hpp"

namespace packkv::test {

template <class T>
std::vector<T> convert(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = from_float<T>(x[i]);
  return out;
}

/// Unit roundoff of the storage type (what one rounding to T can cost, relatively).
template <class T>
double unit_roundoff() {
  if constexpr (std::is_same_v<T, float>) return 0x1p-24;
  else if constexpr (std::is_same_v<T, fp16_t>) return 0x1p-11;
  else return 0x1p-8;
}

/// Values shaped like a KV stream: mostly normal, some outliers, per-token offsets.
inline std::vector<float> random_values(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  synthetic::Rng rng(seed);
  std::vector<float> x(n);
  for (auto& v : x) {
    double r = rng.normal() * scale;
    if (rng.uniform() < 0.02) r *= 8.0;
    v = static_cast<float>(r);
  }
  return x;
}

/// Rows of `row` values whose 16-token rounds alternate between uniform noise (which the
/// encoder stores as plain rounds) and a fixed channel profile plus small noise (which it stores
/// as frame-of-reference rounds), so both kinds of round occur in every section.
inline std::vector<float> mixed_rounds_values(std::size_t tokens, std::size_t row, std::uint64_t seed,
                                              double scale = 1.0) {
  synthetic::Rng rng(seed);
  std::vector<double> profile(row);
  for (auto& p : profile) p = rng.normal() * scale;
  std::vector<float> x(tokens * row);
  for (std::size_t t = 0; t < tokens; ++t) {
    const bool smooth = (t / 16) % 2 == 1;
    for (std::size_t c = 0; c < row; ++c) {
      const double r = smooth ? profile[c] + 0.02 * scale * rng.normal() : (4.0 * rng.uniform() - 2.0) * scale;
      x[t * row + c] = static_cast<float>(r);
    }
  }
  return x;
}

/// float64 decode attention of one query head over float K/V rows [len][kv_heads][dim].
inline std::vector<double> reference_attention(const float* k, const float* v, std::int64_t len, int kv_heads,
                                               int dim, int head, const float* q, double scale) {
  std::vector<double> s(static_cast<std::size_t>(len));
  double m = -std::numeric_limits<double>::infinity();
  const std::size_t row = static_cast<std::size_t>(kv_heads) * dim;
  for (std::int64_t t = 0; t < len; ++t) {
    double dot = 0;
    for (int c = 0; c < dim; ++c) dot += static_cast<double>(q[c]) * k[t * row + head * dim + c];
    s[t] = dot * scale;
    m = std::max(m, s[t]);
  }
  double sum = 0;
  for (auto& x : s) {
    x = std::exp(x - m);
    sum += x;
  }
  std::vector<double> out(static_cast<std::size_t>(dim), 0.0);
  for (std::int64_t t = 0; t < len; ++t) {
    for (int c = 0; c < dim; ++c) out[c] += s[t] / sum * v[t * row + head * dim + c];
  }
  return out;
}

/// Everything observable about a cache, for "unchanged after a failed call" checks.
struct Snapshot {
  std::vector<SeqId> ids;
  std::vector<std::int64_t> lengths;
  std::vector<float> contents;
  std::size_t payload = 0, total = 0, resident = 0, pool_reserved = 0, live_blocks = 0;
  bool operator==(const Snapshot&) const = default;
};

template <class T>
Snapshot snapshot(const PackedKVCache<T>& cache) {
  Snapshot s;
  s.ids = cache.sequence_ids();
  const CacheConfig& c = cache.config();
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  for (SeqId id : s.ids) {
    for (int l = 0; l < c.num_layers; ++l) {
      const std::int64_t len = cache.length(id, l);
      s.lengths.push_back(len);
      std::vector<float> k(len * row), v(len * row);
      if (len) cache.read_back(id, l, k.data(), v.data());
      s.contents.insert(s.contents.end(), k.begin(), k.end());
      s.contents.insert(s.contents.end(), v.begin(), v.end());
    }
  }
  const MemoryStats m = cache.memory_stats();
  s.payload = m.total.payload;
  s.total = m.total.total();
  s.resident = m.resident_bytes;
  s.pool_reserved = m.pool.reserved_bytes;
  s.live_blocks = m.pool.live_blocks;
  return s;
}

inline double fp16_ulp(double x) {
  const double a = std::max(std::fabs(x), 0x1p-14);
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(a))) - 10);
}

/// The codec's documented bound for a group of values in [lo, hi] quantized under `rel`:
/// |x - x'| <= step/2 (+ fp32 rounding), with step <= rel * (hi - lo + ulp16(lo)) * (1 + 2^-10) + 2^-24.
inline double error_bound(double lo, double hi, double rel) {
  const double step = rel * (hi - lo + fp16_ulp(lo)) * (1 + 0x1p-10) + 0x1p-24;
  return step / 2 * (1 + 1e-6) + 4 * 0x1p-24 * std::max(std::fabs(lo), std::fabs(hi));
}

/// Where each layer of a sequence image sits (its framing, docs/format.md): the offset of its
/// LayerRecord, of its tail K rows, and its end; `value_bytes` is sizeof(T) of the cache that
/// wrote it.
struct ImageLayerAt {
  std::size_t record;
  std::size_t tail_k;
  std::size_t sink_k;  ///< the exact sink rows (K, then V), after the tail
  std::size_t end;
};
inline std::vector<ImageLayerAt> image_layers(const std::vector<std::uint8_t>& image, std::size_t value_bytes) {
  format::ImageHeader h;
  std::memcpy(&h, image.data(), sizeof h);
  std::vector<ImageLayerAt> layers;
  std::size_t at = sizeof h;
  for (int i = 0; i < h.layer_count; ++i) {
    format::LayerRecord record;
    std::memcpy(&record, image.data() + at, sizeof record);
    ImageLayerAt layer{at, 0, 0, 0};
    at += sizeof record;
    std::size_t blocks = 0;
    for (std::uint32_t b = 0; b < record.block_count; ++b) {
      std::uint32_t size;
      std::memcpy(&size, image.data() + at + 4 * b, 4);
      blocks += size;
    }
    at += 4ull * record.block_count + blocks;
    layer.tail_k = at;
    at += 2ull * record.tail_tokens * h.num_kv_heads * h.head_dim * value_bytes;
    layer.sink_k = at;
    at += 2ull * record.sink_tokens * h.num_kv_heads * h.head_dim * value_bytes;
    layer.end = at;
    layers.push_back(layer);
  }
  return layers;
}

/// Runs `fn`, expects a packkv::error whose message contains `needle`.
template <class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected packkv::error containing \"" << needle << "\"";
  } catch (const packkv::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

}  // namespace packkv::test
