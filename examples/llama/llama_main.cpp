// packkv_llama: greedy text generation with a Llama-architecture model whose KV cache is packkv's
// PackedKVCache (or the exact fp32 cache, for comparison).
//
//   packkv_llama --model stories260K.bin --tokenizer tok512.bin --prompt "Once upon a time"
//   packkv_llama ... --cache exact
//   packkv_llama ... --k-rel 0.1 --v-rel 0.2 --block 64 --repack median
//   packkv_llama --model .cache/smollm2/smollm2-135m.pkvllama --vocab .cache/smollm2/vocab.bin \
//                --prompt-tokens .cache/smollm2/prompt.tokens      # byte-level BPE models
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "generate.hpp"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: packkv_llama --model FILE (--tokenizer FILE [--prompt TEXT] | --vocab FILE --prompt-tokens FILE)\n"
               "                    [--steps N] [--stop-token ID]\n"
               "                    [--cache packkv|exact] [--k-rel R] [--v-rel R] [--block N]\n"
               "                    [--residual N] [--repack none|median|greedy] [--device cpu|cuda]\n"
               "  --model      a llama2.c checkpoint (stories260K.bin) or a PKVLLAMA file\n"
               "  --tokenizer  llama2.c tokenizer (tok512.bin)\n"
               "  --vocab, --prompt-tokens  vocab.bin and int32 prompt ids from scripts/prepare_smollm2.py\n"
               "  --stop-token  id that ends generation with --prompt-tokens (default 2, SmolLM2's end of turn)\n"
               "  --steps      positions to fill, prompt included (default 256)\n");
}

packkv::RepackMethod parse_repack(const std::string& s) {
  if (s == "none") return packkv::RepackMethod::none;
  if (s == "median") return packkv::RepackMethod::median;
  if (s == "greedy") return packkv::RepackMethod::greedy;
  throw std::invalid_argument("unknown --repack " + s);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, tokenizer_path, vocab_path, prompt_tokens_path, prompt = "Once upon a time",
      cache_kind = "packkv";
  int steps = 256;
  int stop_token = 2;
  packkv::CacheConfig config;
  config.block_tokens = 16;  // short stories: small blocks so that most of the text is compressed
  config.k_rel = 0.05f;
  config.v_rel = 0.1f;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--model") model_path = value();
      else if (arg == "--tokenizer") tokenizer_path = value();
      else if (arg == "--prompt") prompt = value();
      else if (arg == "--vocab") vocab_path = value();
      else if (arg == "--prompt-tokens") prompt_tokens_path = value();
      else if (arg == "--stop-token") stop_token = std::stoi(value());
      else if (arg == "--steps") steps = std::stoi(value());
      else if (arg == "--cache") cache_kind = value();
      else if (arg == "--k-rel") config.k_rel = std::stof(value());
      else if (arg == "--v-rel") config.v_rel = std::stof(value());
      else if (arg == "--block") config.block_tokens = std::stoi(value());
      else if (arg == "--residual") config.residual_tokens = std::stoi(value());
      else if (arg == "--repack") config.repack = parse_repack(value());
      else if (arg == "--device") config.device = value() == "cuda" ? packkv::Device::cuda : packkv::Device::cpu;
      else if (arg == "--help" || arg == "-h") { usage(); return 0; }
      else throw std::invalid_argument("unknown argument " + arg);
    }
    const bool by_ids = !vocab_path.empty() && !prompt_tokens_path.empty();
    if (model_path.empty() || (tokenizer_path.empty() && !by_ids)) {
      usage();
      return 2;
    }
    llama::LlamaModel model = llama::LlamaModel::load(model_path);
    const llama::LlamaConfig& c = model.config();
    std::fprintf(stderr, "model: dim %d, %d layers, %d query heads, %d KV heads, head_dim %d, vocab %d\n", c.dim,
                 c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size);

    std::unique_ptr<llama::KvCache> cache;
    if (cache_kind == "exact") cache = llama::make_exact_cache(c.kv_shape());
    else if (cache_kind == "packkv") cache = llama::make_packkv_cache(c.kv_shape(), config);
    else throw std::invalid_argument("unknown --cache " + cache_kind);
    std::fprintf(stderr, "cache: %s\n", cache->describe().c_str());

    auto print = [](const std::string& piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    };
    if (by_ids) {
      const llama::ByteVocabulary vocab(vocab_path);
      const std::vector<int> prompt_ids = llama::read_token_file(prompt_tokens_path);
      for (int id : prompt_ids) print(vocab.piece(id));
      llama::generate_greedy_ids(model, prompt_ids, steps, *cache, stop_token, [&](int id) { print(vocab.piece(id)); });
    } else {
      const llama::Llama2cTokenizer tokenizer(tokenizer_path, c.vocab_size);
      llama::generate_greedy(model, tokenizer, prompt, steps, *cache, print);
    }
    std::fputc('\n', stdout);
    const llama::KvBytes b = cache->bytes();
    std::fprintf(stderr, "KV cache: K %.0f bytes (%.2fx vs fp16), V %.0f bytes (%.2fx vs fp16)\n", b.k_bytes,
                 b.k_ratio(), b.v_bytes, b.v_ratio());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "packkv_llama: %s\n", e.what());
    return 1;
  }
  return 0;
}
