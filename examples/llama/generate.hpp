// Greedy decoding, as llama2.c's run.c does it at temperature 0.
#pragma once

#include <functional>
#include <string>

#include "kv_cache.hpp"
#include "llama_model.hpp"
#include "tokenizer.hpp"

namespace llama {

/// Encodes `prompt` with BOS, runs it through the model, then appends the argmax token until
/// `max_positions` positions are used or the model emits BOS (llama2.c's end of a story). Returns the
/// decoded text, prompt included. `on_piece` (optional) sees each piece as it is produced.
std::string generate_greedy(LlamaModel& model, const Llama2cTokenizer& tokenizer, const std::string& prompt,
                            int max_positions, KvCache& cache,
                            const std::function<void(const std::string&)>& on_piece = {});

}  // namespace llama
