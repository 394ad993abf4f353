// Teacher-forced evaluation of a model with a given KV cache: perplexity and greedy predictions.
#pragma once

#include <functional>
#include <vector>

#include "kv_cache.hpp"
#include "llama_model.hpp"

namespace llama {

struct TeacherForcedResult {
  double mean_nll = 0.0;           ///< mean -log p(token[i+1] | tokens[0..i]) over the predictions
  double perplexity = 0.0;         ///< exp(mean_nll)
  std::vector<int> predictions;    ///< argmax at each position i (the guess for token i+1)
  KvBytes bytes;                   ///< what the cache held at the end
};

/// Feeds tokens[0..n) through `model` with `cache` (empty on entry) one token at a time as in
/// decoding, and scores every next-token prediction. `on_layer` is called after each layer.
TeacherForcedResult evaluate_teacher_forced(const LlamaModel& model, const int* tokens, int n, KvCache& cache,
                                            const std::function<void(int layer)>& on_layer = {});

/// Share of positions where two prediction lists agree.
double top1_agreement(const std::vector<int>& a, const std::vector<int>& b);

}  // namespace llama
