// The CUDA backend against the CPU backend and the CPU codec: encoded bytes must be identical,
// attention, scores, attn_v and read_back equal within fp32 tolerance, statistics equal.
// Without a usable GPU every test skips and says why.
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <numeric>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "launch.hpp"
#include "packkv/cuda/device_codec.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::random_values;

#define PACKKV_SKIP_WITHOUT_GPU()                                                     \
  do {                                                                                \
    std::string why;                                                                  \
    if (!cuda::device_available(&why)) GTEST_SKIP() << "CUDA tests skipped: " << why; \
  } while (0)

void cuda_ok(cudaError_t status, const char* what) {
  ASSERT_EQ(status, cudaSuccess) << what << ": " << cudaGetErrorString(status);
}

/// A device copy of a host vector; poison() fills it with 0xFF bytes (NaN in every float type).
template <class U>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t n) : n_(n) {
    if (n_ != 0 && cudaMalloc(&data_, n_ * sizeof(U)) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
  }
  explicit DeviceArray(const std::vector<U>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  U* get() const { return static_cast<U*>(data_); }
  void upload(const std::vector<U>& host) {
    if (n_) cudaMemcpy(data_, host.data(), n_ * sizeof(U), cudaMemcpyHostToDevice);
  }
  std::vector<U> download() const {
    std::vector<U> host(n_);
    if (n_) cudaMemcpy(host.data(), data_, n_ * sizeof(U), cudaMemcpyDeviceToHost);
    return host;
  }
  void poison() {
    if (n_) cudaMemset(data_, 0xFF, n_ * sizeof(U));
  }

 private:
  void* data_ = nullptr;
  std::size_t n_;
};

/// Compares element-wise with |gpu - cpu| <= atol + rtol * |cpu|; reports the worst element and
/// fails on any NaN/Inf in the GPU result (outputs are poisoned before each run).
template <class U>
void expect_close(const std::vector<U>& gpu, const std::vector<U>& cpu, double rtol, double atol_fraction,
                  const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double scale = 0;
  for (const U& x : cpu) scale = std::max(scale, std::fabs(static_cast<double>(to_float(x))));
  const double atol = atol_fraction * std::max(scale, 1e-30);
  double worst_ratio = 0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double g = to_float(gpu[i]), c = to_float(cpu[i]);
    ASSERT_TRUE(std::isfinite(g)) << what << ": element " << i << " is " << g << " (unwritten or overflowed)";
    const double ratio = std::fabs(g - c) / (atol + rtol * std::fabs(c));
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  EXPECT_LE(worst_ratio, 1.0) << what << ": worst element " << worst << " gpu " << to_float(gpu[worst]) << " cpu "
                              << to_float(cpu[worst]) << " (" << worst_ratio << " x the tolerance)";
}

/// Element-wise equality of the bit patterns (so -0 differs from +0, and NaN is never equal).
inline void expect_bit_identical(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    std::uint32_t a, b;
    std::memcpy(&a, &gpu[i], 4);
    std::memcpy(&b, &cpu[i], 4);
    ASSERT_EQ(a, b) << what << ": element " << i << " gpu " << gpu[i] << " cpu " << cpu[i];
  }
}

template <class T>
double output_rtol() {
  return 4 * test::unit_roundoff<T>() + 1e-5;
}

// ---- the encoder, byte for byte ---------------------------------------------------------------

struct EncoderCase {
  int head_dim, block_tokens, num_heads;
  float k_rel, v_rel;
  RepackMethod repack;
  QuantMode k_mode;
};

CacheConfig encoder_config(const EncoderCase& e) {
  CacheConfig c;
  c.num_kv_heads = e.num_heads;
  c.num_q_heads = e.num_heads;
  c.head_dim = e.head_dim;
  c.block_tokens = e.block_tokens;
  c.k_rel = e.k_rel;
  c.v_rel = e.v_rel;
  c.repack = e.repack;
  c.k_mode = e.k_mode;
  return c;
}

/// encode_blocks against encode_block, byte for byte, for `num_blocks` blocks of k and v; returns
/// the CPU blocks.
template <class T>
std::vector<std::vector<std::uint8_t>> check_encoder_values(const CacheConfig& c, const std::vector<T>& k,
                                                            const std::vector<T>& v, int num_blocks) {
  const CodecParams params = make_codec_params(c);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  const std::size_t stride = params.geometry.max_block_bytes();

  DeviceArray<T> dk(k), dv(v);
  DeviceArray<std::uint8_t> out(static_cast<std::size_t>(num_blocks) * stride);
  DeviceArray<std::uint32_t> sizes(static_cast<std::size_t>(num_blocks));
  out.poison();
  cuda::encode_blocks(params, dk.get(), dv.get(), num_blocks, out.get(), stride, sizes.get());
  const auto gpu = out.download();
  const auto gpu_sizes = sizes.download();

  EncodeScratch scratch;
  std::vector<std::vector<std::uint8_t>> blocks;
  std::vector<std::uint8_t> cpu(stride);
  for (int b = 0; b < num_blocks; ++b) {
    const std::size_t at = static_cast<std::size_t>(b) * c.block_tokens * row;
    const std::uint32_t size = encode_block(params, k.data() + at, v.data() + at, row, cpu.data(), scratch);
    EXPECT_EQ(gpu_sizes[b], size) << "block " << b << " size; " << describe(c);
    const std::uint8_t* g = gpu.data() + static_cast<std::size_t>(b) * stride;
    for (std::uint32_t i = 0; i < size; ++i) {
      if (g[i] != cpu[i]) {
        ADD_FAILURE() << "block " << b << " byte " << i << " of " << size << "; " << describe(c);
        return blocks;
      }
    }
    blocks.emplace_back(cpu.begin(), cpu.begin() + size);
  }
  return blocks;
}

template <class T>
void check_encoder_case(const EncoderCase& e, int num_blocks, std::uint64_t seed) {
  const CacheConfig c = encoder_config(e);
  const std::size_t row = static_cast<std::size_t>(e.num_heads) * e.head_dim;
  // Rounds alternate between plain and frame of reference.
  const std::size_t tokens = static_cast<std::size_t>(num_blocks) * e.block_tokens;
  const auto k = convert<T>(test::mixed_rounds_values(tokens, row, seed, 3.0));
  const auto v = convert<T>(test::mixed_rounds_values(tokens, row, seed + 1, 0.5));
  check_encoder_values(c, k, v, num_blocks);
}

/// Tokens whose heads compress very differently, so that every head's place in a block depends on
/// the sizes before it: head h of K is constant over the block's tokens (frame-of-reference packs
/// of width 0, the smallest section) when h % 3 == 0, smooth (narrow packs) when h % 3 == 1, noise
/// (plain rounds, the largest) when h % 3 == 2; V is shifted by one head.
inline std::vector<float> uneven_heads_values(std::size_t tokens, int heads, int dim, std::uint64_t seed, int shift) {
  synthetic::Rng rng(seed);
  const std::size_t row = static_cast<std::size_t>(heads) * dim;
  std::vector<double> profile(row);
  for (auto& p : profile) p = rng.normal();
  std::vector<float> x(tokens * row);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int c = 0; c < dim; ++c) {
        const std::size_t i = static_cast<std::size_t>(h) * dim + c;
        const double base = profile[i] * (1 + h % 4);
        const int kind = (h + shift) % 3;
        const double r = kind == 0 ? base : kind == 1 ? base + 0.01 * rng.normal() : (4.0 * rng.uniform() - 2.0);
        x[t * row + i] = static_cast<float>(r);
      }
    }
  }
  return x;
}

/// Section bytes of each head of a block, K then V per head.
std::vector<std::uint32_t> section_sizes(const std::vector<std::uint8_t>& block, const format::BlockGeometry& g) {
  std::vector<std::uint32_t> sizes;
  for (int h = 0; h < g.num_heads; ++h) {
    const format::HeadEntry e = format::head_entry(block.data(), g, h);
    const std::uint32_t next = h + 1 < g.num_heads ? format::head_entry(block.data(), g, h + 1).k_offset
                                                   : static_cast<std::uint32_t>(block.size()) - format::kTrailingSlack;
    sizes.push_back(e.v_offset - e.k_offset);
    sizes.push_back(next - e.v_offset);
  }
  return sizes;
}

template <class T>
class CudaTyped : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, fp16_t, bf16_t>;
TYPED_TEST_SUITE(CudaTyped, StorageTypes);

TYPED_TEST(CudaTyped, EncoderBytesEqualCpuAcrossGeometries) {
  PACKKV_SKIP_WITHOUT_GPU();
  std::uint64_t seed = 11;
  for (int dim : {64, 128, 256, 40}) {
    for (int block : {32, 64, 128}) {
      for (RepackMethod repack : {RepackMethod::none, RepackMethod::median}) {
        for (QuantMode mode : {QuantMode::per_token, QuantMode::per_channel}) {
          check_encoder_case<TypeParam>({dim, block, 3, 0.1f, 0.2f, repack, mode}, 3, seed++);
          if (this->HasFailure()) return;
        }
      }
    }
  }
}

TYPED_TEST(CudaTyped, EncoderBytesEqualCpuForEveryCodeWidth) {
  PACKKV_SKIP_WITHOUT_GPU();
  // rel = 1, 1/2, 1/4, ... gives codes of 1 to 8 bits; K and V get different widths.
  const float rels[] = {1.0f, 0.5f, 0.25f, 0.1f, 1.0f / 20, 1.0f / 60, 1.0f / 127, 1.0f / 255};
  std::uint64_t seed = 101;
  for (int i = 0; i < 8; ++i) {
    check_encoder_case<TypeParam>({128, 64, 2, rels[i], rels[7 - i], RepackMethod::median, QuantMode::per_token}, 2,
                                  seed++);
    check_encoder_case<TypeParam>({64, 16, 1, rels[i], rels[i], RepackMethod::none, QuantMode::per_channel}, 2, seed++);
    if (this->HasFailure()) return;
  }
}

// Many heads (odd counts: the directory is padded) whose sections differ several times in size:
// each head is encoded by its own CTA at a worst-case offset and moved to its tight place after,
// so a wrong offset or size of any head shows here.
TYPED_TEST(CudaTyped, EncoderBytesEqualCpuWithManyHeadsOfUnevenSizes) {
  PACKKV_SKIP_WITHOUT_GPU();
  const EncoderCase cases[] = {
      {64, 32, 11, 0.1f, 0.2f, RepackMethod::median, QuantMode::per_token},
      {40, 16, 7, 0.05f, 0.1f, RepackMethod::none, QuantMode::per_channel},
      {128, 64, 9, 1.0f / 60, 0.3f, RepackMethod::none, QuantMode::per_token},
      {256, 16, 3, 0.2f, 1.0f / 255, RepackMethod::median, QuantMode::per_channel},
  };
  std::uint64_t seed = 500;
  for (const EncoderCase& e : cases) {
    const CacheConfig c = encoder_config(e);
    const int num_blocks = 3;
    const std::size_t tokens = static_cast<std::size_t>(num_blocks) * e.block_tokens;
    const auto k = convert<TypeParam>(uneven_heads_values(tokens, e.num_heads, e.head_dim, seed++, 0));
    const auto v = convert<TypeParam>(uneven_heads_values(tokens, e.num_heads, e.head_dim, seed++, 1));
    const auto blocks = check_encoder_values(c, k, v, num_blocks);
    if (this->HasFailure()) return;
    // The case is what it claims: the largest section of a side is several times its smallest.
    const std::vector<std::uint32_t> sizes = section_sizes(blocks[0], make_codec_params(c).geometry);
    for (int side = 0; side < 2; ++side) {
      std::uint32_t lo = ~0u, hi = 0;
      for (std::size_t i = side; i < sizes.size(); i += 2) {
        lo = std::min(lo, sizes[i]);
        hi = std::max(hi, sizes[i]);
      }
      EXPECT_GE(hi, 2 * lo) << "side " << side << "; " << describe(c);
    }
  }
}

// ---- the cache, CPU backend vs CUDA backend ----------------------------------------------------

/// Feeds the same tokens to a CPU cache (host pointers) and a CUDA cache (device pointers).
template <class T>
struct CachePair {
  explicit CachePair(CacheConfig config)
      : cpu(with_device(config, Device::cpu)), gpu(with_device(config, Device::cuda)) {}
  static CacheConfig with_device(CacheConfig c, Device d) {
    c.device = d;
    return c;
  }
  void add(SeqId id) {
    cpu.add_sequence(id);
    gpu.add_sequence(id);
  }
  void append(SeqId id, int layer, int n, std::uint64_t seed) {
    const CacheConfig& c = cpu.config();
    const std::size_t count = static_cast<std::size_t>(n) * c.num_kv_heads * c.head_dim;
    // K: rounds alternate between plain and frame of reference; V: noise (mostly plain rounds).
    const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
    const auto k = convert<T>(test::mixed_rounds_values(static_cast<std::size_t>(n), row, seed, 2.0));
    const auto v = convert<T>(random_values(count, seed ^ 0x5555, 0.7));
    cpu.append(id, layer, k.data(), v.data(), n);
    DeviceArray<T> dk(k), dv(v);
    gpu.append(id, layer, dk.get(), dv.get(), n);
  }
  PackedKVCache<T> cpu, gpu;
};

/// scores_batch and attn_v_batch of `ids` (ragged: sequence i's [num_q_heads][length_i] after the
/// others') against the CPU backend, outputs poisoned. Weights vary by up to 2^18 in size along the
/// array (the fast attn_v's power-of-two weight scale changes along a sequence).
template <class T>
void compare_batched_primitives(CachePair<T>& pair, const std::vector<SeqId>& ids, int layer, std::uint64_t seed,
                                const std::string& label) {
  const CacheConfig& c = pair.cpu.config();
  std::size_t values = 0;
  for (SeqId id : ids) values += static_cast<std::size_t>(c.num_q_heads) * pair.cpu.length(id, layer);
  const std::size_t vectors = ids.size() * c.num_q_heads * c.head_dim;
  const auto q = convert<T>(random_values(vectors, seed));
  std::vector<float> cpu_scores(values);
  pair.cpu.scores_batch(ids, layer, q.data(), cpu_scores.data());
  DeviceArray<T> dq(q);
  DeviceArray<float> dscores(values);
  dscores.poison();
  pair.gpu.scores_batch(ids, layer, dq.get(), dscores.get());
  expect_close(dscores.download(), cpu_scores, 1e-4, 1e-5, label + " scores_batch");

  auto weights = random_values(values, seed + 1, 0.01);
  for (std::size_t i = 0; i < weights.size(); ++i) weights[i] = std::ldexp(weights[i], -6 * static_cast<int>((i / 97) % 4));
  std::vector<float> cpu_out(vectors);
  pair.cpu.attn_v_batch(ids, layer, weights.data(), cpu_out.data());
  DeviceArray<float> dweights(weights), dout(vectors);
  dout.poison();
  pair.gpu.attn_v_batch(ids, layer, dweights.get(), dout.get());
  expect_close(dout.download(), cpu_out, 1e-4, 1e-5, label + " attn_v_batch");
}

template <class T>
void compare_everything(CachePair<T>& pair, const std::vector<SeqId>& ids, int layer, std::uint64_t seed,
                        const std::string& label) {
  const CacheConfig& c = pair.cpu.config();
  const std::size_t q_count = ids.size() * c.num_q_heads * c.head_dim;
  const auto q = convert<T>(random_values(q_count, seed));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  std::vector<T> cpu_out(q_count);
  pair.cpu.attention(ids, layer, q.data(), cpu_out.data(), scale);
  DeviceArray<T> dq(q), dout(q_count);
  dout.poison();
  pair.gpu.attention(ids, layer, dq.get(), dout.get(), scale);
  expect_close(dout.download(), cpu_out, output_rtol<T>(), 2e-5, label + " attention");

  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  for (SeqId id : ids) {
    const std::int64_t len = pair.cpu.length(id, layer);
    ASSERT_EQ(pair.gpu.length(id, layer), len) << label;
    const std::string where = label + " sequence " + std::to_string(id);

    const auto q1 = std::vector<T>(q.begin(), q.begin() + static_cast<std::ptrdiff_t>(c.num_q_heads) * c.head_dim);
    std::vector<float> cpu_scores(static_cast<std::size_t>(c.num_q_heads) * len);
    pair.cpu.scores(id, layer, q1.data(), cpu_scores.data());
    DeviceArray<T> dq1(q1);
    DeviceArray<float> dscores(cpu_scores.size());
    dscores.poison();
    pair.gpu.scores(id, layer, dq1.get(), dscores.get());
    expect_close(dscores.download(), cpu_scores, 1e-4, 1e-5, where + " scores");

    const auto weights = random_values(cpu_scores.size(), seed + id, 0.01);
    std::vector<float> cpu_av(static_cast<std::size_t>(c.num_q_heads) * c.head_dim);
    pair.cpu.attn_v(id, layer, weights.data(), cpu_av.data());
    DeviceArray<float> dweights(weights), dav(cpu_av.size());
    dav.poison();
    pair.gpu.attn_v(id, layer, dweights.get(), dav.get());
    expect_close(dav.download(), cpu_av, 1e-4, 1e-5, where + " attn_v");

    std::vector<float> ck(len * row), cv(len * row);
    pair.cpu.read_back(id, layer, ck.data(), cv.data());
    DeviceArray<float> dk(ck.size()), dv(cv.size());
    dk.poison();
    dv.poison();
    pair.gpu.read_back(id, layer, dk.get(), dv.get());
    // Both backends dequantize with format::dequantize: the same bits, not just close values.
    expect_bit_identical(dk.download(), ck, where + " read_back K");
    expect_bit_identical(dv.download(), cv, where + " read_back V");
  }

  compare_batched_primitives(pair, ids, layer, seed + 17, label);

  const MemoryStats cs = pair.cpu.memory_stats(), gs = pair.gpu.memory_stats();
  EXPECT_EQ(gs.total.payload, cs.total.payload) << label;
  EXPECT_EQ(gs.total.params, cs.total.params) << label;
  EXPECT_EQ(gs.total.descriptors, cs.total.descriptors) << label;
  EXPECT_EQ(gs.total.permutations, cs.total.permutations) << label;
  EXPECT_EQ(gs.total.headers, cs.total.headers) << label;
  EXPECT_EQ(gs.total.k_section_bytes, cs.total.k_section_bytes) << label;
  EXPECT_EQ(gs.total.v_section_bytes, cs.total.v_section_bytes) << label;
  EXPECT_EQ(gs.total.tail, cs.total.tail) << label;
  EXPECT_EQ(gs.total.sinks, cs.total.sinks) << label;
  EXPECT_EQ(gs.total.compressed_tokens, cs.total.compressed_tokens) << label;
  EXPECT_EQ(gs.total.tail_tokens, cs.total.tail_tokens) << label;
  EXPECT_EQ(gs.pool.live_blocks, cs.pool.live_blocks) << label;
  EXPECT_EQ(gs.pool.live_bytes, cs.pool.live_bytes) << label;
}

std::size_t out_size(const CodecParams& params) { return params.geometry.max_block_bytes(); }

CacheConfig base_config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 8;
  c.head_dim = 128;
  c.block_tokens = 64;
  c.k_rel = 0.1f;
  c.v_rel = 0.2f;
  return c;
}

TYPED_TEST(CudaTyped, BatchOfUnevenLengthsMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  CachePair<TypeParam> pair(base_config());
  const std::vector<SeqId> ids = {7, 3, 42, 9};
  const int lengths[] = {1, 63, 64 * 5 + 17, 1000};
  for (std::size_t i = 0; i < ids.size(); ++i) {
    pair.add(ids[i]);
    pair.append(ids[i], 1, lengths[i], 1000 + i);
  }
  compare_everything(pair, ids, 1, 5, "uneven batch");
}

TYPED_TEST(CudaTyped, TokenByTokenAndChunkedAppendsMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.residual_tokens = 40;
  CachePair<TypeParam> pair(c);
  pair.add(1);
  std::uint64_t seed = 77;
  for (int n : {5, 1, 1, 130, 1, 64, 3, 200}) pair.append(1, 0, n, seed++);
  for (int step = 0; step < 70; ++step) pair.append(1, 0, 1, seed++);
  compare_everything(pair, {1}, 0, 9, "residual 40, mixed appends");
}

TEST(Cuda, GqaRatiosHeadDimsAndBlockSizesMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  std::uint64_t seed = 300;
  for (int dim : {64, 96, 128, 256}) {
    for (int block : {32, 64, 128}) {
      for (int group : {1, 2, 4, 8, 12}) {
        CacheConfig c = base_config();
        c.num_layers = 1;
        c.head_dim = dim;
        c.block_tokens = block;
        c.num_kv_heads = 2;
        c.num_q_heads = 2 * group;
        CachePair<fp16_t> pair(c);
        pair.add(1);
        pair.add(2);
        pair.append(1, 0, 3 * block + 5, seed++);
        pair.append(2, 0, block - 1, seed++);
        compare_everything(
            pair, {1, 2}, 0, seed++,
            "dim " + std::to_string(dim) + " block " + std::to_string(block) + " group " + std::to_string(group));
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

TEST(Cuda, ExtremeHeadDimsAndBlockSizesMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  std::uint64_t seed = 900;
  for (int dim : {8, 24, 256}) {
    for (int block : {16, 256}) {
      CacheConfig c = base_config();
      c.num_layers = 1;
      c.head_dim = dim;
      c.block_tokens = block;
      c.num_kv_heads = 3;
      c.num_q_heads = 9;
      c.residual_tokens = 5;
      CachePair<bf16_t> pair(c);
      pair.add(1);
      pair.add(2);
      pair.append(1, 0, 2 * block + 7, seed++);
      pair.append(2, 0, 3, seed++);
      compare_everything(pair, {2, 1}, 0, seed++, "dim " + std::to_string(dim) + " block " + std::to_string(block));
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// Code widths 1 to 8 bits for K and V (the fast path's spreading and minimum additions for every
// width, and plain rounds, which every width gives for noise-like values).
TEST(Cuda, EveryCodeWidthMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  std::uint64_t seed = 1200;
  for (int bits = 1; bits <= 8; ++bits) {
    CacheConfig c = base_config();
    c.num_layers = 1;
    c.k_rel = 1.0f / static_cast<float>((1 << bits) - 1);
    c.v_rel = 1.0f / static_cast<float>((1 << (9 - bits)) - 1);
    ASSERT_EQ(bits_for_max_code(max_code_for_rel(c.k_rel)), bits);
    CachePair<float> pair(c);
    pair.add(1);
    pair.add(2);
    pair.append(1, 0, 64 * 4 + 11, seed++);
    pair.append(2, 0, 64 * 2, seed++);
    compare_everything(pair, {1, 2}, 0, seed++, "K bits " + std::to_string(bits));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Which geometries the fast read path (kernels/decode_attention.cu) serves, with what shape; the
// others take the kernels of attention.cu (the tests above compare both paths with the CPU).
TEST(CudaFastPath, ServesTheCommonGeometriesAndFillsTheSms) {
  auto plan = [](int dim, int group, bool per_channel, int block = 64) {
    detail::cuda::ReadShape shape{};
    shape.geometry.block_tokens = block;
    shape.geometry.head_dim = dim;
    shape.geometry.num_heads = 8;
    shape.geometry.k_bits = 4;
    shape.geometry.v_bits = 3;
    shape.geometry.permuted = true;
    shape.geometry.k_per_channel = per_channel;
    shape.num_q_heads = 8 * group;
    shape.group = group;
    shape.heads_per_cta = std::min(group, detail::cuda::kMaxHeadsPerCta);
    shape.subgroups = (group + shape.heads_per_cta - 1) / shape.heads_per_cta;
    return detail::cuda::plan_fast_attention(shape, 227 * 1024);
  };
  const detail::cuda::FastPlan llama = plan(128, 4, false);
  ASSERT_TRUE(llama.usable);
  EXPECT_EQ(llama.heads_per_cta, 4);
  EXPECT_EQ(llama.stages, 3);
  EXPECT_GE(llama.ctas_per_sm, 4) << "the design target: at least 4 resident CTAs per SM at Llama-3-8B shapes";
  EXPECT_EQ(plan(128, 8, false).heads_per_cta, 8);
  EXPECT_EQ(plan(256, 8, false).heads_per_cta, 4);  // registers: one n-tile at head_dim 256
  EXPECT_EQ(plan(256, 8, false).subgroups, 2);
  EXPECT_TRUE(plan(64, 1, false).usable);
  EXPECT_TRUE(plan(256, 4, false, 256).usable);
  EXPECT_EQ(plan(96, 8, false).heads_per_cta, 8);  // Phi-3's head_dim: three channels per lane
  EXPECT_FALSE(plan(80, 4, false).usable);
  EXPECT_FALSE(plan(40, 4, false).usable);
  // Per-channel K: the same path and shape (q's fragments are rebuilt per block).
  EXPECT_TRUE(plan(128, 4, true).usable);
  EXPECT_EQ(plan(128, 4, true).stages, llama.stages);
  EXPECT_EQ(plan(128, 4, true).heads_per_cta, llama.heads_per_cta);
  // Compact parameters (format version 3) take the same path and shape: smaller sections.
  auto compact = [&](int dim, int group) {
    detail::cuda::ReadShape shape{};
    shape.geometry = format::BlockGeometry{64, dim, 8, 4, 3, true, false, true};
    shape.num_q_heads = 8 * group;
    shape.group = group;
    shape.heads_per_cta = std::min(group, detail::cuda::kMaxHeadsPerCta);
    shape.subgroups = (group + shape.heads_per_cta - 1) / shape.heads_per_cta;
    return detail::cuda::plan_fast_attention(shape, 227 * 1024);
  };
  for (int dim : {64, 96, 128, 256}) {
    const detail::cuda::FastPlan plain = plan(dim, 4, false), small = compact(dim, 4);
    ASSERT_TRUE(small.usable) << dim;
    EXPECT_EQ(small.heads_per_cta, plain.heads_per_cta) << dim;
    EXPECT_EQ(small.stages, plain.stages) << dim;
    EXPECT_LE(small.shared_bytes, plain.shared_bytes) << dim;
  }
}

// scores and attn_v (kernels/fast_primitives.cu) take the same geometries, staging one section.
TEST(CudaFastPath, ScoresAndAttnVServeTheSameGeometries) {
  using detail::cuda::plan_fast_primitive;
  auto shape = [](int dim, int group, bool per_channel, int block = 64) {
    detail::cuda::ReadShape s{};
    s.geometry.block_tokens = block;
    s.geometry.head_dim = dim;
    s.geometry.num_heads = 8;
    s.geometry.k_bits = 4;
    s.geometry.v_bits = 3;
    s.geometry.permuted = true;
    s.geometry.k_per_channel = per_channel;
    s.num_q_heads = 8 * group;
    s.group = group;
    s.heads_per_cta = std::min(group, detail::cuda::kMaxHeadsPerCta);
    s.subgroups = (group + s.heads_per_cta - 1) / s.heads_per_cta;
    return s;
  };
  for (format::Side side : {format::Side::k, format::Side::v}) {
    const detail::cuda::FastPlan llama = plan_fast_primitive(shape(128, 4, false), 227 * 1024, side);
    ASSERT_TRUE(llama.usable);
    EXPECT_EQ(llama.heads_per_cta, 4);
    EXPECT_EQ(llama.stages, 3);
    EXPECT_GE(llama.ctas_per_sm, 4);
    EXPECT_EQ(plan_fast_primitive(shape(128, 8, false), 227 * 1024, side).heads_per_cta, 8);
    EXPECT_EQ(plan_fast_primitive(shape(256, 8, false), 227 * 1024, side).subgroups, 2);
    EXPECT_TRUE(plan_fast_primitive(shape(64, 1, false, 256), 227 * 1024, side).usable);
    EXPECT_TRUE(plan_fast_primitive(shape(256, 4, false, 256), 227 * 1024, side).usable);
    EXPECT_TRUE(plan_fast_primitive(shape(96, 4, false), 227 * 1024, side).usable);
    EXPECT_FALSE(plan_fast_primitive(shape(80, 4, false), 227 * 1024, side).usable);
    EXPECT_TRUE(plan_fast_primitive(shape(128, 4, true), 227 * 1024, side).usable);  // per-channel K
  }
}

TEST(Cuda, NonFiniteQueriesAreReportedByTheNextCall) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  PackedKVCache<float> cache(c);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<float> k(100 * row, 0.5f), v(100 * row, 0.25f);
  DeviceArray<float> dk(k), dv(v);
  for (SeqId id : {1, 2}) {
    cache.add_sequence(id);
    cache.append(id, 0, dk.get(), dv.get(), 100);
  }
  const std::vector<SeqId> ids = {1, 2};
  const std::size_t q_count = 2 * static_cast<std::size_t>(c.num_q_heads) * c.head_dim;
  std::vector<float> q(q_count, 0.1f);
  q[static_cast<std::size_t>(c.num_q_heads) * c.head_dim + 3 * c.head_dim + 7] = NAN;  // entry 1, head 3
  DeviceArray<float> dq(q), dout(q_count);
  cache.attention(ids, 0, dq.get(), dout.get(), 0.1f);  // does not wait for the device
  test::expect_error([&] { cache.memory_stats(); }, "q value nan of batch entry 1 (query head 3, channel 7)");
  q[static_cast<std::size_t>(c.num_q_heads) * c.head_dim + 3 * c.head_dim + 7] = 0.1f;
  dq.upload(q);
  cache.attention(ids, 0, dq.get(), dout.get(), 0.1f);
  EXPECT_NO_THROW(cache.memory_stats());
}

// cuda_poll_errors: a kernel's value error waits for poll_device_error(); unrelated calls go on.
TEST(Cuda, PolledErrorsAreReportedOnlyByThePoll) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.cuda_poll_errors = true;
  PackedKVCache<float> cache(c);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<float> k(100 * row, 0.5f), v(100 * row, 0.25f);
  DeviceArray<float> good_k(k), good_v(v);
  v[70 * row + 5] = NAN;
  DeviceArray<float> bad_v(v);
  for (SeqId id : {1, 2}) cache.add_sequence(id);
  cache.append(1, 0, good_k.get(), good_v.get(), 100);
  EXPECT_EQ(cache.poll_device_error(), std::nullopt);
  cache.append(2, 0, good_k.get(), bad_v.get(), 100);  // the encoder finds the NaN after append returns
  const std::vector<SeqId> one = {1};
  std::vector<float> q(static_cast<std::size_t>(c.num_q_heads) * c.head_dim, 0.1f);
  DeviceArray<float> dq(q), dout(q.size());
  EXPECT_NO_THROW(cache.attention(one, 0, dq.get(), dout.get(), 0.1f));
  EXPECT_NO_THROW(cache.memory_stats());
  const std::optional<std::string> report = cache.poll_device_error();
  ASSERT_TRUE(report.has_value());
  EXPECT_NE(report->find("append to sequence 2 layer 0: V value nan at token 70"), std::string::npos) << *report;
  EXPECT_EQ(cache.poll_device_error(), std::nullopt);
  CacheConfig both = c;
  both.cuda_strict = true;
  test::expect_error([&] { PackedKVCache<float> refused(both); }, "cuda_strict and cuda_poll_errors cannot both be set");
}

// Per-layer bounds: each layer's blocks with its own code widths, the same bytes as the CPU's, and
// every read of each layer against the CPU. Layer 1 has the widest codes, so the staging slots and
// shared memory are sized by it while layers 0 and 2 stage smaller blocks; fast and first read
// paths both serve layers of different widths (head_dim 128 and 80).
TEST(Cuda, PerLayerBoundsMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  for (int dim : {128, 80}) {
    CacheConfig c = base_config();
    c.num_layers = 3;
    c.head_dim = dim;
    c.layer_k_rel = {0.3f, 0.02f, 0.1f};
    c.layer_v_rel = {0.05f, 0.5f, 1.0f / 255.0f};
    CachePair<float> pair(c);
    const std::vector<SeqId> ids = {4, 8};
    const int lengths[] = {64 * 3 + 9, 150};
    for (std::size_t i = 0; i < ids.size(); ++i) {
      pair.add(ids[i]);
      for (int l = 0; l < c.num_layers; ++l) pair.append(ids[i], l, lengths[i], 300 + 10 * i + l);
    }
    for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << "sequence " << id;
    for (int l = 0; l < c.num_layers; ++l) {
      compare_everything(pair, ids, l, 60 + l, "dim " + std::to_string(dim) + " layer " + std::to_string(l));
    }
    // Images move between backends layer by layer.
    const std::vector<std::uint8_t> image = pair.cpu.export_sequence(4);
    pair.gpu.import_sequence(12, image);
    EXPECT_EQ(pair.gpu.export_sequence(12), image);
  }
  // One write that seals blocks of layers of different widths together: an image whose tails are
  // longer than the target's window is imported, its tails compressed in the import's one write.
  CacheConfig c = base_config();
  c.num_layers = 3;
  c.layer_k_rel = {0.3f, 0.02f, 0.1f};
  c.layer_v_rel = {0.05f, 0.5f, 1.0f / 255.0f};
  c.residual_tokens = 100;
  CachePair<float> source(c);
  source.add(1);
  for (int l = 0; l < c.num_layers; ++l) source.append(1, l, 64 * 2 + 150, 700 + l);  // tails of 150 tokens
  c.residual_tokens = 0;
  CachePair<float> target(c);
  const std::vector<std::uint8_t> image = source.cpu.export_sequence(1);
  target.cpu.import_sequence(1, image);
  target.gpu.import_sequence(1, image);
  EXPECT_EQ(target.gpu.export_sequence(1), target.cpu.export_sequence(1));
  EXPECT_EQ(target.cpu.memory_stats().total.compressed_tokens, 3u * 256u);  // 128 adopted + 128 sealed, per layer
  for (int l = 0; l < c.num_layers; ++l) compare_everything(target, {1}, l, 80 + l, "imported layer " + std::to_string(l));
}

// append_batch on the GPU against per-sequence appends on the CPU: the same bytes, the same reads.
// A ragged prefill per layer, then decode steps of one token per sequence.
void expect_batched_appends_match_cpu(const std::vector<int>& prefill, int layers, int decode_steps) {
  CacheConfig c = base_config();
  c.residual_tokens = 16;
  CachePair<float> pair(c);
  const std::vector<SeqId> ids = {3, 8, 1, 12};
  for (SeqId id : ids) pair.add(id);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::uint64_t seed = 4000;
  auto step = [&](int layer, const std::vector<int>& counts) {
    const int total = std::accumulate(counts.begin(), counts.end(), 0);
    const auto k = random_values(static_cast<std::size_t>(total) * row, seed++, 1.2);
    const auto v = random_values(static_cast<std::size_t>(total) * row, seed++, 0.7);
    std::size_t offset = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      pair.cpu.append(ids[i], layer, k.data() + offset * row, v.data() + offset * row, counts[i]);
      offset += static_cast<std::size_t>(counts[i]);
    }
    DeviceArray<float> dk(k), dv(v);
    pair.gpu.append_batch(ids, layer, dk.get(), dv.get(), counts);
  };
  for (int layer = 0; layer < layers; ++layer) {
    step(layer, prefill);
    for (int t = 0; t < decode_steps; ++t) step(layer, {1, 1, 1, 1});
  }
  for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << "sequence " << id;
  for (int layer = 0; layer < layers; ++layer) compare_everything(pair, ids, layer, 11, "batched appends");
}

TEST(Cuda, BatchedAppendsMatchPerSequenceCallsOnTheCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  // Ragged prefill chunks (blocks of several sequences in one launch), then decode steps crossing
  // block boundaries, in two layers.
  expect_batched_appends_match_cpu({70, 1, 130, 64}, 2, 70);
}

// The same in one layer and two steps, small enough for ThreadSanitizer (scripts/check_sanitizers.sh):
// 16 residual tokens, 64-token blocks, so the first step seals a block of sequences 3 and 1 at once.
TEST(Cuda, ShortBatchedStepMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  expect_batched_appends_match_cpu({79, 1, 143, 64}, 1, 2);
}

// Heads of very different sizes, in a batch whose sequences seal different numbers of blocks at
// different steps: one encoder launch stages the blocks of every sequence, one CTA per (sequence,
// block, head), and the copy to the pages compacts them. The images must be the CPU's bytes.
TEST(Cuda, RaggedBatchOfUnevenHeadsMatchesCpuByteForByte) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.num_layers = 1;
  c.num_kv_heads = 7;
  c.num_q_heads = 14;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 16;
  CachePair<fp16_t> pair(c);
  const std::vector<SeqId> ids = {3, 8, 1, 12, 5};
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  // One token stream per sequence, so that a head stays constant, smooth or noisy across steps.
  std::vector<std::vector<float>> stream_k, stream_v;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    pair.add(ids[i]);
    stream_k.push_back(uneven_heads_values(300, c.num_kv_heads, c.head_dim, 7000 + 2 * i, 0));
    stream_v.push_back(uneven_heads_values(300, c.num_kv_heads, c.head_dim, 7001 + 2 * i, 1));
  }
  std::vector<std::size_t> used(ids.size(), 0);
  auto step = [&](const std::vector<int>& counts) {
    std::vector<float> k, v;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto from = static_cast<std::ptrdiff_t>(used[i] * row), to = from + static_cast<std::ptrdiff_t>(counts[i] * row);
      k.insert(k.end(), stream_k[i].begin() + from, stream_k[i].begin() + to);
      v.insert(v.end(), stream_v[i].begin() + from, stream_v[i].begin() + to);
      used[i] += static_cast<std::size_t>(counts[i]);
    }
    const auto hk = convert<fp16_t>(k), hv = convert<fp16_t>(v);
    std::size_t offset = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      pair.cpu.append(ids[i], 0, hk.data() + offset * row, hv.data() + offset * row, counts[i]);
      offset += static_cast<std::size_t>(counts[i]);
    }
    DeviceArray<fp16_t> dk(hk), dv(hv);
    pair.gpu.append_batch(ids, 0, dk.get(), dv.get(), counts);
  };
  step({1, 32 * 3 + 5, 48, 200, 17});  // 0, 2, 1, 5 and 0 blocks sealed
  for (int t = 0; t < 40; ++t) step({1, 1, 1, 1, 1});
  for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << "sequence " << id;
  compare_everything(pair, ids, 0, 21, "ragged batch of uneven heads");
}

// truncate on the GPU against the CPU: a cut in the tail, one into a block (its kept tokens
// decoded on the host and re-appended), one to zero, each followed by appends that seal blocks.
TEST(Cuda, TruncateMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.residual_tokens = 8;
  CachePair<float> pair(c);
  const std::vector<SeqId> ids = {2, 7};
  for (SeqId id : ids) pair.add(id);
  std::uint64_t seed = 6100;
  auto grow = [&](int n) {
    for (SeqId id : ids) {
      for (int l = 0; l < c.num_layers; ++l) pair.append(id, l, n, seed++);
    }
  };
  auto cut = [&](SeqId id, std::int64_t n) {
    pair.cpu.truncate(id, n);
    pair.gpu.truncate(id, n);
  };
  grow(150);      // blocks [0, 128), tail [128, 150)
  cut(2, 140);    // in the tail
  cut(7, 100);    // inside block 1: tokens 64..99 return to the tail
  grow(40);
  for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << "sequence " << id;
  for (int layer = 0; layer < c.num_layers; ++layer) compare_everything(pair, ids, layer, 21, "after truncate");
  cut(2, 0);
  grow(70);
  for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << "sequence " << id;
  compare_everything(pair, ids, 0, 22, "after truncate to zero");
  EXPECT_EQ(pair.gpu.memory_stats().total.compressed_tokens, pair.cpu.memory_stats().total.compressed_tokens);
}

// fork on the GPU against the CPU: shared blocks (the child's table points into the parent's
// pages), divergent appends that seal blocks in both, memory counted once, removal of the parent.
TEST(Cuda, ForkMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.residual_tokens = 8;
  CachePair<float> pair(c);
  pair.add(1);
  std::uint64_t seed = 7100;
  auto grow = [&](SeqId id, int n) {
    for (int l = 0; l < c.num_layers; ++l) pair.append(id, l, n, seed++);
  };
  grow(1, 150);  // blocks [0, 128), tail [128, 150)
  const std::size_t pages_before = pair.gpu.memory_stats().pool.slot_bytes;
  pair.cpu.fork(1, 2);
  pair.gpu.fork(1, 2);
  pair.cpu.fork(1, 3);
  pair.gpu.fork(1, 3);
  // The children point into the parent's pages and take none of their own until they seal a block.
  EXPECT_EQ(pair.gpu.memory_stats().pool.slot_bytes, pages_before);
  grow(1, 70);
  grow(2, 1);
  grow(2, 100);
  const std::vector<SeqId> ids = {1, 2, 3};
  for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << "sequence " << id;
  for (int layer = 0; layer < c.num_layers; ++layer) compare_everything(pair, ids, layer, 31, "after fork");
  const MemoryStats cpu = pair.cpu.memory_stats(), gpu = pair.gpu.memory_stats();
  EXPECT_GT(gpu.shared_block_bytes, 0u);
  EXPECT_EQ(gpu.shared_block_bytes, cpu.shared_block_bytes);
  EXPECT_EQ(gpu.pool.live_bytes, cpu.pool.live_bytes);
  EXPECT_EQ(gpu.total.payload, cpu.total.payload);
  EXPECT_EQ(gpu.total.headers, cpu.total.headers);
  pair.cpu.remove_sequence(1);
  pair.gpu.remove_sequence(1);
  grow(3, 90);
  for (SeqId id : {SeqId{2}, SeqId{3}}) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << id;
  compare_everything(pair, {2, 3}, 1, 32, "after the parent's removal");
  EXPECT_EQ(pair.gpu.memory_stats().shared_block_bytes, pair.cpu.memory_stats().shared_block_bytes);
  pair.gpu.release_unused_memory();
  EXPECT_EQ(pair.gpu.export_sequence(2), pair.cpu.export_sequence(2));
}

// Admission on the GPU: the bound covers what every step really adds to the device memory.
TEST(Cuda, WorstCaseBytesBoundEveryStep) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.residual_tokens = 8;
  PackedKVCache<float> cache(c);
  const std::vector<SeqId> ids = {1, 2, 3};
  for (SeqId id : ids) cache.add_sequence(id);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::uint64_t seed = 8100;
  int zero_bounds = 0;
  for (int s = 0; s < 40; ++s) {
    const std::vector<int> counts = s < 2 ? std::vector<int>{70, 3, 130} : std::vector<int>{1, 1, 1};
    const std::size_t bound = cache.worst_case_bytes(ids, counts);
    const std::size_t before = cache.memory_stats().resident_bytes;
    const int total = std::accumulate(counts.begin(), counts.end(), 0);
    DeviceArray<float> dk(random_values(static_cast<std::size_t>(total) * row, seed++)),
        dv(random_values(static_cast<std::size_t>(total) * row, seed++));
    for (int l = 0; l < c.num_layers; ++l) cache.append_batch(ids, l, dk.get(), dv.get(), counts);
    const std::size_t after = cache.memory_stats().resident_bytes;
    ASSERT_LE(after > before ? after - before : 0, bound) << "step " << s;
    zero_bounds += bound == 0;
  }
  EXPECT_GT(zero_bounds, 10);
  const std::vector<int> prompts = {200};
  const std::size_t bound = cache.worst_case_bytes({}, {}, prompts);
  const std::size_t before = cache.memory_stats().resident_bytes;
  cache.add_sequence(9);
  DeviceArray<float> dk(random_values(200 * row, seed++));
  for (int l = 0; l < c.num_layers; ++l) cache.append(9, l, dk.get(), dk.get(), 200);
  EXPECT_LE(cache.memory_stats().resident_bytes - before, bound);
}

TEST(Cuda, StrictBatchedAppendRefusesABadLastEntryWholesale) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.cuda_strict = true;
  PackedKVCache<float> cache(c);
  const std::vector<SeqId> ids = {1, 2, 3};
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<float> k = random_values(200 * row, 1), v = random_values(200 * row, 2);
  DeviceArray<float> dk(k), dv(v);
  for (SeqId id : ids) {
    cache.add_sequence(id);
    cache.append(id, 0, dk.get(), dv.get(), 50);
  }
  std::vector<std::vector<std::uint8_t>> before;
  for (SeqId id : ids) before.push_back(cache.export_sequence(id));
  const std::vector<int> counts = {64, 70, 66};
  v[(64 + 70 + 60) * row + 9] = INFINITY;
  dv.upload(v);
  test::expect_error([&] { cache.append_batch(ids, 0, dk.get(), dv.get(), counts); }, "sequence 3 layer 0");
  for (std::size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(cache.export_sequence(ids[i]), before[i]);
}

// ---- attention_causal: several queries per sequence, causal among themselves -------------------

template <class T>
void compare_causal(CachePair<T>& pair, const std::vector<SeqId>& ids, const std::vector<int>& counts, int layer,
                    std::uint64_t seed, const std::string& label) {
  const CacheConfig& c = pair.cpu.config();
  const int queries = std::accumulate(counts.begin(), counts.end(), 0);
  const std::size_t q_count = static_cast<std::size_t>(queries) * c.num_q_heads * c.head_dim;
  const auto q = convert<T>(random_values(q_count, seed));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<T> cpu_out(q_count);
  std::vector<float> cpu_lse(static_cast<std::size_t>(queries) * c.num_q_heads);
  pair.cpu.attention_causal(ids, counts, layer, q.data(), cpu_out.data(), scale, cpu_lse.data());
  DeviceArray<T> dq(q), dout(q_count);
  DeviceArray<float> dlse(cpu_lse.size());
  dout.poison();
  dlse.poison();
  pair.gpu.attention_causal(ids, counts, layer, dq.get(), dout.get(), scale, dlse.get());
  expect_close(dout.download(), cpu_out, output_rtol<T>(), 2e-5, label + " attention_causal");
  expect_close(dlse.download(), cpu_lse, 1e-5, 1e-6, label + " lse");
}

// The fast path (head_dim 64/96/128/256, K per token or per channel: up to 8 or 4 rows per CTA)
// and the first read path (other head dims); masked keys in packed blocks (residual 0) and in the
// tail.
TYPED_TEST(CudaTyped, CausalAttentionMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  // (head_dim, query heads per KV head, residual, K mode)
  for (auto [dim, group, residual, mode] :
       {std::tuple{128, 4, 0, QuantMode::per_token}, std::tuple{64, 8, 24, QuantMode::per_token},
        std::tuple{256, 2, 0, QuantMode::per_token}, std::tuple{40, 4, 0, QuantMode::per_token},
        std::tuple{96, 6, 8, QuantMode::per_token}, std::tuple{128, 4, 16, QuantMode::per_channel},
        std::tuple{40, 4, 8, QuantMode::per_channel}}) {
    CacheConfig c = base_config();
    c.head_dim = dim;
    c.num_q_heads = c.num_kv_heads * group;
    c.residual_tokens = residual;
    c.k_mode = mode;
    CachePair<TypeParam> pair(c);
    const std::vector<SeqId> ids = {1, 2, 3, 4};
    const std::vector<int> lengths = {200, 70, 129, 5}, counts = {9, 1, 70, 5};
    for (std::size_t i = 0; i < ids.size(); ++i) {
      pair.add(ids[i]);
      pair.append(ids[i], 1, lengths[i], 300 + i);
    }
    compare_causal(pair, ids, counts, 1, 77, "head_dim " + std::to_string(dim) + " group " + std::to_string(group));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// The Hadamard rotation: the device rotates exactly as the CPU (the blocks, hence the images, are
// byte-identical), and every read comes back out of the rotated space the same way.
TYPED_TEST(CudaTyped, RotatedCachesMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  // (rotate_k, rotate_v, head_dim): 96 rotates chunks of 32
  for (auto [rk, rv, dim] : {std::tuple{true, false, 128}, std::tuple{false, true, 64}, std::tuple{true, true, 96}}) {
    CacheConfig c = base_config();
    c.rotate_k = rk;
    c.rotate_v = rv;
    c.head_dim = dim;
    c.residual_tokens = 8;
    CachePair<TypeParam> pair(c);
    const std::vector<SeqId> ids = {1, 2};
    pair.add(1);
    pair.add(2);
    pair.append(1, 0, 150, 61);
    pair.append(2, 0, 30, 62);
    pair.append(2, 0, 45, 63);
    const std::string label = "rotate_k " + std::to_string(rk) + " rotate_v " + std::to_string(rv) + " head_dim " +
                              std::to_string(dim);
    compare_everything(pair, ids, 0, 64, label);
    compare_causal(pair, ids, {5, 2}, 0, 65, label);
    for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << label;
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// A long sequence: the queries' rows are split across many CTAs and merged with their lse.
TEST(Cuda, CausalAttentionOverManySplitsMatchesCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  CachePair<fp16_t> pair(base_config());
  pair.add(7);
  pair.append(7, 0, 3000, 41);
  compare_causal(pair, {7}, {12}, 0, 43, "3000 tokens");
}

#if defined(PACKKV_CUDA_EMULATION)
// A call given a stream of its own joins it to the cache's stream both ways: the cache's stream
// waits for what the caller queued before the call, the caller's waits for the call's kernels.
TEST(CudaEmulated, PerCallStreamsAreJoinedToTheCachesStream) {
  CacheConfig c = base_config();
  c.device = Device::cuda;
  PackedKVCache<float> cache(c);
  cudaStream_t mine = nullptr;
  cuda_ok(cudaStreamCreate(&mine), "cudaStreamCreate");
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  DeviceArray<float> dk(random_values(100 * row, 3)), dq(random_values(static_cast<std::size_t>(c.num_q_heads) * c.head_dim, 4));
  DeviceArray<float> dout(static_cast<std::size_t>(c.num_q_heads) * c.head_dim);
  cache.add_sequence(1);
  const auto& waits = packkv_emulator::stream_waits();

  // Without a stream of its own a call makes no join.
  std::size_t seen = waits.size();
  cache.append(1, 0, dk.get(), dk.get(), 100);
  EXPECT_EQ(waits.size(), seen);

  // Each call on `mine`: first the cache's stream (null) waits for `mine` as it stood before the
  // call's kernels, and last `mine` waits for the cache's stream after all of them.
  auto check_joined = [&](const char* what, auto&& call) {
    const std::size_t first = waits.size();
    const std::uint64_t launches_before = packkv_emulator::launch_count();
    call();
    const std::uint64_t launches_after = packkv_emulator::launch_count();
    EXPECT_GT(launches_after, launches_before) << what;
    ASSERT_GE(waits.size(), first + 2) << what;
    const auto& in = waits[first];
    EXPECT_EQ(in.waiter, nullptr) << what;
    EXPECT_EQ(in.recorded_on, mine) << what;
    EXPECT_EQ(in.launches_before, launches_before) << what;
    const auto& out = waits.back();
    EXPECT_EQ(out.waiter, mine) << what;
    EXPECT_EQ(out.recorded_on, nullptr) << what;
    EXPECT_EQ(out.launches_before, launches_after) << what;
  };
  const SeqId id = 1;
  const int one = 1;
  check_joined("append", [&] { cache.append(1, 0, dk.get(), dk.get(), 30, mine); });
  check_joined("append_batch",
               [&] { cache.append_batch(std::span(&id, 1), 1, dk.get(), dk.get(), std::span(&one, 1), mine); });
  check_joined("attention", [&] { cache.attention(std::span(&id, 1), 0, dq.get(), dout.get(), 0.1f, mine); });
  check_joined("attention_causal", [&] {
    cache.attention_causal(std::span(&id, 1), std::span(&one, 1), 0, dq.get(), dout.get(), 0.1f, nullptr, mine);
  });
  DeviceArray<float> dscores(static_cast<std::size_t>(c.num_q_heads) * 130);
  check_joined("scores", [&] { cache.scores(1, 0, dq.get(), dscores.get(), mine); });
  check_joined("attn_v", [&] { cache.attn_v(1, 0, dscores.get(), dout.get(), mine); });
  cuda_ok(cudaStreamDestroy(mine), "cudaStreamDestroy");
}
#endif

#if defined(PACKKV_CUDA_EMULATION)
// What a batched step launches does not grow with the batch (the emulator counts launches).
TEST(CudaEmulated, BatchedAppendLaunchesDoNotGrowWithTheBatch) {
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.num_layers = 1;
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  auto launches = [&](int batch, int tokens) {
    PackedKVCache<float> cache(c);
    std::vector<SeqId> ids;
    std::vector<float> k = random_values(static_cast<std::size_t>(batch) * 64 * row, 5);
    DeviceArray<float> dk(k);
    for (int i = 0; i < batch; ++i) {
      ids.push_back(static_cast<SeqId>(i));
      cache.add_sequence(static_cast<SeqId>(i));
      cache.append(static_cast<SeqId>(i), 0, dk.get(), dk.get(), 64 - tokens);  // the next step fills a block
    }
    const std::vector<int> counts(static_cast<std::size_t>(batch), tokens);
    const std::uint64_t start = packkv_emulator::launch_count();
    cache.append_batch(ids, 0, dk.get(), dk.get(), counts);
    return packkv_emulator::launch_count() - start;
  };
  // A step that seals one block in every sequence: at most the new page pointers, encode, place,
  // copy and the tail write, whatever the batch size (the per-sequence calls make 4 or 5 each).
  const std::uint64_t small = launches(4, 1), large = launches(32, 1);
  EXPECT_LE(small, 5u);
  EXPECT_EQ(large, small);
  EXPECT_LE(launches(32, 9), 5u);  // prefill chunks
}
#endif

#if defined(PACKKV_CUDA_EMULATION)
// The encoder runs one CTA per (block, KV head), in encode_blocks, in a single append and in a
// batch (the emulator records every launch's kernel and grid).
TEST(CudaEmulated, EncoderLaunchesOneCtaPerBlockAndHead) {
  using packkv_emulator::LaunchRecord;
  auto launched = [](std::size_t first, const std::string& kernel) {
    std::vector<LaunchRecord> found;
    const std::vector<LaunchRecord>& all = packkv_emulator::launches();
    for (std::size_t i = first; i < all.size(); ++i) {
      if (std::string(all[i].kernel).rfind(kernel, 0) == 0) found.push_back(all[i]);
    }
    return found;
  };
  const int heads = 5;
  {
    const CacheConfig c = encoder_config({64, 32, heads, 0.1f, 0.2f, RepackMethod::median, QuantMode::per_token});
    const std::size_t values = 3 * 32 * static_cast<std::size_t>(heads) * 64;
    DeviceArray<float> dk(random_values(values, 1)), dv(random_values(values, 2));
    const CodecParams params = make_codec_params(c);
    DeviceArray<std::uint8_t> out(3 * params.geometry.max_block_bytes());
    const std::size_t first = packkv_emulator::launches().size();
    cuda::encode_blocks(params, dk.get(), dv.get(), 3, out.get(), params.geometry.max_block_bytes(), nullptr);
    const auto encode = launched(first, "encode_kernel<"), compact = launched(first, "compact_kernel");
    ASSERT_EQ(encode.size(), 1u);
    EXPECT_EQ(encode[0].grid.x, 3u * heads);
    EXPECT_EQ(encode[0].grid.y, 1u);
    EXPECT_EQ(encode[0].block.x, 256u);
    ASSERT_EQ(compact.size(), 1u);
    EXPECT_EQ(compact[0].grid.x, 3u);
  }
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.num_layers = 1;
  c.num_kv_heads = heads;
  c.num_q_heads = heads;
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  PackedKVCache<float> cache(c);
  DeviceArray<float> dk(random_values(400 * row, 3));
  const std::vector<SeqId> ids = {1, 2, 3};
  for (SeqId id : ids) cache.add_sequence(id);
  std::size_t first = packkv_emulator::launches().size();
  cache.append(1, 0, dk.get(), dk.get(), 64 * 3 + 5);  // one write: 3 blocks
  auto encode = launched(first, "encode_kernel<");
  ASSERT_EQ(encode.size(), 1u);
  EXPECT_EQ(encode[0].grid.x, 3u * heads);
  EXPECT_EQ(launched(first, "copy_placed_kernel").at(0).grid.x, 3u);
  // A batch whose writes seal 1, 0 and 4 blocks: a grid of (4 blocks x heads, the 2 writes that seal).
  const std::vector<int> counts = {59, 30, 64 * 4};
  first = packkv_emulator::launches().size();
  cache.append_batch(ids, 0, dk.get(), dk.get(), counts);
  encode = launched(first, "encode_batch_kernel<");
  ASSERT_EQ(encode.size(), 1u);
  EXPECT_EQ(encode[0].grid.x, 4u * heads);
  EXPECT_EQ(encode[0].grid.y, 2u);
  EXPECT_EQ(launched(first, "copy_placed_batch_kernel").at(0).grid.x, 4u);
}
#endif

// scores and attn_v on the fast read path, batched: every fast head_dim, block sizes 16 to 256,
// code widths 1 to 8, GQA 1 to 8, ragged batches (tail-only, one-token, empty and block-aligned
// sequences, an id twice, the order of ids not that of their creation), median-permuted blocks:
// a kernel that wrote scores or read weights in stored order instead of through the permutation
// fails here.
TYPED_TEST(CudaTyped, FastScoresAndAttnVBatchesMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  std::uint64_t seed = 4000;
  int i = 0;
  for (int dim : {64, 96, 128, 256}) {
    for (int block : {16, 32, 64, 128, 256}) {
      const int group = std::array{1, 2, 4, 8, 3}[static_cast<std::size_t>(i % 5)];
      const int bits = 1 + (i * 3) % 8;
      ++i;
      CacheConfig c = base_config();
      c.num_layers = 1;
      c.head_dim = dim;
      c.block_tokens = block;
      c.num_kv_heads = 2;
      c.num_q_heads = 2 * group;
      c.k_rel = 1.0f / static_cast<float>((1 << bits) - 1);
      c.v_rel = 1.0f / static_cast<float>((1 << (9 - bits)) - 1);
      ASSERT_EQ(c.repack, RepackMethod::median);
      CachePair<TypeParam> pair(c);
      for (SeqId id : {1, 2, 3, 4, 5}) pair.add(id);  // 5 has no tokens: attn_v gives zeros
      pair.append(1, 0, 2 * block + 5, seed++);
      pair.append(2, 0, block - 1, seed++);
      pair.append(3, 0, 1, seed++);
      pair.append(4, 0, 3 * block, seed++);
      compare_batched_primitives(pair, {3, 1, 5, 4, 2, 1}, 0, seed++,
                                 "dim " + std::to_string(dim) + " block " + std::to_string(block) + " group " +
                                     std::to_string(group) + " bits " + std::to_string(bits));
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// head_dim 40 (not a multiple of 32: partial warps everywhere) reads everything on the first path;
// at 96 (8 query heads per KV head: two n-tiles) and 128 every reader takes the fast path, whose
// K.q rebuilds q's fragments per block from the channel steps (channel_k_fragments).
TEST(Cuda, PerChannelKAndNoRepackMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  for (auto [dim, group] : {std::pair{40, 4}, std::pair{96, 8}, std::pair{128, 4}}) {
    for (RepackMethod repack : {RepackMethod::none, RepackMethod::median}) {
      CacheConfig c = base_config();
      c.k_mode = QuantMode::per_channel;
      c.repack = repack;
      c.head_dim = dim;
      c.num_q_heads = c.num_kv_heads * group;
      CachePair<bf16_t> pair(c);
      pair.add(5);
      pair.add(6);
      pair.append(5, 0, 64 * 3 + 9, 5);
      pair.append(6, 0, 64 + 1, 7);
      compare_everything(pair, {5, 6}, 0, 6,
                         "per-channel K, dim " + std::to_string(dim) + ", repack " + to_string(repack));
    }
  }
}

TEST(Cuda, LongSequenceUsesManySplits) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.num_layers = 1;
  c.num_kv_heads = 8;
  c.num_q_heads = 32;
  CachePair<fp16_t> pair(c);
  pair.add(1);
#if defined(PACKKV_CUDA_EMULATION)
  const int context = 2048 + 33;  // the emulator runs one CUDA thread at a time
#else
  const int context = 32768 + 33;
#endif
  pair.append(1, 0, context, 4);
  compare_everything(pair, {1}, 0, 8, "long context");
}

TEST(Cuda, BatchesLargerThanOneLaunch) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.num_layers = 1;
  CachePair<float> pair(c);
  std::vector<SeqId> ids;
  for (SeqId id = 0; id < 70; ++id) {
    ids.push_back(id);
    pair.add(id);
    pair.append(id, 0, static_cast<int>(1 + 37 * id % 300), id);
  }
  compare_everything(pair, ids, 0, 3, "batch of 70");
}

TEST(Cuda, RemovedSequencesFreeSlotsForReuse) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.num_layers = 1;
  CachePair<fp16_t> pair(c);
  pair.add(1);
  pair.append(1, 0, 64 * 40, 1);
  const std::size_t reserved = pair.gpu.memory_stats().pool.reserved_bytes;
  pair.cpu.remove_sequence(1);
  pair.gpu.remove_sequence(1);
  pair.add(2);
  pair.append(2, 0, 64 * 40, 2);
  EXPECT_EQ(pair.gpu.memory_stats().pool.reserved_bytes, reserved);
  compare_everything(pair, {2}, 0, 3, "after reuse");
}

TEST(Cuda, BlocksAreStoredTightlyInPages) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.num_layers = 1;
  CachePair<fp16_t> pair(c);
  pair.add(1);
  pair.append(1, 0, 64 * 100 + 3, 1);                                       // a prefill of many blocks
  for (int step = 0; step < 130; ++step) pair.append(1, 0, 1, 100 + step);  // then decode steps
  const MemoryStats gs = pair.gpu.memory_stats(), cs = pair.cpu.memory_stats();
  EXPECT_EQ(gs.pool.live_bytes, cs.pool.live_bytes);
  // Pages in use hold the encoded bytes, at most one worst-case block of slack per page, and one
  // page reserved ahead.
  const format::BlockGeometry g = make_codec_params(c).geometry;
  const std::size_t pages = gs.pool.slot_bytes / gs.pool.page_bytes;
  EXPECT_LE(gs.pool.slot_bytes, gs.pool.live_bytes + pages * g.max_block_bytes() + gs.pool.page_bytes)
      << "pages " << pages << " of " << gs.pool.page_bytes;
  compare_everything(pair, {1}, 0, 7, "tight pages");
}

TEST(Cuda, InvalidValuesAreReportedByTheNextCall) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<float> k(10 * row, 0.5f), v(10 * row, 0.25f);
  v[3 * row + 5] = NAN;
  DeviceArray<float> dk(k), dv(v);
  cache.append(1, 0, dk.get(), dv.get(), 10);  // does not wait for the device
  test::expect_error([&] { cache.memory_stats(); }, "V value nan at token 3");
  EXPECT_NO_THROW(cache.memory_stats());  // reported once
  // Reporting is re-armed: a later bad value is reported too, with its own position.
  cache.add_sequence(2);
  v[3 * row + 5] = 0.25f;
  k[7 * row] = INFINITY;
  dk.upload(k);
  dv.upload(v);
  cache.append(2, 1, dk.get(), dv.get(), 10);
  test::expect_error([&] { cache.memory_stats(); }, "sequence 2 layer 1: K value inf at token 7, head 0, channel 0");
}

TEST(Cuda, EncodeBlocksRejectsInvalidValues) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  const CodecParams params = make_codec_params(c);
  const std::size_t n = static_cast<std::size_t>(c.block_tokens) * c.num_kv_heads * c.head_dim;
  std::vector<float> k(n, 1.0f), v(n, 2.0f);
  v[n - 1] = -1e5f;
  DeviceArray<float> dk(k), dv(v);
  DeviceArray<std::uint8_t> out(params.geometry.max_block_bytes());
  test::expect_error([&] { cuda::encode_blocks(params, dk.get(), dv.get(), 1, out.get(), out_size(params), nullptr); },
                     "encode_blocks: V value -100000 at token 63, head 1, channel 127");
}

TEST(Cuda, StrictModeRejectsBeforeChanging) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.cuda_strict = true;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  const test::Snapshot before = test::snapshot(cache);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<float> k(100 * row, 0.5f), v(100 * row, 0.25f);
  k[70 * row + 130] = 1e6f;
  DeviceArray<float> dk(k), dv(v);
  test::expect_error([&] { cache.append(1, 0, dk.get(), dv.get(), 100); },
                     "K value 1000000 at token 70, head 1, channel 2 is NaN");
  EXPECT_EQ(test::snapshot(cache), before);
}

TEST(Cuda, GreedyRepackIsRefusedClearly) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.device = Device::cuda;
  c.repack = RepackMethod::greedy;
  test::expect_error([&] { PackedKVCache<float> cache(c); }, "greedy");
}

// Compact parameters (format version 3): the device encoder writes the CPU's bytes (per-token
// and per-channel K, widths with and without a spare code, 8-bit codes), every reader agrees
// with the CPU (the fast read path at head_dim 64, 96, 128 and 256, block sizes 32 to 128, K per
// token and per channel at 64; the first path at 80, K per token and per channel), images cross
// backends, and values beyond +-16384 are refused by the kernels and by strict mode.
TEST(Cuda, CompactParamsMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  struct Case {
    int dim;
    float k_rel, v_rel;
    QuantMode k_mode;
    int block = 64;
  };
  for (const Case& cs : {Case{128, 0.1f, 0.2f, QuantMode::per_token}, Case{80, 1.0f / 15, 1.0f / 7, QuantMode::per_token},
                         Case{96, 0.2f, 0.1f, QuantMode::per_token},
                         Case{64, 1.0f / 255, 0.34f, QuantMode::per_channel},
                         Case{80, 0.1f, 0.2f, QuantMode::per_channel},
                         Case{64, 0.34f, 1.0f / 31, QuantMode::per_token, 32},
                         Case{256, 1.0f / 7, 0.5f, QuantMode::per_token, 128}}) {
    CacheConfig c = base_config();
    c.head_dim = cs.dim;
    c.block_tokens = cs.block;
    c.k_rel = cs.k_rel;
    c.v_rel = cs.v_rel;
    c.k_mode = cs.k_mode;
    c.compact_params = true;
    c.residual_tokens = 8;
    c.sink_tokens = 2;
    CachePair<float> pair(c);
    const std::string label = "dim " + std::to_string(cs.dim) + " block " + std::to_string(cs.block);
    for (SeqId id : {4, 8}) pair.add(id);
    for (int l = 0; l < c.num_layers; ++l) {
      pair.append(4, l, cs.block * 2 + 11, 600 + l);
      pair.append(8, l, cs.block * 3 + 20, 620 + l);
    }
    const std::vector<SeqId> ids = {4, 8};
    for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << label << " " << id;
    for (int l = 0; l < c.num_layers; ++l) {
      compare_everything(pair, ids, l, 640 + l, label + " layer " + std::to_string(l));
      compare_causal(pair, ids, {3, 70}, l, 650 + l, label + " causal layer " + std::to_string(l));
    }
    EXPECT_EQ(pair.gpu.memory_stats().total.params, pair.cpu.memory_stats().total.params) << label;
    const std::vector<std::uint8_t> image = pair.cpu.export_sequence(8);
    pair.gpu.import_sequence(12, image);
    EXPECT_EQ(pair.gpu.export_sequence(12), image) << label;
  }
}

TEST(Cuda, CompactParamsRefuseValuesBeyondTheirLimit) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = base_config();
  c.compact_params = true;
  const CodecParams params = make_codec_params(c);
  const std::size_t n = static_cast<std::size_t>(c.block_tokens) * c.num_kv_heads * c.head_dim;
  std::vector<float> k(n, 1.0f), v(n, 2.0f);
  v[n - 1] = -20000.0f;  // storable with fp16 parameters, not with compact ones
  DeviceArray<float> dk(k), dv(v);
  DeviceArray<std::uint8_t> out(params.geometry.max_block_bytes());
  test::expect_error([&] { cuda::encode_blocks(params, dk.get(), dv.get(), 1, out.get(), out_size(params), nullptr); },
                     "V value -20000 at token 63, head 1, channel 127 is NaN, Inf or beyond +-16384");
  c.device = Device::cuda;
  c.cuda_strict = true;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  const test::Snapshot before = test::snapshot(cache);
  DeviceArray<float> dk1(std::vector<float>(k.begin(), k.begin() + 4 * 256)),
      dv1(std::vector<float>(v.end() - 4 * 256, v.end()));
  test::expect_error([&] { cache.append(1, 0, dk1.get(), dv1.get(), 4); }, "beyond +-16384");
  EXPECT_EQ(test::snapshot(cache), before);
}

// Exact sinks (CacheConfig::sink_tokens) on the device against the CPU, whose readers
// tests/test_sinks.cpp checks against float64: the fast path (head_dim 128) and the first path
// (80), every reader, causal attention, fork, truncation and images. Coarse bounds make the first
// block's decoded copies of the sinks differ clearly from the exact rows.
TEST(Cuda, SinksMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  for (int dim : {128, 80}) {
    CacheConfig c = base_config();
    c.head_dim = dim;
    c.k_rel = 0.34f;
    c.v_rel = 0.34f;
    c.sink_tokens = 5;
    c.residual_tokens = 8;
    CachePair<float> pair(c);
    const std::string label = "dim " + std::to_string(dim);
    // Sequence 4: its first block sealed from the ring and new tokens together; 8: in one append
    // from new tokens alone; 9: no block yet (the tail holds the sinks).
    for (SeqId id : {4, 8, 9}) pair.add(id);
    for (int l = 0; l < c.num_layers; ++l) {
      pair.append(4, l, 30, 500 + l);
      pair.append(4, l, 64 * 2 + 11, 510 + l);
      pair.append(8, l, 64 * 3 + 20, 520 + l);
      pair.append(9, l, 50, 530 + l);
    }
    const std::vector<SeqId> ids = {4, 8, 9};
    for (SeqId id : ids) EXPECT_EQ(pair.gpu.export_sequence(id), pair.cpu.export_sequence(id)) << label << " " << id;
    for (int l = 0; l < c.num_layers; ++l) {
      compare_everything(pair, ids, l, 90 + l, label + " layer " + std::to_string(l));
      compare_causal(pair, ids, {3, 70, 2}, l, 95 + l, label + " causal layer " + std::to_string(l));
    }
    EXPECT_EQ(pair.gpu.memory_stats().total.sinks, pair.cpu.memory_stats().total.sinks) << label;
    EXPECT_GT(pair.gpu.memory_stats().total.sinks, 0u) << label;
    // A fork copies the sink rows; truncations into block 1 and into block 0 keep them.
    pair.cpu.fork(4, 5);
    pair.gpu.fork(4, 5);
    compare_everything(pair, {5}, 1, 97, label + " fork");
    for (const std::int64_t cut : {70, 30}) {
      pair.cpu.truncate(5, cut);
      pair.gpu.truncate(5, cut);
      EXPECT_EQ(pair.gpu.export_sequence(5), pair.cpu.export_sequence(5)) << label << " cut " << cut;
      compare_everything(pair, {5, 8}, 0, 98, label + " cut " + std::to_string(cut));
    }
    // Images carry them across backends.
    const std::vector<std::uint8_t> image = pair.cpu.export_sequence(8);
    pair.gpu.import_sequence(12, image);
    EXPECT_EQ(pair.gpu.export_sequence(12), image) << label;
  }
}

// ---- sequence images ----------------------------------------------------------------------------

/// Adds a sequence to a CPU cache and fills its layers in turn with blocks + tail, a tail only,
/// blocks only.
template <class T>
void fill_on_cpu(PackedKVCache<T>& cache, SeqId id, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  cache.add_sequence(id);
  const int lengths[] = {64 * 5 + 17, 30, 64 * 3};
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const int n = lengths[layer % 3];
    const std::size_t count = static_cast<std::size_t>(n) * c.num_kv_heads * c.head_dim;
    const auto k = convert<T>(random_values(count, seed + layer, 2.0));
    const auto v = convert<T>(random_values(count, (seed + layer) ^ 0x5555, 0.7));
    cache.append(id, layer, k.data(), v.data(), n);
  }
}

CacheConfig image_config() {
  CacheConfig c = base_config();
  c.num_layers = 3;
  return c;
}

TYPED_TEST(CudaTyped, ImagesTravelBetweenCpuAndCudaBothWays) {
  PACKKV_SKIP_WITHOUT_GPU();
  const CacheConfig c = image_config();
  // Source: the same tokens in both backends, so both export the same image, byte for byte.
  CachePair<TypeParam> source(c);
  source.add(1);
  for (int layer = 0; layer < c.num_layers; ++layer) source.append(1, layer, 64 * (layer + 2) + 9 * layer, 40 + layer);
  const std::vector<std::uint8_t> from_cpu = source.cpu.export_sequence(1), from_gpu = source.gpu.export_sequence(1);
  EXPECT_EQ(from_gpu, from_cpu) << "a CUDA cache exports the CPU cache's bytes";

  // Destination: each backend imports the other's image; they must agree with each other.
  CachePair<TypeParam> dest(c);
  dest.cpu.import_sequence(5, from_gpu);
  dest.gpu.import_sequence(5, from_cpu);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    compare_everything(dest, {5}, layer, 60 + layer, "imported, layer " + std::to_string(layer));
    if (this->HasFatalFailure()) return;
  }
  EXPECT_EQ(dest.gpu.export_sequence(5), from_cpu) << "export after import gives the image back";
  // And the imported sequence grows like any other.
  dest.append(5, 0, 100, 70);
  compare_everything(dest, {5}, 0, 71, "imported then appended");
}

TYPED_TEST(CudaTyped, CpuImageImportsIntoCudaCacheAndAttentionMatches) {
  PACKKV_SKIP_WITHOUT_GPU();
  const CacheConfig c = image_config();
  CachePair<TypeParam> pair(c);
  fill_on_cpu(pair.cpu, 3, 90);
  pair.gpu.import_sequence(3, pair.cpu.export_sequence(3));
  for (int layer = 0; layer < c.num_layers; ++layer) {
    compare_everything(pair, {3}, layer, 91 + layer, "CPU -> CUDA, layer " + std::to_string(layer));
    if (this->HasFatalFailure()) return;
  }
}

TEST(Cuda, ImportRecompressesTailsForASmallerResidualWindow) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig wide = image_config();
  wide.residual_tokens = 200;  // a long uncompressed tail in the image
  PackedKVCache<float> source(CachePair<float>::with_device(wide, Device::cpu));
  fill_on_cpu(source, 1, 5);
  const auto image = source.export_sequence(1);
  CacheConfig narrow = image_config();
  narrow.residual_tokens = 8;  // importing compresses most of that tail
  CachePair<float> pair(narrow);
  pair.cpu.import_sequence(1, image);
  pair.gpu.import_sequence(1, image);
  for (int layer = 0; layer < narrow.num_layers; ++layer) {
    compare_everything(pair, {1}, layer, 6 + layer, "residual 200 -> 8, layer " + std::to_string(layer));
    if (HasFatalFailure()) return;
  }
}

/// What a refused import must leave exactly as it was.
struct Snapshot {
  std::vector<SeqId> ids;
  std::vector<std::int64_t> lengths;
  std::size_t resident = 0, reserved = 0, live = 0;
  bool operator==(const Snapshot&) const = default;
};
template <class T>
Snapshot snapshot(const PackedKVCache<T>& cache) {
  Snapshot s;
  s.ids = cache.sequence_ids();
  for (SeqId id : s.ids) {
    for (int layer = 0; layer < cache.config().num_layers; ++layer) s.lengths.push_back(cache.length(id, layer));
  }
  const MemoryStats m = cache.memory_stats();
  s.resident = m.resident_bytes;
  s.reserved = m.pool.reserved_bytes;
  s.live = m.pool.live_bytes;
  return s;
}

TEST(Cuda, ImportReservesExactlyWhatItsBudgetCheckCounted) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig wide = image_config();
  wide.residual_tokens = 200;
  PackedKVCache<float> source(CachePair<float>::with_device(wide, Device::cpu));
  fill_on_cpu(source, 1, 31);
  const auto image = source.export_sequence(1);
  CacheConfig c = image_config();
  c.residual_tokens = 8;  // the re-appended tails are compressed: their pages, table and staging count
  c.device = Device::cuda;
  std::size_t resident = 0;
  {
    PackedKVCache<float> unlimited(c);
    unlimited.import_sequence(1, image);
    resident = unlimited.memory_stats().resident_bytes;
  }
  // The tails travel through a short-lived device buffer that the check counts as well: each
  // layer's K and V rows, 256-byte aligned.
  std::size_t upload = 0;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const std::size_t bytes = 2 * source.memory_stats().layers[layer].tail_tokens * c.num_kv_heads * c.head_dim * sizeof(float);
    upload += (bytes + 255) / 256 * 256;
  }

  c.memory_budget_bytes = resident + upload - 1;
  PackedKVCache<float> short_by_one(c);
  test::expect_error([&] { short_by_one.import_sequence(1, image); }, "import of sequence 1: memory budget");
  EXPECT_TRUE(snapshot(short_by_one) == snapshot(PackedKVCache<float>(c)));
  c.memory_budget_bytes = resident + upload;
  PackedKVCache<float> exact(c);
  EXPECT_NO_THROW(exact.import_sequence(1, image));  // the re-appends inside find it all reserved
  EXPECT_EQ(exact.memory_stats().resident_bytes, resident);
}

TEST(Cuda, ImportIntoEmptyLayersOfAnExistingSequence) {
  PACKKV_SKIP_WITHOUT_GPU();
  const CacheConfig c = image_config();
  PackedKVCache<fp16_t> source(CachePair<fp16_t>::with_device(c, Device::cpu));
  fill_on_cpu(source, 1, 11);
  const int only[] = {0, 2};
  const auto image = source.export_sequence(1, only);
  CachePair<fp16_t> pair(c);
  pair.add(2);
  pair.append(2, 1, 77, 12);  // layer 1 is not in the image and keeps its tokens
  pair.cpu.import_sequence(2, image);
  pair.gpu.import_sequence(2, image);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    compare_everything(pair, {2}, layer, 13 + layer, "partial image, layer " + std::to_string(layer));
    if (HasFatalFailure()) return;
  }
  test::expect_error([&] { pair.gpu.import_sequence(2, image); }, "layer 0 of sequence 2 is not empty");
}

TEST(Cuda, CorruptOrUnaffordableImagesAreRefusedAndChangeNothing) {
  PACKKV_SKIP_WITHOUT_GPU();
  CacheConfig c = image_config();
  PackedKVCache<float> source(CachePair<float>::with_device(c, Device::cpu));
  fill_on_cpu(source, 1, 21);
  const auto image = source.export_sequence(1);

  CachePair<float> pair(c);
  pair.add(4);
  pair.append(4, 0, 150, 22);
  const Snapshot before = snapshot(pair.gpu);

  auto corrupt = image;
  corrupt[corrupt.size() / 2] ^= 0x10;
  test::expect_error([&] { pair.gpu.import_sequence(9, corrupt); }, "checksum mismatch");
  auto truncated = image;
  truncated.resize(image.size() - 100);
  test::expect_error([&] { pair.gpu.import_sequence(9, truncated); }, "truncated");
  test::expect_error([&] { pair.gpu.import_sequence(4, image); }, "layer 0 of sequence 4 is not empty");
  EXPECT_TRUE(snapshot(pair.gpu) == before);
  EXPECT_FALSE(pair.gpu.contains(9));
  compare_everything(pair, {4}, 0, 23, "after refused imports");

  // A budget too small for the image: refused before anything is allocated.
  c.device = Device::cuda;
  c.memory_budget_bytes = pair.gpu.memory_stats().resident_bytes + 1024;
  PackedKVCache<float> tight(c);
  tight.add_sequence(4);
  const Snapshot tight_before = snapshot(tight);
  test::expect_error([&] { tight.import_sequence(9, image); }, "import of sequence 9: memory budget");
  EXPECT_TRUE(snapshot(tight) == tight_before);
}

// ---- threads and streams ------------------------------------------------------------------------

// Under the CPU emulator kernels run to completion on the launching host thread, so these tests
// exercise the backend's host-side thread safety and per-stream state, not device concurrency.

TEST(Cuda, ThreadsWithTheirOwnStreamAndCacheMatchCpu) {
  PACKKV_SKIP_WITHOUT_GPU();
  constexpr int kThreads = 4;
  CacheConfig c = base_config();
  c.residual_tokens = 16;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([c, t] {
      cudaStream_t stream = nullptr;
      cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
      {
        CachePair<fp16_t> pair(c);
        pair.gpu.set_stream(stream);
        const std::string who = "thread " + std::to_string(t);
        std::uint64_t seed = 1000 * (t + 1);
        pair.add(1);
        pair.add(2);
        for (int layer = 0; layer < c.num_layers; ++layer) {
          pair.append(1, layer, 64 * 3 + 11 * t, seed++);
          pair.append(2, layer, 5 + t, seed++);
        }
        for (int step = 0; step < 24; ++step) {  // decode steps: one token per sequence and layer
          for (SeqId id : {1, 2}) {
            for (int layer = 0; layer < c.num_layers; ++layer) pair.append(id, layer, 1, seed++);
          }
          if (step % 8 == 7) compare_everything(pair, {1, 2}, step % 2, seed++, who + " step " + std::to_string(step));
        }
        // A sequence moved through an image while the other threads keep working.
        pair.gpu.import_sequence(3, pair.gpu.export_sequence(1));
        pair.cpu.import_sequence(3, pair.cpu.export_sequence(1));
        compare_everything(pair, {3, 2}, 1, seed++, who + " after export/import");
      }
      cuda_ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
    });
  }
  for (auto& thread : threads) thread.join();
}

TEST(Cuda, OneCacheServesConcurrentReadersWhileAWriterAppends) {
  PACKKV_SKIP_WITHOUT_GPU();
  const CacheConfig c = base_config();
  CachePair<float> pair(c);
  pair.add(1);
  pair.add(2);
  pair.append(1, 0, 64 * 4 + 5, 1);
  pair.append(2, 0, 64 * 2 + 40, 2);
  // Readers attend to sequence 1, which does not change, and know the CPU's answer.
  const std::size_t q_count = static_cast<std::size_t>(c.num_q_heads) * c.head_dim;
  const auto q = random_values(q_count, 3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<float> expected(q_count);
  const SeqId one[] = {1};
  pair.cpu.attention(one, 0, q.data(), expected.data(), scale);
  const auto image = pair.cpu.export_sequence(1);

  std::atomic<bool> writing{true};
  std::thread writer([&] {
    for (int step = 0; step < 40; ++step) pair.append(2, step % 2, 1 + step % 3, 100 + step);
    writing = false;
  });
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&, r] {
      DeviceArray<float> dq(q), dout(q_count);
      int rounds = 0;
      while (writing || rounds < 5) {
        dout.poison();
        pair.gpu.attention(one, 0, dq.get(), dout.get(), scale);
        expect_close(dout.download(), expected, output_rtol<float>(), 2e-5,
                     "reader " + std::to_string(r) + " round " + std::to_string(rounds));
        if (r == 0) EXPECT_EQ(pair.gpu.export_sequence(1), image);
        ++rounds;
      }
    });
  }
  writer.join();
  for (auto& reader : readers) reader.join();
  compare_everything(pair, {1, 2}, 0, 4, "after the writer");
  compare_everything(pair, {2}, 1, 5, "after the writer, layer 1");
}

TEST(Cuda, SkipsCleanlyWithoutADevice) {
  std::string why;
  if (cuda::device_available(&why)) GTEST_SKIP() << "a device is present";
  CacheConfig c = base_config();
  c.device = Device::cuda;
  test::expect_error([&] { PackedKVCache<float> cache(c); }, "Device::cuda requested but");
}

}  // namespace
}  // namespace packkv
