// Prints, as JSON, the launch facts of the CUDA kernels that are runtime values rather than
// properties of the compiled code: the benchmark geometry and the dynamic shared memory the
// launchers of kernels/launch.hpp request for it. scripts/cuda_cost.sh builds this tool against
// the sm_90 objects it compiles and passes its output to scripts/cuda_cost.py.
//
// Nothing here touches a GPU: the sizing functions are plain host code.
//
// The benchmark geometry: Llama-3-8B attention (head_dim 128, 8 KV heads, 32 query heads), blocks
// of 64 tokens, everything else (code bits, repacking, K mode) from the default CacheConfig.
#include <algorithm>
#include <cstdio>

#include "launch.hpp"
#include "packkv/config.hpp"

namespace {

using packkv::detail::cuda::kMaxHeadsPerCta;

packkv::CacheConfig benchmark_config() {
  packkv::CacheConfig config;
  config.num_kv_heads = 8;
  config.num_q_heads = 32;
  config.head_dim = 128;
  config.block_tokens = 64;
  packkv::validate(config);
  return config;
}

}  // namespace

int main() {
  const packkv::CacheConfig config = benchmark_config();
  const int k_max_code = packkv::max_code_for_rel(config.k_rel);
  const int v_max_code = packkv::max_code_for_rel(config.v_rel);
  // The same fields, derived the same way, as make_codec_params (src/codec/encode.cpp).
  packkv::format::BlockGeometry g{};
  g.block_tokens = config.block_tokens;
  g.head_dim = config.head_dim;
  g.num_heads = config.num_kv_heads;
  g.k_bits = packkv::bits_for_max_code(k_max_code);
  g.v_bits = packkv::bits_for_max_code(v_max_code);
  g.permuted = config.repack != packkv::RepackMethod::none;
  g.k_per_channel = config.k_mode == packkv::QuantMode::per_channel;

  // As DeviceContext (src/cuda/device_context.cpp) shapes the read path.
  const int group = config.num_q_heads / config.num_kv_heads;
  const int heads_per_cta = std::min(group, kMaxHeadsPerCta);
  const int subgroups = (group + heads_per_cta - 1) / heads_per_cta;

  std::printf("{\n");
  std::printf("  \"config\": \"%s\",\n", packkv::describe(config).c_str());
  std::printf("  \"geometry\": {\"block_tokens\": %d, \"head_dim\": %d, \"num_kv_heads\": %d, \"num_q_heads\": %d,\n",
              g.block_tokens, g.head_dim, g.num_heads, config.num_q_heads);
  std::printf("               \"k_bits\": %d, \"v_bits\": %d, \"k_max_code\": %d, \"v_max_code\": %d,\n", g.k_bits,
              g.v_bits, k_max_code, v_max_code);
  std::printf("               \"permuted\": %s, \"k_per_channel\": %s,\n", g.permuted ? "true" : "false",
              g.k_per_channel ? "true" : "false");
  std::printf("               \"group\": %d, \"heads_per_cta\": %d, \"subgroups\": %d},\n", group, heads_per_cta,
              subgroups);
  packkv::detail::cuda::ReadShape shape{};
  shape.geometry = g;
  shape.num_q_heads = config.num_q_heads;
  shape.group = group;
  shape.heads_per_cta = heads_per_cta;
  shape.subgroups = subgroups;
  const packkv::detail::cuda::FastPlan fast = packkv::detail::cuda::plan_fast_attention(shape, 227 * 1024);
  std::printf("  \"fast_plan\": {\"usable\": %s, \"heads_per_cta\": %d, \"stages\": %d, \"ctas_per_sm\": %d},\n",
              fast.usable ? "true" : "false", fast.heads_per_cta, fast.stages, fast.ctas_per_sm);
  const packkv::detail::cuda::FastPlan fast_scores =
      packkv::detail::cuda::plan_fast_primitive(shape, 227 * 1024, packkv::format::Side::k);
  const packkv::detail::cuda::FastPlan fast_attn_v =
      packkv::detail::cuda::plan_fast_primitive(shape, 227 * 1024, packkv::format::Side::v);
  // The fast kernels' compact-parameter instantiations serve the same geometry in format version 3.
  packkv::detail::cuda::ReadShape compact_shape = shape;
  compact_shape.geometry.compact_params = true;
  const std::size_t fast_compact = packkv::detail::cuda::plan_fast_attention(compact_shape, 227 * 1024).shared_bytes;
  const std::size_t fast_scores_compact =
      packkv::detail::cuda::plan_fast_primitive(compact_shape, 227 * 1024, packkv::format::Side::k).shared_bytes;
  const std::size_t fast_attn_v_compact =
      packkv::detail::cuda::plan_fast_primitive(compact_shape, 227 * 1024, packkv::format::Side::v).shared_bytes;
  // Their per-channel-K instantiations (attention and scores: attn_v reads V only) serve the same
  // geometry with K's parameters per channel, in either encoding.
  packkv::detail::cuda::ReadShape channel_shape = shape, channel_compact_shape = compact_shape;
  channel_shape.geometry.k_per_channel = true;
  channel_compact_shape.geometry.k_per_channel = true;
  auto attention_bytes = [](const packkv::detail::cuda::ReadShape& s) {
    return packkv::detail::cuda::plan_fast_attention(s, 227 * 1024).shared_bytes;
  };
  auto scores_bytes = [](const packkv::detail::cuda::ReadShape& s) {
    return packkv::detail::cuda::plan_fast_primitive(s, 227 * 1024, packkv::format::Side::k).shared_bytes;
  };
  std::printf("  \"dynamic_shared_bytes\": {\"read\": %zu, \"encode\": %zu, \"compact\": %zu, \"fast\": %zu, "
              "\"fast_scores\": %zu, \"fast_attn_v\": %zu, \"fast_compact_params\": %zu, "
              "\"fast_scores_compact_params\": %zu, \"fast_attn_v_compact_params\": %zu, "
              "\"fast_channel_k\": %zu, \"fast_channel_k_compact_params\": %zu, "
              "\"fast_scores_channel_k\": %zu, \"fast_scores_channel_k_compact_params\": %zu}\n",
              packkv::detail::cuda::read_shared_bytes(g), packkv::detail::cuda::encode_shared_bytes(g),
              packkv::detail::cuda::compact_shared_bytes(g), fast.shared_bytes, fast_scores.shared_bytes,
              fast_attn_v.shared_bytes, fast_compact, fast_scores_compact, fast_attn_v_compact,
              attention_bytes(channel_shape), attention_bytes(channel_compact_shape), scores_bytes(channel_shape),
              scores_bytes(channel_compact_shape));
  std::printf("}\n");
  return 0;
}
