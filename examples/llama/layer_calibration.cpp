// Per-layer rel calibration (layer_calibration.hpp).
#include "layer_calibration.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "perplexity.hpp"

namespace llama {

namespace {

/// One calibration run: which (layer, side) is at which menu rel (layer -1: the control).
struct Probe {
  int layer = -1;
  bool k_side = true;
  std::size_t point = 0;  // index into the menu of that side
  float rel = packkv::kMinRel;
};

}  // namespace

LayerSensitivity measure_layer_sensitivity(const LlamaModel& model, const std::vector<int>& tokens,
                                           const packkv::CacheConfig& base, const std::vector<float>& k_menu,
                                           const std::vector<float>& v_menu, int threads,
                                           const std::function<void(int done, int total)>& progress,
                                           const CacheFactory& make_cache) {
  const KvShape shape = model.config().kv_shape();
  const int layers = shape.num_layers;
  const int n = static_cast<int>(tokens.size());
  if (n < 2) throw std::invalid_argument("layer calibration needs at least 2 tokens");
  for (const std::vector<float>* menu : {&k_menu, &v_menu}) {
    for (float rel : *menu) {
      if (!(rel >= packkv::kMinRel && rel <= packkv::kMaxRel)) {
        throw std::invalid_argument("layer calibration: rel " + std::to_string(rel) + " outside [1/255, 1]");
      }
    }
  }

  auto exact_cache = make_exact_cache(shape);
  TeacherForcedResult exact_run = evaluate_teacher_forced(model, tokens.data(), n, *exact_cache, {}, nullptr, true);
  const ExactReference reference = make_exact_reference(model, std::move(exact_run), /*log_probs=*/true);

  std::vector<Probe> probes{Probe{}};
  for (int l = 0; l < layers; ++l) {
    for (std::size_t i = 0; i < k_menu.size(); ++i) probes.push_back({l, true, i, k_menu[i]});
    for (std::size_t i = 0; i < v_menu.size(); ++i) probes.push_back({l, false, i, v_menu[i]});
  }
  struct Measured {
    double kl = 0.0;
    std::vector<KvBytes> bytes;
  };
  std::vector<Measured> measured(probes.size());
  std::vector<std::string> errors(probes.size());
  std::atomic<int> done{0};
  const int total = static_cast<int>(probes.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int p = 0; p < total; ++p) {
    try {
      const Probe& probe = probes[static_cast<std::size_t>(p)];
      std::vector<float> k_rel(static_cast<std::size_t>(layers), packkv::kMinRel), v_rel = k_rel;
      if (probe.layer >= 0) (probe.k_side ? k_rel : v_rel)[static_cast<std::size_t>(probe.layer)] = probe.rel;
      packkv::CacheConfig config = base;
      config.layer_k_rel = k_rel;
      config.layer_v_rel = v_rel;
      auto cache = make_cache ? make_cache(config) : make_packkv_cache(shape, config);
      const TeacherForcedResult r = evaluate_teacher_forced(model, tokens.data(), n, *cache, {}, &reference);
      measured[static_cast<std::size_t>(p)] = {r.kl_sum / r.positions, cache->layer_bytes()};
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(p)] = e.what();
    }
    const int finished = ++done;
    if (progress) {
#pragma omp critical(layer_calibration_progress)
      progress(finished, total);
    }
  }
  for (const std::string& e : errors) {
    if (!e.empty()) throw std::runtime_error("layer calibration: " + e);
  }

  LayerSensitivity s;
  s.positions = n - 1;
  s.control_kl = measured[0].kl;
  s.menu.k.resize(static_cast<std::size_t>(layers));
  s.menu.v.resize(static_cast<std::size_t>(layers));
  for (int l = 0; l < layers; ++l) {
    const KvBytes& control = measured[0].bytes[static_cast<std::size_t>(l)];
    s.menu.k[static_cast<std::size_t>(l)].push_back({packkv::kMinRel, 0.0, control.k_compressed_bits()});
    s.menu.v[static_cast<std::size_t>(l)].push_back({packkv::kMinRel, 0.0, control.v_compressed_bits()});
  }
  for (std::size_t p = 1; p < probes.size(); ++p) {
    const Probe& probe = probes[p];
    const KvBytes& b = measured[p].bytes[static_cast<std::size_t>(probe.layer)];
    packkv::BoundChoice point{probe.rel, std::max(0.0, measured[p].kl - s.control_kl),
                         probe.k_side ? b.k_compressed_bits() : b.v_compressed_bits()};
    (probe.k_side ? s.menu.k : s.menu.v)[static_cast<std::size_t>(probe.layer)].push_back(point);
  }
  return s;
}

}  // namespace llama
