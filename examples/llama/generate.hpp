// Greedy decoding, as llama2.c's run.c does it at temperature 0.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "kv_cache.hpp"
#include "llama_model.hpp"
#include "tokenizer.hpp"

namespace llama {

/// Runs `prompt` (token ids) through the model in one batched call, then appends the argmax token
/// until `max_positions` positions are used or the model emits `stop_token`. Returns the new ids;
/// `on_token` (optional) sees each one as it is produced.
std::vector<int> generate_greedy_ids(LlamaModel& model, const std::vector<int>& prompt, int max_positions, KvCache& cache,
                                     int stop_token, const std::function<void(int token)>& on_token = {});

/// llama2.c models: encodes `prompt` with BOS, decodes greedily until BOS (llama2.c's end of a
/// story) or `max_positions`. Returns the decoded text, prompt included. `on_piece` (optional) sees
/// each piece as it is produced.
std::string generate_greedy(LlamaModel& model, const Llama2cTokenizer& tokenizer, const std::string& prompt,
                            int max_positions, KvCache& cache,
                            const std::function<void(const std::string&)>& on_piece = {});

/// The byte string of every token id (vocab.bin from scripts/prepare_smollm2.py: i32 count, then per
/// token an i32 length and the bytes), to print what a byte-level BPE model generates.
class ByteVocabulary {
 public:
  explicit ByteVocabulary(const std::string& path);
  const std::string& piece(int token) const { return pieces_.at(static_cast<std::size_t>(token)); }
  int size() const { return static_cast<int>(pieces_.size()); }

 private:
  std::vector<std::string> pieces_;
};

/// int32 token ids, nothing else (the *.tokens files of scripts/prepare_smollm2.py).
std::vector<int> read_token_file(const std::string& path);

}  // namespace llama
