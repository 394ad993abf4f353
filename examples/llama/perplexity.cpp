#include "perplexity.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace llama {

TeacherForcedResult evaluate_teacher_forced(const LlamaModel& model, const int* tokens, int n, KvCache& cache,
                                            const std::function<void(int layer)>& on_layer) {
  if (n < 2) throw std::invalid_argument("teacher forcing needs at least two tokens");
  ForwardBuffers buffers;
  const std::vector<float>& hidden = model.forward(tokens, n, 0, cache, buffers, on_layer);
  const int vocab = model.config().vocab_size;
  const int dim = model.config().dim;
  TeacherForcedResult result;
  result.predictions.resize(static_cast<std::size_t>(n - 1));
  // Logits in chunks of rows: [n][vocab] at once would be 400 MB for 2K tokens of a 49K vocabulary.
  constexpr int kChunk = 32;
  std::vector<float> logits(static_cast<std::size_t>(kChunk) * vocab);
  double nll_sum = 0.0;
  for (int r0 = 0; r0 < n - 1; r0 += kChunk) {
    const int rows = std::min(kChunk, n - 1 - r0);
    model.logits(hidden.data() + static_cast<std::size_t>(r0) * dim, rows, logits.data());
    for (int r = 0; r < rows; ++r) {
      const float* row = logits.data() + static_cast<std::size_t>(r) * vocab;
      const float max = *std::max_element(row, row + vocab);
      double sum = 0.0;
      for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(row[i] - max));
      const int target = tokens[r0 + r + 1];
      nll_sum += std::log(sum) - static_cast<double>(row[target] - max);
      result.predictions[r0 + r] = argmax(row, vocab);
    }
  }
  result.mean_nll = nll_sum / (n - 1);
  result.perplexity = std::exp(result.mean_nll);
  result.bytes = cache.bytes();
  return result;
}

double top1_agreement(const std::vector<int>& a, const std::vector<int>& b) {
  const std::size_t n = std::min(a.size(), b.size());
  if (n == 0) return 0.0;
  std::size_t same = 0;
  for (std::size_t i = 0; i < n; ++i) same += a[i] == b[i];
  return static_cast<double>(same) / static_cast<double>(n);
}

}  // namespace llama
