#include "perplexity.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace llama {
namespace {

// Logits in chunks of rows: [n][vocab] at once would be 400 MB for 2K tokens of a 49K vocabulary.
constexpr int kChunk = 32;

/// out = log_softmax(row); returns log(sum(exp(row - max))) + max.
void log_softmax(const float* row, int vocab, float* out) {
  const float max = *std::max_element(row, row + vocab);
  double sum = 0.0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(row[i] - max));
  const auto shift = static_cast<float>(std::log(sum)) + max;
  for (int i = 0; i < vocab; ++i) out[i] = row[i] - shift;
}

/// KL(p || q) from log-probabilities: sum p (log p - log q).
double kl_divergence(const float* log_p, const float* log_q, int vocab) {
  double kl = 0.0;
  for (int i = 0; i < vocab; ++i) kl += static_cast<double>(std::exp(log_p[i]) * (log_p[i] - log_q[i]));
  return std::max(kl, 0.0);  // rounding can leave -1e-12 where the two are the same
}

}  // namespace

TeacherForcedResult evaluate_teacher_forced(const LlamaModel& model, const int* tokens, int n, KvCache& cache,
                                            const std::function<void(int layer)>& on_layer,
                                            const ExactReference* reference, bool keep_hidden) {
  if (n < 2) throw std::invalid_argument("teacher forcing needs at least two tokens");
  const int vocab = model.config().vocab_size;
  const int dim = model.config().dim;
  if (reference && reference->hidden.size() != static_cast<std::size_t>(n) * dim) {
    throw std::invalid_argument("the exact reference is for another number of tokens");
  }
  ForwardBuffers buffers;
  const std::vector<float>& hidden = model.forward(tokens, n, 0, cache, buffers, on_layer);
  TeacherForcedResult result;
  result.positions = n - 1;
  result.predictions.resize(static_cast<std::size_t>(n - 1));
  result.position_nll.resize(static_cast<std::size_t>(n - 1));
  if (reference) result.position_kl.resize(static_cast<std::size_t>(n - 1));
  std::vector<float> logits(static_cast<std::size_t>(kChunk) * vocab);
  std::vector<float> exact_logits, log_q(static_cast<std::size_t>(vocab)), log_p(static_cast<std::size_t>(vocab));
  const bool recompute_exact = reference && reference->log_probs.empty();
  if (recompute_exact) exact_logits.resize(logits.size());
  for (int r0 = 0; r0 < n - 1; r0 += kChunk) {
    const int rows = std::min(kChunk, n - 1 - r0);
    model.logits(hidden.data() + static_cast<std::size_t>(r0) * dim, rows, logits.data());
    if (recompute_exact) model.logits(reference->hidden.data() + static_cast<std::size_t>(r0) * dim, rows, exact_logits.data());
    for (int r = 0; r < rows; ++r) {
      const float* row = logits.data() + static_cast<std::size_t>(r) * vocab;
      log_softmax(row, vocab, log_q.data());
      const int position = r0 + r;
      result.position_nll[position] = -log_q[static_cast<std::size_t>(tokens[position + 1])];
      result.nll_sum += result.position_nll[position];
      result.predictions[position] = argmax(row, vocab);
      if (!reference) continue;
      const float* exact_row = log_p.data();
      if (recompute_exact) log_softmax(exact_logits.data() + static_cast<std::size_t>(r) * vocab, vocab, log_p.data());
      else exact_row = reference->log_probs.data() + static_cast<std::size_t>(position) * vocab;
      const double kl = kl_divergence(exact_row, log_q.data(), vocab);
      result.position_kl[position] = static_cast<float>(kl);
      result.kl_sum += kl;
      result.top1_same += result.predictions[position] == reference->predictions[position];
    }
  }
  result.mean_nll = result.nll_sum / (n - 1);
  result.perplexity = std::exp(result.mean_nll);
  result.bytes = cache.bytes();
  if (keep_hidden) result.hidden = hidden;
  return result;
}

void set_log_probs(const LlamaModel& model, ExactReference& reference, bool keep) {
  if (!keep) {
    std::vector<float>().swap(reference.log_probs);
    return;
  }
  const int vocab = model.config().vocab_size;
  const int dim = model.config().dim;
  const int positions = static_cast<int>(reference.hidden.size() / dim) - 1;
  reference.log_probs.resize(static_cast<std::size_t>(positions) * vocab);
  // Chunks in parallel: the runs that read these wait for them.
#pragma omp parallel
  {
  std::vector<float> logits(static_cast<std::size_t>(kChunk) * vocab);
#pragma omp for schedule(dynamic, 1)
  for (int r0 = 0; r0 < positions; r0 += kChunk) {
    const int rows = std::min(kChunk, positions - r0);
    model.logits(reference.hidden.data() + static_cast<std::size_t>(r0) * dim, rows, logits.data());
    for (int r = 0; r < rows; ++r) {
      log_softmax(logits.data() + static_cast<std::size_t>(r) * vocab, vocab,
                  reference.log_probs.data() + static_cast<std::size_t>(r0 + r) * vocab);
    }
  }
  }
}

ExactReference make_exact_reference(const LlamaModel& model, TeacherForcedResult&& exact_run, bool log_probs) {
  if (exact_run.hidden.empty()) throw std::invalid_argument("make_exact_reference: the run kept no hidden states");
  ExactReference reference;
  reference.hidden = std::move(exact_run.hidden);
  reference.predictions = std::move(exact_run.predictions);
  set_log_probs(model, reference, log_probs);
  return reference;
}

double top1_agreement(const std::vector<int>& a, const std::vector<int>& b) {
  const std::size_t n = std::min(a.size(), b.size());
  if (n == 0) return 0.0;
  std::size_t same = 0;
  for (std::size_t i = 0; i < n; ++i) same += a[i] == b[i];
  return static_cast<double>(same) / static_cast<double>(n);
}

}  // namespace llama
