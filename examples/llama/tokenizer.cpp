#include "tokenizer.hpp"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace llama {

Llama2cTokenizer::Llama2cTokenizer(const std::string& path, int vocab_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::int32_t max_token_length = 0;
  in.read(reinterpret_cast<char*>(&max_token_length), sizeof max_token_length);
  pieces_.resize(static_cast<std::size_t>(vocab_size));
  scores_.resize(pieces_.size());
  for (int i = 0; i < vocab_size; ++i) {
    std::int32_t length = 0;
    in.read(reinterpret_cast<char*>(&scores_[i]), sizeof(float));
    in.read(reinterpret_cast<char*>(&length), sizeof length);
    if (!in || length < 0 || length > max_token_length) throw std::runtime_error(path + ": malformed token " + std::to_string(i));
    pieces_[i].resize(static_cast<std::size_t>(length));
    in.read(pieces_[i].data(), length);
    if (!in) throw std::runtime_error(path + ": truncated");
    ids_.emplace(pieces_[i], i);  // the first id wins if a piece repeats
  }
}

int Llama2cTokenizer::lookup(const std::string& piece) const {
  const auto it = ids_.find(piece);
  return it == ids_.end() ? -1 : it->second;
}

std::vector<int> Llama2cTokenizer::encode(const std::string& text, bool bos, bool eos) const {
  std::vector<int> tokens;
  if (bos) tokens.push_back(kBos);
  // SentencePiece treats the text as if it began with a space ("add_dummy_prefix").
  if (!text.empty()) {
    const int space = lookup(" ");
    if (space >= 0) tokens.push_back(space);
  }
  // One token per UTF-8 code point, or its bytes (ids 3..258 are <0x00>..<0xFF>) when the code
  // point is not in the vocabulary.
  for (std::size_t i = 0; i < text.size();) {
    std::size_t len = 1;
    const auto lead = static_cast<unsigned char>(text[i]);
    if (lead >= 0xF0) len = 4;
    else if (lead >= 0xE0) len = 3;
    else if (lead >= 0xC0) len = 2;
    len = std::min(len, text.size() - i);
    const int id = lookup(text.substr(i, len));
    if (id >= 0) {
      tokens.push_back(id);
    } else {
      for (std::size_t b = 0; b < len; ++b) tokens.push_back(static_cast<unsigned char>(text[i + b]) + 3);
    }
    i += len;
  }
  // Merge the adjacent pair with the best score until no pair is in the vocabulary.
  for (;;) {
    float best_score = -1e30f;
    int best_id = -1;
    std::size_t best_at = 0;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int id = lookup(pieces_[tokens[i]] + pieces_[tokens[i + 1]]);
      if (id >= 0 && scores_[id] > best_score) {
        best_score = scores_[id];
        best_id = id;
        best_at = i;
      }
    }
    if (best_id < 0) break;
    tokens[best_at] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
  }
  if (eos) tokens.push_back(kEos);
  return tokens;
}

std::string Llama2cTokenizer::decode(int previous, int token) const {
  std::string piece = pieces_.at(static_cast<std::size_t>(token));
  // After BOS, SentencePiece drops the dummy-prefix space.
  if (previous == kBos && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
  unsigned int byte = 0;
  if (piece.size() == 6 && std::sscanf(piece.c_str(), "<0x%02X>", &byte) == 1) return std::string(1, static_cast<char>(byte));
  return piece;
}

}  // namespace llama
