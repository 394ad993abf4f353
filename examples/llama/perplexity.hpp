// Teacher-forced evaluation of a model with a given KV cache: perplexity, greedy predictions, and
// how far the next-token distribution moves from the exact cache's (KL divergence, top-1).
#pragma once

#include <functional>
#include <vector>

#include "kv_cache.hpp"
#include "llama_model.hpp"

namespace llama {

/// The exact cache's run on a window of tokens, kept to score other caches against. The final
/// hidden states are small ([n][dim]); the log-probabilities ([n-1][vocab], 400 MB at 2K tokens of
/// a 49K vocabulary) are optional: without them each scoring recomputes them from the hidden states.
struct ExactReference {
  std::vector<float> hidden;     ///< [n][dim]
  std::vector<float> log_probs;  ///< [n-1][vocab] or empty
  std::vector<int> predictions;  ///< argmax at each position
};

struct TeacherForcedResult {
  double mean_nll = 0.0;           ///< mean -log p(token[i+1] | tokens[0..i]) over the predictions
  double perplexity = 0.0;         ///< exp(mean_nll)
  std::vector<int> predictions;    ///< argmax at each position i (the guess for token i+1)
  KvBytes bytes;                   ///< what the cache held at the end
  int positions = 0;               ///< predictions scored: n - 1
  double nll_sum = 0.0;
  /// Against an ExactReference only: sum over positions of KL(exact || this) in nats, and the
  /// positions whose argmax equals the exact cache's.
  double kl_sum = 0.0;
  int top1_same = 0;
  std::vector<float> position_nll;  ///< per position, to sum over parts of a window
  std::vector<float> position_kl;   ///< per position, against a reference only
  std::vector<float> hidden;       ///< [n][dim], when asked for (to build an ExactReference)
};

/// Feeds tokens[0..n) through `model` with `cache` (empty on entry) one token at a time as in
/// decoding, and scores every next-token prediction. `on_layer` is called after each layer. With
/// `reference` (the exact cache's run on the same tokens) it also sums the KL divergence and the
/// top-1 agreement; `keep_hidden` keeps the final hidden states in the result.
TeacherForcedResult evaluate_teacher_forced(const LlamaModel& model, const int* tokens, int n, KvCache& cache,
                                            const std::function<void(int layer)>& on_layer = {},
                                            const ExactReference* reference = nullptr, bool keep_hidden = false);

/// The reference from an exact run made with keep_hidden; with `log_probs` its log-probabilities
/// are computed once here instead of in every scoring.
ExactReference make_exact_reference(const LlamaModel& model, TeacherForcedResult&& exact_run, bool log_probs);
/// Fills or drops a reference's log-probabilities (to hold them for one window at a time).
void set_log_probs(const LlamaModel& model, ExactReference& reference, bool keep);

/// Share of positions where two prediction lists agree.
double top1_agreement(const std::vector<int>& a, const std::vector<int>& b);

}  // namespace llama
