#include "generate.hpp"

#include <stdexcept>
#include <vector>

namespace llama {

std::string generate_greedy(LlamaModel& model, const Llama2cTokenizer& tokenizer, const std::string& prompt,
                            int max_positions, KvCache& cache, const std::function<void(const std::string&)>& on_piece) {
  const std::vector<int> prompt_ids = tokenizer.encode(prompt, /*bos=*/true, /*eos=*/false);
  const int vocab = model.config().vocab_size;
  const int dim = model.config().dim;
  if (static_cast<int>(prompt_ids.size()) > max_positions) throw std::invalid_argument("prompt longer than max_positions");

  std::string text;
  auto emit = [&](int previous, int token) {
    const std::string piece = tokenizer.decode(previous, token);
    text += piece;
    if (on_piece) on_piece(piece);
  };
  for (std::size_t i = 1; i < prompt_ids.size(); ++i) emit(prompt_ids[i - 1], prompt_ids[i]);

  // The prompt goes through in one batched call; its last row predicts the first new token.
  std::vector<float> logits(static_cast<std::size_t>(vocab));
  const std::vector<float>& hidden = model.forward(prompt_ids.data(), static_cast<int>(prompt_ids.size()), 0, cache);
  model.logits(hidden.data() + (prompt_ids.size() - 1) * dim, 1, logits.data());
  int previous = prompt_ids.back();
  for (int pos = static_cast<int>(prompt_ids.size()); pos < max_positions; ++pos) {
    const int next = argmax(logits.data(), vocab);
    if (next == Llama2cTokenizer::kBos) break;
    emit(previous, next);
    model.logits(model.forward(&next, 1, pos, cache).data(), 1, logits.data());
    previous = next;
  }
  return text;
}

}  // namespace llama
