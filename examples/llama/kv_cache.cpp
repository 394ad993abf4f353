#include "kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "tensor_ops.hpp"

namespace llama {

void dense_attention(const KvShape& shape, const float* k, const float* v, int n, const float* q, float* out,
                     float softmax_scale, std::vector<float>& scratch) {
  const int hd = shape.head_dim;
  const int kv_dim = shape.kv_dim();
  const int group = shape.num_q_heads / shape.num_kv_heads;
  scratch.resize(static_cast<std::size_t>(n) * group);
  // The query heads of one KV head go together, so each K and V row is read once per group.
  for (int kvh = 0; kvh < shape.num_kv_heads; ++kvh) {
    const float* q0 = q + static_cast<std::size_t>(kvh) * group * hd;
    float* out0 = out + static_cast<std::size_t>(kvh) * group * hd;
    for (int t = 0; t < n; ++t) {
      const float* kt = k + static_cast<std::size_t>(t) * kv_dim + kvh * hd;
      for (int g = 0; g < group; ++g) scratch[static_cast<std::size_t>(g) * n + t] = dot(q0 + g * hd, kt, hd) * softmax_scale;
    }
    for (int g = 0; g < group; ++g) softmax(scratch.data() + static_cast<std::size_t>(g) * n, n);
    std::fill(out0, out0 + static_cast<std::size_t>(group) * hd, 0.0f);
    for (int t = 0; t < n; ++t) {
      const float* vt = v + static_cast<std::size_t>(t) * kv_dim + kvh * hd;
      for (int g = 0; g < group; ++g) {
        const float w = scratch[static_cast<std::size_t>(g) * n + t];
        float* og = out0 + g * hd;
        for (int c = 0; c < hd; ++c) og[c] += w * vt[c];
      }
    }
  }
}

namespace {

/// fp32 K and V per layer, grown one token at a time; the storage of the exact cache and of the
/// quantize-dequantize baselines (which overwrite values with their reconstructions).
class DenseStore {
 public:
  explicit DenseStore(const KvShape& shape)
      : shape_(shape), k_(static_cast<std::size_t>(shape.num_layers)), v_(k_.size()) {}

  void push(int layer, const float* k, const float* v) {
    const auto kv_dim = static_cast<std::size_t>(shape_.kv_dim());
    k_[layer].insert(k_[layer].end(), k, k + kv_dim);
    v_[layer].insert(v_[layer].end(), v, v + kv_dim);
  }
  int length(int layer) const { return static_cast<int>(k_[layer].size() / static_cast<std::size_t>(shape_.kv_dim())); }
  float* k_row(int layer, int t) { return k_[layer].data() + static_cast<std::size_t>(t) * shape_.kv_dim(); }
  float* v_row(int layer, int t) { return v_[layer].data() + static_cast<std::size_t>(t) * shape_.kv_dim(); }
  void attend(int layer, const float* q, float* out, float scale) {
    dense_attention(shape_, k_[layer].data(), v_[layer].data(), length(layer), q, out, scale, scratch_);
  }
  /// Token-layers held, times elements per token, at fp16.
  double fp16_bytes_per_side() const {
    double tokens = 0;
    for (int l = 0; l < shape_.num_layers; ++l) tokens += length(l);
    return tokens * shape_.kv_dim() * 2.0;
  }
  const KvShape& shape() const { return shape_; }

 private:
  KvShape shape_;
  std::vector<std::vector<float>> k_, v_;
  std::vector<float> scratch_;
};

class ExactCache final : public KvCache {
 public:
  explicit ExactCache(const KvShape& shape) : store_(shape) {}
  void append(int layer, const float* k, const float* v) override { store_.push(layer, k, v); }
  void attend(int layer, const float* q, float* out, float scale) override { store_.attend(layer, q, out, scale); }
  KvBytes bytes() const override {
    KvBytes b;
    b.fp16_bytes_per_side = store_.fp16_bytes_per_side();
    b.k_bytes = b.v_bytes = 2.0 * b.fp16_bytes_per_side;  // stored as fp32
    return b;
  }
  std::string describe() const override { return "exact fp32"; }

 private:
  DenseStore store_;
};

// ---- quantize-dequantize helpers -------------------------------------------------------------

float round_to_fp16(float x) { return packkv::to_float(packkv::fp16_from_float(x)); }

/// Asymmetric min/max quantization of n values spaced `stride` apart to `bits` bits, replaced in
/// place by their reconstruction. The zero point (min) and the scale are rounded to fp16 as they
/// would be stored; codes are clamped, so the fp16 rounding costs at most a little clipping.
void quantize_minmax(float* x, int n, std::size_t stride, int bits) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
  const int levels = (1 << bits) - 1;
  const float zero = round_to_fp16(lo);
  const float scale = round_to_fp16((hi - zero) / static_cast<float>(levels));
  if (scale <= 0.0f) {
    for (int i = 0; i < n; ++i) x[i * stride] = zero;
    return;
  }
  for (int i = 0; i < n; ++i) {
    float code = std::nearbyint((x[i * stride] - zero) / scale);
    code = std::clamp(code, 0.0f, static_cast<float>(levels));
    x[i * stride] = zero + code * scale;
  }
}

/// Nearest FP8 E4M3 value (bias 7, 3 mantissa bits, subnormals below 2^-6, largest finite 448).
float round_to_e4m3(float y) {
  const float a = std::fabs(y);
  if (a == 0.0f) return y;
  int exponent = 0;
  std::frexp(a, &exponent);  // a = m * 2^exponent with m in [0.5, 1): leading bit 2^(exponent-1)
  const int lead = std::max(exponent - 1, -6);
  const float quantum = std::ldexp(1.0f, lead - 3);
  const float r = std::min(std::nearbyint(a / quantum) * quantum, 448.0f);
  return std::copysign(r, y);
}

/// One fp16 scale per (token, head) mapping the head's largest |x| to 448, then E4M3 codes.
void quantize_e4m3(float* x, int n) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  if (amax == 0.0f) return;
  // Round the stored scale up so that no value overflows 448 after division.
  float scale = round_to_fp16(amax / 448.0f);
  if (amax / scale > 448.0f) scale = packkv::to_float(packkv::fp16_round_up(amax / 448.0));
  for (int i = 0; i < n; ++i) x[i] = round_to_e4m3(x[i] / scale) * scale;
}

/// int8 / int4 / fp8 with one (scale[, zero]) per (token, head): quantized on arrival.
class PerTokenCache final : public KvCache {
 public:
  PerTokenCache(const KvShape& shape, Baseline kind) : store_(shape), kind_(kind) {}

  void append(int layer, const float* k, const float* v) override {
    store_.push(layer, k, v);
    const int t = store_.length(layer) - 1;
    const int hd = store_.shape().head_dim;
    for (int h = 0; h < store_.shape().num_kv_heads; ++h) {
      for (float* row : {store_.k_row(layer, t) + h * hd, store_.v_row(layer, t) + h * hd}) {
        if (kind_ == Baseline::fp8_e4m3_per_token) quantize_e4m3(row, hd);
        else quantize_minmax(row, hd, 1, kind_ == Baseline::int8_per_token ? 8 : 4);
      }
    }
  }
  void attend(int layer, const float* q, float* out, float scale) override { store_.attend(layer, q, out, scale); }
  KvBytes bytes() const override {
    KvBytes b;
    b.fp16_bytes_per_side = store_.fp16_bytes_per_side();
    const double elements = b.fp16_bytes_per_side / 2.0;
    const double groups = elements / store_.shape().head_dim;
    double side = 0.0;
    switch (kind_) {
      case Baseline::int8_per_token: side = elements + groups * 4.0; break;        // codes + fp16 scale, zero
      case Baseline::int4_per_token: side = elements / 2.0 + groups * 4.0; break;
      default: side = elements + groups * 2.0; break;                               // fp8 codes + fp16 scale
    }
    b.k_bytes = b.v_bytes = side;
    return b;
  }
  std::string describe() const override { return to_string(kind_); }

 private:
  DenseStore store_;
  Baseline kind_;
};

/// KIVI (Liu et al., 2024): K quantized per channel over groups of `group` tokens, V per token over
/// groups of `group` channels, and the most recent tokens kept in fp16. K leaves its fp16 residual
/// `residual` tokens at a time (a per-channel group needs all its tokens); V leaves it one token at
/// a time as the window slides.
class KiviCache final : public KvCache {
 public:
  KiviCache(const KvShape& shape, int bits, KiviOptions options)
      : store_(shape),
        bits_(bits),
        options_(options),
        k_quantized_(static_cast<std::size_t>(shape.num_layers), 0),
        v_quantized_(k_quantized_.size(), 0) {
    if (options_.residual % options_.group != 0) throw std::invalid_argument("KIVI: residual must be a multiple of group");
  }

  void append(int layer, const float* k, const float* v) override {
    store_.push(layer, k, v);
    const int n = store_.length(layer);
    const KvShape& s = store_.shape();
    const auto kv_dim = static_cast<std::size_t>(s.kv_dim());
    int& kq = k_quantized_[layer];
    if (n - kq >= options_.residual) {
      for (int t0 = kq; t0 < kq + options_.residual; t0 += options_.group) {
        for (std::size_t c = 0; c < kv_dim; ++c) quantize_minmax(store_.k_row(layer, t0) + c, options_.group, kv_dim, bits_);
      }
      kq += options_.residual;
    }
    int& vq = v_quantized_[layer];
    const int channel_group = std::min(options_.group, s.head_dim);
    while (n - vq > options_.residual) {
      float* row = store_.v_row(layer, vq);
      for (std::size_t c = 0; c < kv_dim; c += static_cast<std::size_t>(channel_group)) quantize_minmax(row + c, channel_group, 1, bits_);
      ++vq;
    }
  }
  void attend(int layer, const float* q, float* out, float scale) override { store_.attend(layer, q, out, scale); }
  KvBytes bytes() const override {
    const KvShape& s = store_.shape();
    double k_quant = 0, v_quant = 0, k_fp = 0, v_fp = 0;
    for (int l = 0; l < s.num_layers; ++l) {
      const int n = store_.length(l);
      k_quant += k_quantized_[l];
      v_quant += v_quantized_[l];
      k_fp += n - k_quantized_[l];
      v_fp += n - v_quantized_[l];
    }
    const double kv_dim = s.kv_dim();
    const int channel_group = std::min(options_.group, s.head_dim);
    KvBytes b;
    b.fp16_bytes_per_side = store_.fp16_bytes_per_side();
    b.k_bytes = k_quant * kv_dim * bits_ / 8.0 + k_quant / options_.group * kv_dim * 4.0 + k_fp * kv_dim * 2.0;
    b.v_bytes = v_quant * kv_dim * bits_ / 8.0 + v_quant * (kv_dim / channel_group) * 4.0 + v_fp * kv_dim * 2.0;
    return b;
  }
  std::string describe() const override {
    return "KIVI-" + std::to_string(bits_) + " (group " + std::to_string(options_.group) + ", fp16 window " +
           std::to_string(options_.residual) + ")";
  }

 private:
  DenseStore store_;
  int bits_;
  KiviOptions options_;
  std::vector<int> k_quantized_, v_quantized_;  // per layer: tokens [0, n) already quantized
};

}  // namespace

std::unique_ptr<KvCache> make_exact_cache(const KvShape& shape) { return std::make_unique<ExactCache>(shape); }

std::unique_ptr<KvCache> make_baseline_cache(const KvShape& shape, Baseline kind, KiviOptions kivi) {
  switch (kind) {
    case Baseline::kivi2: return std::make_unique<KiviCache>(shape, 2, kivi);
    case Baseline::kivi4: return std::make_unique<KiviCache>(shape, 4, kivi);
    default: return std::make_unique<PerTokenCache>(shape, kind);
  }
}

const char* to_string(Baseline kind) {
  switch (kind) {
    case Baseline::int8_per_token: return "int8 per (token, head)";
    case Baseline::int4_per_token: return "int4 per (token, head)";
    case Baseline::fp8_e4m3_per_token: return "fp8 e4m3 per (token, head)";
    case Baseline::kivi2: return "KIVI-2";
    case Baseline::kivi4: return "KIVI-4";
  }
  return "?";
}

}  // namespace llama
