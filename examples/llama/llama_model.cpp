#include "llama_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "tensor_ops.hpp"

namespace llama {
namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  const std::streamsize size = in.tellg();
  std::vector<char> bytes(static_cast<std::size_t>(size));
  in.seekg(0);
  if (!in.read(bytes.data(), size)) throw std::runtime_error("cannot read " + path);
  return bytes;
}

constexpr char kPkvMagic[8] = {'P', 'K', 'V', 'L', 'L', 'A', 'M', 'A'};
constexpr std::uint32_t kPkvVersion = 1;

std::size_t weight_floats(const LlamaConfig& c, bool shared_classifier) {
  const std::size_t d = c.dim, h = c.hidden_dim, l = c.num_layers, q = c.q_dim(),
                    kv = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim, v = c.vocab_size;
  std::size_t n = v * d + l * d + l * q * d + 2 * l * kv * d + l * d * q + l * d + 3 * l * h * d + d;
  if (!shared_classifier) n += v * d;
  return n;
}

void check_config(const LlamaConfig& c, const std::string& path) {
  if (c.dim <= 0 || c.hidden_dim <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 ||
      c.vocab_size <= 0 || c.head_dim <= 0 || c.head_dim % 2 != 0 || c.num_heads % c.num_kv_heads != 0) {
    throw std::runtime_error(path + ": implausible model header");
  }
}

}  // namespace

void LlamaModel::assign_pointers(std::size_t offset, bool shared_classifier) {
  const LlamaConfig& c = config_;
  const std::size_t d = c.dim, h = c.hidden_dim, l = c.num_layers, q = c.q_dim(),
                    kv = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  const float* p = w_.storage.data() + offset;
  auto take = [&p](std::size_t n) {
    const float* t = p;
    p += n;
    return t;
  };
  w_.token_embedding = take(static_cast<std::size_t>(c.vocab_size) * d);
  w_.rms_att = take(l * d);
  w_.wq = take(l * q * d);
  w_.wk = take(l * kv * d);
  w_.wv = take(l * kv * d);
  w_.wo = take(l * d * q);
  w_.rms_ffn = take(l * d);
  w_.w1 = take(l * h * d);
  w_.w2 = take(l * d * h);
  w_.w3 = take(l * h * d);
  w_.rms_final = take(d);
  w_.classifier = shared_classifier ? w_.token_embedding : p;
}

void LlamaModel::pack_matrices(const float* classifier_rows) {
  const LlamaConfig& c = config_;
  const int d = c.dim, h = c.hidden_dim, q = c.q_dim(), kv = c.num_kv_heads * c.head_dim;
  const std::size_t L = c.num_layers;
  struct Matrix {
    const float** field;
    int in, out;
    std::size_t count;
  };
  const Matrix matrices[] = {{&w_.wq, d, q, L},  {&w_.wk, d, kv, L}, {&w_.wv, d, kv, L}, {&w_.wo, q, d, L},
                             {&w_.w1, d, h, L},  {&w_.w2, h, d, L},  {&w_.w3, d, h, L},
                             {&w_.classifier, d, c.vocab_size, 1}};
  std::size_t total = 0;
  for (const Matrix& m : matrices) total += packed_size(m.in, m.out) * m.count;
  w_.packed.resize(total);
  std::size_t offset = 0;
  for (const Matrix& m : matrices) {
    const float* rows = m.field == &w_.classifier ? classifier_rows : *m.field;
    *m.field = w_.packed.data() + offset;
    for (std::size_t i = 0; i < m.count; ++i) {
      pack_weights(rows + i * static_cast<std::size_t>(m.in) * m.out, m.in, m.out, w_.packed.data() + offset);
      offset += packed_size(m.in, m.out);
    }
  }
}

LlamaModel LlamaModel::load_llama2c(const std::string& path) {
  const std::vector<char> bytes = read_file(path);
  std::int32_t header[7];
  if (bytes.size() < sizeof header) throw std::runtime_error(path + ": too short for a llama2.c header");
  std::memcpy(header, bytes.data(), sizeof header);
  LlamaModel m;
  LlamaConfig& c = m.config_;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.num_layers = header[2];
  c.num_heads = header[3];
  c.num_kv_heads = header[4];
  // A negative vocabulary size is llama2.c's flag for a classifier stored apart from the embedding.
  const bool shared = header[5] > 0;
  c.vocab_size = std::abs(header[5]);
  c.max_seq_len = header[6];
  c.head_dim = c.num_heads > 0 ? c.dim / c.num_heads : 0;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  check_config(c, path);

  // The legacy RoPE tables (freq_cis_real/imag) sit between rms_final and the classifier.
  const std::size_t rope_tables = static_cast<std::size_t>(c.max_seq_len) * c.head_dim;
  const std::size_t before_tables = weight_floats(c, true);
  const std::size_t total = before_tables + rope_tables + (shared ? 0 : static_cast<std::size_t>(c.vocab_size) * c.dim);
  if (bytes.size() < sizeof header + total * sizeof(float)) throw std::runtime_error(path + ": truncated weights");
  m.w_.storage.resize(total);
  std::memcpy(m.w_.storage.data(), bytes.data() + sizeof header, total * sizeof(float));
  m.assign_pointers(0, true);
  m.pack_matrices(shared ? m.w_.token_embedding : m.w_.storage.data() + before_tables + rope_tables);
  return m;
}

LlamaModel LlamaModel::load_pkvllama(const std::string& path) {
  const std::vector<char> bytes = read_file(path);
  struct Header {
    char magic[8];
    std::uint32_t version;
    std::int32_t dim, hidden_dim, num_layers, num_heads, num_kv_heads, vocab_size, max_seq_len, head_dim,
        shared_classifier;
    float rope_theta, norm_eps;
  } header;
  static_assert(sizeof(Header) == 56);
  if (bytes.size() < sizeof header) throw std::runtime_error(path + ": too short for a PKVLLAMA header");
  std::memcpy(&header, bytes.data(), sizeof header);
  if (std::memcmp(header.magic, kPkvMagic, sizeof kPkvMagic) != 0 || header.version != kPkvVersion) {
    throw std::runtime_error(path + ": not a PKVLLAMA version 1 file");
  }
  LlamaModel m;
  LlamaConfig& c = m.config_;
  c.dim = header.dim;
  c.hidden_dim = header.hidden_dim;
  c.num_layers = header.num_layers;
  c.num_heads = header.num_heads;
  c.num_kv_heads = header.num_kv_heads;
  c.vocab_size = header.vocab_size;
  c.max_seq_len = header.max_seq_len;
  c.head_dim = header.head_dim;
  c.rope_theta = header.rope_theta;
  c.norm_eps = header.norm_eps;
  check_config(c, path);
  const std::size_t total = weight_floats(c, header.shared_classifier != 0);
  if (bytes.size() != sizeof header + total * sizeof(float)) throw std::runtime_error(path + ": wrong size for its header");
  m.w_.storage.resize(total);
  std::memcpy(m.w_.storage.data(), bytes.data() + sizeof header, total * sizeof(float));
  m.assign_pointers(0, header.shared_classifier != 0);
  m.pack_matrices(m.w_.classifier);
  return m;
}

LlamaModel LlamaModel::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8] = {};
  in.read(magic, sizeof magic);
  return std::memcmp(magic, kPkvMagic, sizeof magic) == 0 ? load_pkvllama(path) : load_llama2c(path);
}

const std::vector<float>& LlamaModel::forward(const int* tokens, int n, int start_pos, KvCache& cache,
                                              ForwardBuffers& buffers,
                                              const std::function<void(int layer)>& on_layer) const {
  const LlamaConfig& c = config_;
  const int d = c.dim, hd = c.head_dim, qd = c.q_dim(), kvd = c.num_kv_heads * hd, hidden = c.hidden_dim;
  const auto rows = static_cast<std::size_t>(n);
  std::vector<float>&x = buffers.x, &xb = buffers.xb, &q = buffers.q, &k = buffers.k, &v = buffers.v,
                     &att = buffers.att, &hb = buffers.hb, &hb2 = buffers.hb2;
  x.resize(rows * d);
  xb.resize(rows * d);
  q.resize(rows * qd);
  k.resize(rows * kvd);
  v.resize(rows * kvd);
  att.resize(rows * qd);
  hb.resize(rows * hidden);
  hb2.resize(rows * hidden);
  for (int t = 0; t < n; ++t) {
    if (tokens[t] < 0 || tokens[t] >= c.vocab_size) throw std::out_of_range("token id out of the vocabulary");
    std::memcpy(&x[t * d], w_.token_embedding + static_cast<std::size_t>(tokens[t]) * d, d * sizeof(float));
  }
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(hd));

  for (int l = 0; l < c.num_layers; ++l) {
    const std::size_t L = l;
    for (int t = 0; t < n; ++t) rmsnorm(&x[t * d], w_.rms_att + L * d, &xb[t * d], d, c.norm_eps);
    matmul(xb.data(), w_.wq + L * packed_size(d, qd), q.data(), n, d, qd);
    matmul(xb.data(), w_.wk + L * packed_size(d, kvd), k.data(), n, d, kvd);
    matmul(xb.data(), w_.wv + L * packed_size(d, kvd), v.data(), n, d, kvd);
    for (int t = 0; t < n; ++t) {
      rope_adjacent_pairs(&q[t * qd], c.num_heads, hd, start_pos + t, c.rope_theta);
      rope_adjacent_pairs(&k[t * kvd], c.num_kv_heads, hd, start_pos + t, c.rope_theta);
    }
    // The decode loop: each token enters the cache, then attends over everything cached so far.
    for (int t = 0; t < n; ++t) {
      cache.append(l, &k[t * kvd], &v[t * kvd]);
      cache.attend(l, &q[t * qd], &att[t * qd], softmax_scale);
    }
    matmul(att.data(), w_.wo + L * packed_size(qd, d), xb.data(), n, qd, d);
    for (std::size_t i = 0; i < rows * d; ++i) x[i] += xb[i];

    for (int t = 0; t < n; ++t) rmsnorm(&x[t * d], w_.rms_ffn + L * d, &xb[t * d], d, c.norm_eps);
    matmul(xb.data(), w_.w1 + L * packed_size(d, hidden), hb.data(), n, d, hidden);
    matmul(xb.data(), w_.w3 + L * packed_size(d, hidden), hb2.data(), n, d, hidden);
    swiglu(hb.data(), hb2.data(), rows * hidden);
    matmul(hb.data(), w_.w2 + L * packed_size(hidden, d), xb.data(), n, hidden, d);
    for (std::size_t i = 0; i < rows * d; ++i) x[i] += xb[i];
    if (on_layer) on_layer(l);
  }
  for (int t = 0; t < n; ++t) rmsnorm(&x[t * d], w_.rms_final, &xb[t * d], d, c.norm_eps);
  return xb;
}

void LlamaModel::logits(const float* hidden, int rows, float* out) const {
  matmul(hidden, w_.classifier, out, rows, config_.dim, config_.vocab_size);
}

int argmax(const float* x, int n) { return static_cast<int>(std::max_element(x, x + n) - x); }

}  // namespace llama
