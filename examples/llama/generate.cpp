#include "generate.hpp"

#include <cstdint>
#include <fstream>
#include <stdexcept>

namespace llama {

std::vector<int> generate_greedy_ids(LlamaModel& model, const std::vector<int>& prompt, int max_positions, KvCache& cache,
                                     int stop_token, const std::function<void(int token)>& on_token) {
  if (prompt.empty()) throw std::invalid_argument("empty prompt");
  if (static_cast<int>(prompt.size()) > max_positions) throw std::invalid_argument("prompt longer than max_positions");
  const int vocab = model.config().vocab_size;
  const int dim = model.config().dim;
  std::vector<int> generated;
  std::vector<float> logits(static_cast<std::size_t>(vocab));
  // The prompt goes through in one batched call; its last row predicts the first new token.
  const std::vector<float>& hidden = model.forward(prompt.data(), static_cast<int>(prompt.size()), 0, cache);
  model.logits(hidden.data() + (prompt.size() - 1) * dim, 1, logits.data());
  for (int pos = static_cast<int>(prompt.size()); pos < max_positions; ++pos) {
    const int next = argmax(logits.data(), vocab);
    if (next == stop_token) break;
    generated.push_back(next);
    if (on_token) on_token(next);
    model.logits(model.forward(&next, 1, pos, cache).data(), 1, logits.data());
  }
  return generated;
}

std::string generate_greedy(LlamaModel& model, const Llama2cTokenizer& tokenizer, const std::string& prompt,
                            int max_positions, KvCache& cache, const std::function<void(const std::string&)>& on_piece) {
  const std::vector<int> prompt_ids = tokenizer.encode(prompt, /*bos=*/true, /*eos=*/false);
  std::string text;
  int previous = prompt_ids.front();
  auto emit = [&](int token) {
    const std::string piece = tokenizer.decode(previous, token);
    text += piece;
    if (on_piece) on_piece(piece);
    previous = token;
  };
  for (std::size_t i = 1; i < prompt_ids.size(); ++i) emit(prompt_ids[i]);
  generate_greedy_ids(model, prompt_ids, max_positions, cache, Llama2cTokenizer::kBos, emit);
  return text;
}

ByteVocabulary::ByteVocabulary(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::int32_t count = 0;
  in.read(reinterpret_cast<char*>(&count), sizeof count);
  if (!in || count <= 0) throw std::runtime_error(path + ": malformed vocabulary");
  pieces_.resize(static_cast<std::size_t>(count));
  for (std::string& piece : pieces_) {
    std::int32_t length = 0;
    in.read(reinterpret_cast<char*>(&length), sizeof length);
    if (!in || length < 0 || length > 4096) throw std::runtime_error(path + ": malformed vocabulary");
    piece.resize(static_cast<std::size_t>(length));
    in.read(piece.data(), length);
    if (!in) throw std::runtime_error(path + ": truncated");
  }
}

std::vector<int> read_token_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<int> ids(static_cast<std::size_t>(in.tellg()) / sizeof(std::int32_t));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(ids.data()), static_cast<std::streamsize>(ids.size() * sizeof(std::int32_t)));
  return ids;
}

}  // namespace llama
