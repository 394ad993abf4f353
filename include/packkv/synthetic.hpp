// A deterministic KV stream with the statistics that matter for KV compression, for demos,
// benchmarks and tests that must run without a model: K has a few persistent outlier channels and
// RoPE applied (so channel pairs rotate with position); V is smoother and roughly zero-mean.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace packkv::synthetic {

/// splitmix64: small, fast, and identical on every platform (unlike std:: distributions).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  /// Standard normal (Box-Muller).
  double normal() {
    const double u1 = uniform() + 1e-300, u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  std::uint64_t state_;
};

/// Generates tokens [n][kv_heads][head_dim] of K (post-RoPE) and V, position by position.
class KVStream {
 public:
  KVStream(int kv_heads, int head_dim, std::uint64_t seed = 1, double rope_theta = 10000.0)
      : heads_(kv_heads), dim_(head_dim), theta_(rope_theta), rng_(seed) {
    const std::size_t n = static_cast<std::size_t>(kv_heads) * head_dim;
    k_mean_.resize(n);
    k_scale_.resize(n);
    v_state_.assign(n, 0.0);
    for (std::size_t i = 0; i < n; ++i) {
      // Most channels are modest; about 1 in 16 carries a large persistent offset (an outlier).
      const bool outlier = rng_.uniform() < 1.0 / 16.0;
      k_mean_[i] = outlier ? (rng_.uniform() < 0.5 ? -1.0 : 1.0) * (6.0 + 6.0 * rng_.uniform()) : 0.3 * rng_.normal();
      k_scale_[i] = std::exp(0.4 * rng_.normal()) * (outlier ? 1.5 : 1.0);
    }
  }

  /// Appends `tokens` positions to k and v (as float), advancing the stream.
  void next(int tokens, std::vector<float>& k, std::vector<float>& v) {
    const std::size_t row = static_cast<std::size_t>(heads_) * dim_;
    k.resize(static_cast<std::size_t>(tokens) * row);
    v.resize(static_cast<std::size_t>(tokens) * row);
    for (int t = 0; t < tokens; ++t, ++position_) {
      for (int h = 0; h < heads_; ++h) {
        const std::size_t base = static_cast<std::size_t>(h) * dim_;
        float* kr = k.data() + t * row + base;
        float* vr = v.data() + t * row + base;
        for (int c = 0; c < dim_; ++c) {
          kr[c] = static_cast<float>(k_mean_[base + c] + k_scale_[base + c] * rng_.normal());
          // V: an AR(1) walk per channel keeps neighbouring tokens correlated, as in real models.
          double& state = v_state_[base + c];
          state = 0.9 * state + 0.45 * rng_.normal();
          vr[c] = static_cast<float>(state);
        }
        // RoPE on adjacent pairs (x[2i], x[2i+1]).
        for (int i = 0; i < dim_ / 2; ++i) {
          const double freq = std::pow(theta_, -2.0 * i / dim_);
          const double angle = static_cast<double>(position_) * freq;
          const double c = std::cos(angle), s = std::sin(angle);
          const double x0 = kr[2 * i], x1 = kr[2 * i + 1];
          kr[2 * i] = static_cast<float>(x0 * c - x1 * s);
          kr[2 * i + 1] = static_cast<float>(x0 * s + x1 * c);
        }
      }
    }
  }

  std::int64_t position() const { return position_; }

 private:
  int heads_, dim_;
  double theta_;
  Rng rng_;
  std::vector<double> k_mean_, k_scale_, v_state_;
  std::int64_t position_ = 0;
};

}  // namespace packkv::synthetic
