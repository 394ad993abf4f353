// The few dense kernels a Llama forward pass needs, on the CPU in fp32.
//
// Checkpoints store weights row-major [out][in] (the llama2.c and GGUF order). For matrix products the
// model repacks each matrix once at load time into panels of kPanel output columns, [in][kPanel] per
// panel: the inner loop then broadcasts one activation and multiplies it by a contiguous row of
// kPanel weights, with no horizontal sums. The kernels use GCC/Clang vector extensions rather than
// intrinsics: they compile for any target and become AVX-512 code under -march=native.
#pragma once

#include <cstddef>

namespace llama {

inline constexpr int kPanel = 32;

/// Floats a [out][in] matrix takes once packed into panels (out rounded up to whole panels).
std::size_t packed_size(int in, int out);

/// Packs a row-major [out][in] matrix into panels: packed[p][i][j] = w[p * kPanel + j][i], zero past out.
void pack_weights(const float* w, int in, int out, float* packed);

/// y[t][o] = sum_i x[t][i] * w[o][i] for t < rows, o < out, with w given packed. Parallel over tiles
/// (OpenMP); inside an enclosing parallel region it runs on the calling thread only.
void matmul(const float* x, const float* packed_w, float* y, int rows, int in, int out);

/// Dot product of two contiguous vectors.
float dot(const float* a, const float* b, int n);

/// y = x / rms(x) * weight, for one row of n values.
void rmsnorm(const float* x, const float* weight, float* y, int n, float eps);

/// Rotates adjacent pairs (x[2i], x[2i+1]) of each head by pos * theta^(-2i/head_dim).
void rope_adjacent_pairs(float* x, int num_heads, int head_dim, int pos, float theta);

/// In place: x <- softmax(x) over n values.
void softmax(float* x, int n);

/// gate <- silu(gate) * up, elementwise.
void swiglu(float* gate, const float* up, std::size_t n);

}  // namespace llama
