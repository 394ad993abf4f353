#include "packkv/config.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "packkv/error.hpp"
#include "packkv/format/image.hpp"

namespace packkv {

const char* to_string(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }
const char* to_string(QuantMode m) { return m == QuantMode::per_token ? "per_token" : "per_channel"; }
const char* to_string(RepackMethod m) {
  switch (m) {
    case RepackMethod::none: return "none";
    case RepackMethod::median: return "median";
    case RepackMethod::greedy: return "greedy";
  }
  return "?";
}

int max_code_for_rel(float rel) {
  PACKKV_REQUIRE(std::isfinite(rel) && rel >= kMinRel && rel <= kMaxRel,
                 fmt::format("relative error bound {} is outside [1/255, 1]", rel));
  // The tolerance keeps rel = 1/n (which float cannot hold exactly) at n codes' worth of range.
  const double inverse = 1.0 / static_cast<double>(rel);
  int max_code = static_cast<int>(std::ceil(inverse - 1e-6));
  if (max_code < 1) max_code = 1;
  if (max_code > 255) max_code = 255;
  return max_code;
}

void validate(const CacheConfig& c) {
  PACKKV_REQUIRE(c.num_layers >= 1 && c.num_layers <= format::kMaxImageLayers,
                 fmt::format("num_layers must be in [1, {}], got {}", format::kMaxImageLayers, c.num_layers));
  PACKKV_REQUIRE(c.num_kv_heads >= 1 && c.num_kv_heads <= 1024,
                 fmt::format("num_kv_heads must be in [1, 1024], got {}", c.num_kv_heads));
  PACKKV_REQUIRE(c.num_q_heads >= 1 && c.num_q_heads % c.num_kv_heads == 0,
                 fmt::format("num_q_heads must be a positive multiple of num_kv_heads ({}), got {}",
                             c.num_kv_heads, c.num_q_heads));
  PACKKV_REQUIRE(c.num_q_heads / c.num_kv_heads <= 64,
                 fmt::format("at most 64 query heads per KV head are supported, got {}",
                             c.num_q_heads / c.num_kv_heads));
  PACKKV_REQUIRE(c.head_dim >= 8 && c.head_dim <= 256 && c.head_dim % 8 == 0,
                 fmt::format("head_dim must be a multiple of 8 in [8, 256], got {}", c.head_dim));
  PACKKV_REQUIRE(c.block_tokens >= 16 && c.block_tokens <= 256 && c.block_tokens % 16 == 0,
                 fmt::format("block_tokens must be a multiple of 16 in [16, 256], got {}", c.block_tokens));
  PACKKV_REQUIRE(c.residual_tokens >= 0 && c.residual_tokens <= 1 << 20,
                 fmt::format("residual_tokens must be in [0, 2^20], got {}", c.residual_tokens));
  PACKKV_REQUIRE(c.sink_tokens >= 0 && c.sink_tokens <= c.block_tokens,
                 fmt::format("sink_tokens must be in [0, block_tokens = {}], got {}", c.block_tokens, c.sink_tokens));
  PACKKV_REQUIRE(std::isfinite(c.k_rel) && c.k_rel >= kMinRel && c.k_rel <= kMaxRel,
                 fmt::format("k_rel must be in [1/255, 1], got {}", c.k_rel));
  PACKKV_REQUIRE(std::isfinite(c.v_rel) && c.v_rel >= kMinRel && c.v_rel <= kMaxRel,
                 fmt::format("v_rel must be in [1/255, 1], got {}", c.v_rel));
  for (const auto& [name, rels] : {std::pair<const char*, const std::vector<float>*>{"layer_k_rel", &c.layer_k_rel},
                                   std::pair<const char*, const std::vector<float>*>{"layer_v_rel", &c.layer_v_rel}}) {
    PACKKV_REQUIRE(rels->empty() || rels->size() == static_cast<std::size_t>(c.num_layers),
                   fmt::format("{} must be empty or hold one bound per layer ({}), got {} values", name, c.num_layers,
                               rels->size()));
    for (std::size_t l = 0; l < rels->size(); ++l) {
      const float rel = (*rels)[l];
      PACKKV_REQUIRE(std::isfinite(rel) && rel >= kMinRel && rel <= kMaxRel,
                     fmt::format("{}[{}] must be in [1/255, 1], got {}", name, l, rel));
    }
  }
  PACKKV_REQUIRE(c.k_mode == QuantMode::per_token || c.k_mode == QuantMode::per_channel,
                 fmt::format("unknown k_mode {}", static_cast<int>(c.k_mode)));
  PACKKV_REQUIRE(c.repack == RepackMethod::none || c.repack == RepackMethod::median ||
                     c.repack == RepackMethod::greedy,
                 fmt::format("unknown repack method {}", static_cast<int>(c.repack)));
  PACKKV_REQUIRE(c.device == Device::cpu || c.device == Device::cuda,
                 fmt::format("unknown device {}", static_cast<int>(c.device)));
  PACKKV_REQUIRE(c.num_threads >= 0 && c.num_threads <= 1024,
                 fmt::format("num_threads must be in [0, 1024], got {}", c.num_threads));
  // A strict append must see its own validation's report, not one left for polling.
  PACKKV_REQUIRE(!(c.cuda_strict && c.cuda_poll_errors),
                 "cuda_strict and cuda_poll_errors cannot both be set: strict appends report their own errors");
}

float k_rel_of(const CacheConfig& config, int layer) {
  return config.layer_k_rel.empty() ? config.k_rel : config.layer_k_rel.at(static_cast<std::size_t>(layer));
}
float v_rel_of(const CacheConfig& config, int layer) {
  return config.layer_v_rel.empty() ? config.v_rel : config.layer_v_rel.at(static_cast<std::size_t>(layer));
}

namespace {
/// "0.1", or "per layer [0.05 .. 0.25]" when a per-layer list replaces it.
std::string rel_text(float rel, const std::vector<float>& per_layer) {
  if (per_layer.empty()) return fmt::format("{}", rel);
  const auto [lo, hi] = std::minmax_element(per_layer.begin(), per_layer.end());
  return fmt::format("per-layer[{}..{}]", *lo, *hi);
}
}  // namespace

std::string describe(const CacheConfig& c) {
  return fmt::format(
      "layers={} kv_heads={} q_heads={} head_dim={} block={} residual={} sinks={} k_rel={} v_rel={} k_mode={} "
      "repack={} rotate_k={} rotate_v={} compact_params={} budget={} device={} cuda_strict={} cuda_poll_errors={}",
      c.num_layers, c.num_kv_heads, c.num_q_heads, c.head_dim, c.block_tokens, c.residual_tokens,
      c.sink_tokens, rel_text(c.k_rel, c.layer_k_rel), rel_text(c.v_rel, c.layer_v_rel), to_string(c.k_mode), to_string(c.repack), c.rotate_k, c.rotate_v, c.compact_params, c.memory_budget_bytes, to_string(c.device), c.cuda_strict,
      c.cuda_poll_errors);
}

}  // namespace packkv
