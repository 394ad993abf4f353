// The scalar kernels: the format's reference arithmetic (format::unpack16, format::dequantize),
// what every build can run and what the vector kernels are tested against.
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_kernels/kernels.hpp"
#include "cpu_kernels/section_ops.hpp"

namespace packkv::detail::cpu {

namespace {

struct ScalarOps {
  static void convert_halves(const fp16_t* x, float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = to_float(x[i]);
  }

  // raw[g][i] = sum_c q[g][c] * code_ic for the 16 tokens of one round.
  template <int G>
  static void round_scores(const format::SectionLayout& L, const std::uint8_t* section, const float* q, float raw[][16],
                           std::uint32_t round) {
    const std::uint32_t dim = L.head_dim;
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 16; ++i) raw[g][i] = 0.0f;
    std::uint8_t values[16];
    format::for_each_pack(section, L, round,
                          [&](std::uint32_t c, const std::uint8_t* pack, std::uint32_t width, std::uint32_t mn) {
                            format::unpack16(pack, width, values);
                            for (int g = 0; g < G; ++g) {
                              const float qv = q[g * dim + c];
                              for (int i = 0; i < 16; ++i) raw[g][i] += qv * static_cast<float>(values[i] + mn);
                            }
                          });
  }

  template <int G>
  static void accumulate_rounds(const format::SectionLayout& L, const std::uint8_t* section, const float* wstep,
                                std::size_t ws, float* acc) {
    const std::uint32_t dim = L.head_dim;
    std::uint8_t values[16];
    for (std::uint32_t r = 0; r < L.rounds; ++r) {
      format::for_each_pack(section, L, r,
                            [&](std::uint32_t c, const std::uint8_t* pack, std::uint32_t width, std::uint32_t mn) {
                              format::unpack16(pack, width, values);
                              for (int g = 0; g < G; ++g) {
                                float* a = acc + (static_cast<std::size_t>(g) * dim + c) * 8;
                                for (int i = 0; i < 16; ++i) {
                                  a[i % 8] += wstep[g * ws + r * 16 + i] * static_cast<float>(values[i] + mn);
                                }
                              }
                            });
    }
  }
};

void softmax_rows(float* s, int n, std::size_t stride, int groups, float* max_out, float* sum_out) {
  for (int g = 0; g < groups; ++g) {
    float* row = s + static_cast<std::size_t>(g) * stride;
    float m = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n; ++i) m = std::max(m, row[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) {
      row[i] = std::exp(row[i] - m);
      sum += row[i];
    }
    max_out[g] = m;
    sum_out[g] = sum;
  }
}

void unpack_section(const format::SectionLayout& layout, const std::uint8_t* section, std::uint8_t* codes) {
  const std::uint32_t dim = layout.head_dim;
  std::uint8_t values[format::kPackTokens];
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    format::for_each_pack(section, layout, r,
                          [&](std::uint32_t c, const std::uint8_t* pack, std::uint32_t width, std::uint32_t lo) {
                            format::unpack16(pack, width, values);
                            for (int i = 0; i < format::kPackTokens; ++i) {
                              codes[(r * format::kPackTokens + i) * dim + c] = static_cast<std::uint8_t>(values[i] + lo);
                            }
                          });
  }
}

void decode_section(const format::SectionLayout& layout, bool per_channel, const std::uint8_t* section, float* out) {
  std::uint8_t codes[256 * 256];
  unpack_section(layout, section, codes);
  decode_from_codes<ScalarOps>(layout, per_channel, section, codes, out,
                    [](const std::uint8_t* row, std::uint32_t dim, const float* steps, const float* mins, float step,
                       float min, float* dst) {
                      for (std::uint32_t c = 0; c < dim; ++c) {
                        dst[c] = steps ? format::dequantize(row[c], steps[c], mins[c])
                                       : format::dequantize(row[c], step, min);
                      }
                    });
}

void unpack8(const std::uint8_t* p, std::uint32_t width, std::uint32_t* values) {
  std::uint8_t v[8];
  format::unpack8(p, width, v);
  for (int i = 0; i < 8; ++i) values[i] = v[i];
}

bool row_range(const float* x, std::size_t n, format::Range& range) {
  bool ok = true;
  for (std::size_t i = 0; i < n; ++i) {
    ok &= format::storable(x[i]);
    range.extend(x[i]);
  }
  return ok;
}

bool extend_ranges(const float* x, std::size_t n, float* lo, float* hi) {
  bool ok = true;
  for (std::size_t i = 0; i < n; ++i) {
    ok &= format::storable(x[i]);
    const float c = format::canonical(x[i]);
    lo[i] = c < lo[i] ? c : lo[i];
    hi[i] = c > hi[i] ? c : hi[i];
  }
  return ok;
}

void quantize_row(const float* x, std::size_t n, const format::Quantizer& q, int max_code, std::uint8_t* codes) {
  for (std::size_t i = 0; i < n; ++i) codes[i] = format::quantize(x[i], q, max_code);
}

void quantize_row_per_channel(const float* x, std::size_t n, const float* mins, const float* inv_steps, int max_code,
                              std::uint8_t* codes) {
  for (std::size_t i = 0; i < n; ++i) {
    format::Quantizer q{};
    q.min = mins[i];
    q.inv_step = inv_steps[i];
    codes[i] = format::quantize(x[i], q, max_code);
  }
}

template <class T>
void dense_scores(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* q, int groups, float* out,
                  std::size_t out_stride) {
  for (int t = 0; t < tokens; ++t) {
    const T* row = rows + static_cast<std::size_t>(t) * row_stride;
    for (int g = 0; g < groups; ++g) {
      const float* qg = q + static_cast<std::size_t>(g) * head_dim;
      float s = 0.0f;
      for (int c = 0; c < head_dim; ++c) s += packkv::to_float(row[c]) * qg[c];
      out[g * out_stride + t] = s;
    }
  }
}

template <class T>
void dense_accumulate_v(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* w,
                        std::size_t w_stride, int groups, float* acc) {
  for (int t = 0; t < tokens; ++t) {
    const T* row = rows + static_cast<std::size_t>(t) * row_stride;
    for (int g = 0; g < groups; ++g) {
      const float wt = w[g * w_stride + t];
      float* a = acc + static_cast<std::size_t>(g) * head_dim * 8;
      for (int c = 0; c < head_dim; ++c) a[c * 8] += wt * packkv::to_float(row[c]);
    }
  }
}

template <class T>
void convert(const T* x, float* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = packkv::to_float(x[i]);
}

template <class T>
void convert_back(const float* x, T* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = packkv::from_float<T>(x[i]);
}

template <class T>
constexpr DenseKernels<T> dense_kernels() {
  return DenseKernels<T>{&dense_scores<T>, &dense_accumulate_v<T>, &convert<T>, &convert_back<T>};
}

}  // namespace

const Kernels kScalarKernels = {
    Isa::scalar,
    &section_scores<ScalarOps>,
    &section_accumulate_v<ScalarOps>,
    &softmax_rows,
    &unpack_section,
    &decode_section,
    &unpack8,
    &row_range,
    &extend_ranges,
    &quantize_row,
    &quantize_row_per_channel,
    dense_kernels<float>(),
    dense_kernels<fp16_t>(),
    dense_kernels<bf16_t>(),
};

}  // namespace packkv::detail::cpu
