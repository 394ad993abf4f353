// The llama2.c tokenizer (tok512.bin and friends): SentencePiece-style BPE driven by merge scores,
// with byte fallback.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

namespace llama {

class Llama2cTokenizer {
 public:
  /// File layout: int32 max_token_length, then per token: float32 score, int32 length, bytes.
  Llama2cTokenizer(const std::string& path, int vocab_size);

  static constexpr int kBos = 1;
  static constexpr int kEos = 2;

  /// Token ids for `text`, with a leading BOS if asked, and the dummy-prefix space SentencePiece adds.
  std::vector<int> encode(const std::string& text, bool bos, bool eos) const;
  /// The text `token` stands for when it follows `previous`.
  std::string decode(int previous, int token) const;
  int vocab_size() const { return static_cast<int>(pieces_.size()); }

 private:
  int lookup(const std::string& piece) const;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
};

}  // namespace llama
