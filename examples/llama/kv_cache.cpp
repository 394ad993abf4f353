#include "kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// ---- llama.cpp's KV cache types (ggml's reference quantizers, rounding included) -------------

constexpr int kGgmlBlock = 32;

/// q8_0: scale = amax / 127, codes rounded half away from zero; fp16 scale.
void quantize_q8_0(float* x) {
  float amax = 0.0f;
  for (int i = 0; i < kGgmlBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const float stored_d = round_to_fp16(d);
  for (int i = 0; i < kGgmlBlock; ++i) x[i] = std::round(x[i] * id) * stored_d;
}

/// q4_0 / q5_0: the signed value of largest magnitude maps to code 0, scale = that value / -half;
/// codes are truncated after adding half + 0.5 and capped at 2 * half - 1; fp16 scale.
void quantize_symmetric_ggml(float* x, int half) {
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < kGgmlBlock; ++i) {
    if (amax < std::fabs(x[i])) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  const float d = max / static_cast<float>(-half);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const float stored_d = round_to_fp16(d);
  for (int i = 0; i < kGgmlBlock; ++i) {
    const int code = std::min(2 * half - 1, static_cast<int>(static_cast<std::int8_t>(x[i] * id + static_cast<float>(half) + 0.5f)));
    x[i] = static_cast<float>(code - half) * stored_d;
  }
}

/// q4_1 / q5_1: scale = (max - min) / levels from the block's min and max, codes truncated after
/// adding 0.5; fp16 scale and fp16 min.
void quantize_asymmetric_ggml(float* x, int levels) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < kGgmlBlock; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float d = (hi - lo) / static_cast<float>(levels);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const float stored_d = round_to_fp16(d);
  const float stored_min = round_to_fp16(lo);
  for (int i = 0; i < kGgmlBlock; ++i) {
    const int code = std::min(levels, static_cast<int>((x[i] - lo) * id + 0.5f));
    x[i] = static_cast<float>(code) * stored_d + stored_min;
  }
}

/// iq4_nl's fixed non-linear levels (the value of each 4-bit code, times the block scale).
constexpr std::int8_t kIq4nlLevels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/// Nearest level to y (ties to the upper level, as ggml's search does).
int nearest_iq4nl_level(float y) {
  if (y <= kIq4nlLevels[0]) return 0;
  if (y >= kIq4nlLevels[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (y < kIq4nlLevels[mid]) hi = mid;
    else lo = mid;
  }
  return y - kIq4nlLevels[lo] < kIq4nlLevels[hi] - y ? lo : hi;
}

/// iq4_nl as ggml's row quantizer (the one a KV cache copy uses) does it: codes chosen with
/// scale = (value of largest magnitude) / -127, then the scale refitted by least squares weighted
/// by x^2 over those codes; fp16 scale.
void quantize_iq4_nl(float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < kGgmlBlock; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < 1e-15f) {
    std::fill(x, x + kGgmlBlock, 0.0f);
    return;
  }
  const float id = 1.0f / (max / static_cast<float>(kIq4nlLevels[0]));
  int codes[kGgmlBlock];
  float sum_qx = 0.0f, sum_q2 = 0.0f;
  for (int i = 0; i < kGgmlBlock; ++i) {
    codes[i] = nearest_iq4nl_level(id * x[i]);
    const float q = kIq4nlLevels[codes[i]];
    const float w = x[i] * x[i];
    sum_qx += w * q * x[i];
    sum_q2 += w * q * q;
  }
  const float stored_d = round_to_fp16(sum_qx / sum_q2);
  for (int i = 0; i < kGgmlBlock; ++i) x[i] = stored_d * static_cast<float>(kIq4nlLevels[codes[i]]);
}

bool is_kivi(Baseline kind) { return kind == Baseline::kivi2 || kind == Baseline::kivi4; }

/// Every baseline: fp32 values that leave the exact window a block at a time and are replaced by
/// their reconstruction, by (token, head) or by ggml block (K and V alike), or KIVI's way (K per
/// channel over groups of tokens, V per token over groups of channels).
class QuantizedCache final : public KvCache {
 public:
  QuantizedCache(const KvShape& shape, Baseline kind, BaselineOptions options)
      : store_(shape), kind_(kind), options_(options), quantized_(static_cast<std::size_t>(shape.num_layers), 0) {
    if (options_.block < 1 || options_.residual < 0 || options_.sinks < 0) {
      throw std::invalid_argument("baseline: block >= 1, residual >= 0 and sinks >= 0");
    }
    if (is_kivi(kind_) && options_.block % options_.group != 0) {
      throw std::invalid_argument("KIVI: block must be a multiple of group");
    }
    if (shape.head_dim % kGgmlBlock != 0 && kind_ >= Baseline::q8_0) {
      throw std::invalid_argument("llama.cpp types need head_dim a multiple of 32");
    }
  }

  void append(int layer, const float* k, const float* v) override {
    store_.push(layer, k, v);
    int& done = quantized_[layer];
    while (store_.length(layer) - done >= options_.residual + options_.block) {
      quantize_block(layer, done);
      done += options_.block;
    }
  }
  void attend(int layer, const float* q, float* out, float scale) override { store_.attend(layer, q, out, scale); }
  KvBytes bytes() const override {
    const KvShape& s = store_.shape();
    double quantized = 0, exact = 0;
    for (int l = 0; l < s.num_layers; ++l) {
      const int sinks = std::min(options_.sinks, quantized_[l]);  // exact, though behind the window
      quantized += quantized_[l] - sinks;
      exact += store_.length(l) - quantized_[l] + sinks;
    }
    KvBytes b;
    b.fp16_bytes_per_side = store_.fp16_bytes_per_side();
    b.compressed_elements_per_side = quantized * s.kv_dim();
    b.k_compressed_bytes = b.compressed_elements_per_side * baseline_bits_per_element(kind_, s.head_dim, true, options_.group) / 8.0;
    b.v_compressed_bytes = b.compressed_elements_per_side * baseline_bits_per_element(kind_, s.head_dim, false, options_.group) / 8.0;
    const double window_bytes = exact * s.kv_dim() * 2.0;
    b.k_bytes = b.k_compressed_bytes + window_bytes;
    b.v_bytes = b.v_compressed_bytes + window_bytes;
    return b;
  }
  std::string describe() const override { return to_string(kind_); }

 private:
  void quantize_block(int layer, int t0) {
    const KvShape& s = store_.shape();
    const int hd = s.head_dim;
    const auto kv_dim = static_cast<std::size_t>(s.kv_dim());
    if (is_kivi(kind_)) {
      const int bits = kind_ == Baseline::kivi2 ? 2 : 4;
      for (int g = t0; g < t0 + options_.block; g += options_.group) {
        // Sink tokens leave their group: it covers the tokens after them.
        const int first = std::max(g, std::min(options_.sinks, g + options_.group));
        if (first == g + options_.group) continue;
        for (std::size_t c = 0; c < kv_dim; ++c) {
          quantize_minmax(store_.k_row(layer, first) + c, g + options_.group - first, kv_dim, bits);
        }
      }
      const int channel_group = std::min(options_.group, hd);
      for (int t = std::max(t0, options_.sinks); t < t0 + options_.block; ++t) {
        float* row = store_.v_row(layer, t);
        for (std::size_t c = 0; c < kv_dim; c += static_cast<std::size_t>(channel_group)) quantize_minmax(row + c, channel_group, 1, bits);
      }
      return;
    }
    for (int t = std::max(t0, options_.sinks); t < t0 + options_.block; ++t) {
      for (float* row : {store_.k_row(layer, t), store_.v_row(layer, t)}) {
        for (int h = 0; h < s.num_kv_heads; ++h) quantize_head(row + static_cast<std::size_t>(h) * hd, hd);
      }
    }
  }
  void quantize_head(float* x, int hd) const { quantize_head_vector(kind_, x, hd); }

  DenseStore store_;
  Baseline kind_;
  BaselineOptions options_;
  std::vector<int> quantized_;  // per layer: tokens [0, quantized) hold reconstructions
};

}  // namespace

void quantize_head_vector(Baseline kind, float* x, int hd) {
  switch (kind) {
    case Baseline::int8_per_token: quantize_minmax(x, hd, 1, 8); return;
    case Baseline::int4_per_token: quantize_minmax(x, hd, 1, 4); return;
    case Baseline::fp8_e4m3_per_token: quantize_e4m3(x, hd); return;
    default: break;
  }
  if (hd % kGgmlBlock != 0) throw std::invalid_argument("llama.cpp types need head_dim a multiple of 32");
  for (float* b = x; b < x + hd; b += kGgmlBlock) {
    switch (kind) {
      case Baseline::q8_0: quantize_q8_0(b); break;
      case Baseline::q5_1: quantize_asymmetric_ggml(b, 31); break;
      case Baseline::q5_0: quantize_symmetric_ggml(b, 16); break;
      case Baseline::q4_1: quantize_asymmetric_ggml(b, 15); break;
      case Baseline::q4_0: quantize_symmetric_ggml(b, 8); break;
      case Baseline::iq4_nl: quantize_iq4_nl(b); break;
      default: throw std::invalid_argument("quantize_head_vector: KIVI quantizes groups of tokens");
    }
  }
}

std::unique_ptr<KvCache> make_exact_cache(const KvShape& shape) { return std::make_unique<ExactCache>(shape); }

std::unique_ptr<KvCache> make_baseline_cache(const KvShape& shape, Baseline kind, BaselineOptions options) {
  return std::make_unique<QuantizedCache>(shape, kind, options);
}

double baseline_bits_per_element(Baseline kind, int head_dim, bool k_side, int kivi_group) {
  const double per_head_scale_zero = 32.0 / head_dim;  // fp16 scale and zero point per (token, head)
  switch (kind) {
    case Baseline::int8_per_token: return 8.0 + per_head_scale_zero;
    case Baseline::int4_per_token: return 4.0 + per_head_scale_zero;
    case Baseline::fp8_e4m3_per_token: return 8.0 + 16.0 / head_dim;
    case Baseline::kivi2:
    case Baseline::kivi4: {
      const int bits = kind == Baseline::kivi2 ? 2 : 4;
      // K: fp16 scale and zero per channel per group of tokens; V: per group of channels per token.
      return bits + 32.0 / (k_side ? kivi_group : std::min(kivi_group, head_dim));
    }
    // ggml blocks of 32: fp16 d (and fp16 m), 5-bit types add 4 bytes of high bits.
    case Baseline::q8_0: return 34.0 * 8 / 32;
    case Baseline::q5_1: return 24.0 * 8 / 32;
    case Baseline::q5_0: return 22.0 * 8 / 32;
    case Baseline::q4_1: return 20.0 * 8 / 32;
    case Baseline::q4_0: return 18.0 * 8 / 32;
    case Baseline::iq4_nl: return 18.0 * 8 / 32;
  }
  return 0.0;
}

const char* to_string(Baseline kind) {
  switch (kind) {
    case Baseline::int8_per_token: return "int8 per (token head)";
    case Baseline::int4_per_token: return "int4 per (token head)";
    case Baseline::fp8_e4m3_per_token: return "fp8 e4m3 per (token head)";
    case Baseline::kivi2: return "KIVI-2";
    case Baseline::kivi4: return "KIVI-4";
    case Baseline::q8_0: return "llama.cpp q8_0";
    case Baseline::q5_1: return "llama.cpp q5_1";
    case Baseline::q5_0: return "llama.cpp q5_0";
    case Baseline::q4_1: return "llama.cpp q4_1";
    case Baseline::q4_0: return "llama.cpp q4_0";
    case Baseline::iq4_nl: return "llama.cpp iq4_nl";
  }
  return "?";
}

}  // namespace llama
