#include "tensor_ops.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace llama {
namespace {

// 16 floats: one AVX-512 register, or two AVX2 / four NEON registers on other targets.
using Vec16 = float __attribute__((vector_size(64)));

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);  // unaligned load; compiles to one vmovups
  return v;
}

using Vec8 = float __attribute__((vector_size(32)));
using Vec4 = float __attribute__((vector_size(16)));

// A halving tree (16 -> 8 -> 4 -> 1) instead of 15 dependent scalar additions.
inline float horizontal_sum(Vec16 v) {
  Vec8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const Vec8 s8 = lo + hi;
  Vec4 a, b;
  std::memcpy(&a, &s8, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  const Vec4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// One tile: R activation rows by one panel of kPanel outputs, 2R vector accumulators (12 of the 32
// AVX-512 registers at R = 6). Each step loads two weight vectors and reuses them for R rows.
constexpr int kTileRows = 6;

template <int R>
void tile(const float* x, int in, const float* panel, float* y, int ld_y, int cols) {
  Vec16 acc[R][2] = {};
  for (int i = 0; i < in; ++i) {
    const Vec16 w0 = load16(panel + static_cast<std::size_t>(i) * kPanel);
    const Vec16 w1 = load16(panel + static_cast<std::size_t>(i) * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const float xs = x[static_cast<std::size_t>(r) * in + i];
      acc[r][0] += xs * w0;
      acc[r][1] += xs * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + static_cast<std::size_t>(r) * ld_y;
    if (cols == kPanel) {
      std::memcpy(yr, &acc[r][0], sizeof(Vec16));
      std::memcpy(yr + 16, &acc[r][1], sizeof(Vec16));
    } else {
      for (int j = 0; j < cols; ++j) yr[j] = j < 16 ? acc[r][0][j] : acc[r][1][j - 16];
    }
  }
}

void tile_rows(int rows, const float* x, int in, const float* panel, float* y, int ld_y, int cols) {
  switch (rows) {
    case 6: tile<6>(x, in, panel, y, ld_y, cols); break;
    case 5: tile<5>(x, in, panel, y, ld_y, cols); break;
    case 4: tile<4>(x, in, panel, y, ld_y, cols); break;
    case 3: tile<3>(x, in, panel, y, ld_y, cols); break;
    case 2: tile<2>(x, in, panel, y, ld_y, cols); break;
    default: tile<1>(x, in, panel, y, ld_y, cols); break;
  }
}

}  // namespace

std::size_t packed_size(int in, int out) {
  return static_cast<std::size_t>((out + kPanel - 1) / kPanel) * kPanel * static_cast<std::size_t>(in);
}

void pack_weights(const float* w, int in, int out, float* packed) {
  const int panels = (out + kPanel - 1) / kPanel;
  for (int p = 0; p < panels; ++p) {
    float* dst = packed + static_cast<std::size_t>(p) * kPanel * in;
    for (int i = 0; i < in; ++i) {
      for (int j = 0; j < kPanel; ++j) {
        const int o = p * kPanel + j;
        dst[static_cast<std::size_t>(i) * kPanel + j] = o < out ? w[static_cast<std::size_t>(o) * in + i] : 0.0f;
      }
    }
  }
}

void matmul(const float* x, const float* packed_w, float* y, int rows, int in, int out) {
  // Rows in blocks of 96 (about 220 KB of activations at in = 576, resident in L2) while the panels
  // stream past; a panel (72 KB at in = 576) is reused by all 16 row tiles of the block.
  constexpr int kRowBlock = 96;
  const int row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int panels = (out + kPanel - 1) / kPanel;
  // Threads only pay off for large products: a tiny model's matrices (stories260K: 64 x 64) cost
  // less than waking a thread team, above all on a busy machine.
  const bool parallel = static_cast<double>(rows) * in * out > 4e6;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
  for (int rb = 0; rb < row_blocks; ++rb) {
    for (int p = 0; p < panels; ++p) {
      const float* panel = packed_w + static_cast<std::size_t>(p) * kPanel * in;
      const int cols = std::min(kPanel, out - p * kPanel);
      const int r_end = std::min(rows, (rb + 1) * kRowBlock);
      for (int r = rb * kRowBlock; r < r_end; r += kTileRows) {
        tile_rows(std::min(kTileRows, r_end - r), x + static_cast<std::size_t>(r) * in, in, panel,
                  y + static_cast<std::size_t>(r) * out + p * kPanel, out, cols);
      }
    }
  }
}

float dot(const float* a, const float* b, int n) {
  Vec16 acc = {};
  int i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = horizontal_sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rmsnorm(const float* x, const float* weight, float* y, int n, float eps) {
  double sum_sq = 0.0;
  for (int i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float inv_rms = 1.0f / std::sqrt(static_cast<float>(sum_sq / n) + eps);
  for (int i = 0; i < n; ++i) y[i] = x[i] * inv_rms * weight[i];
}

void rope_adjacent_pairs(float* x, int num_heads, int head_dim, int pos, float theta) {
  for (int i = 0; i < head_dim; i += 2) {
    // Frequencies in double: at pos ~ 8K a float angle loses ~1e-3 rad, visible in K.
    const double freq = std::pow(static_cast<double>(theta), -static_cast<double>(i) / head_dim);
    const double angle = pos * freq;
    const float c = static_cast<float>(std::cos(angle));
    const float s = static_cast<float>(std::sin(angle));
    for (int h = 0; h < num_heads; ++h) {
      float* p = x + static_cast<std::size_t>(h) * head_dim + i;
      const float a = p[0], b = p[1];
      p[0] = a * c - b * s;
      p[1] = a * s + b * c;
    }
  }
}

void softmax(float* x, int n) {
  const float max = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

void swiglu(float* gate, const float* up, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace llama
