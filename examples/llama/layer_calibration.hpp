// Per-layer relative error bounds chosen from measured sensitivity: bits go where the model
// notices them.
//
// Sensitivity: on a calibration window (tokens the evaluation does not score), each (layer, side,
// rel) of a menu runs alone: that layer's side at the rel, everything else at 1/255 (8-bit codes,
// the control). Its mean KL against the exact cache, less the control's, and that layer-side's
// bits per element are recorded.
//
// Allocation: packkv::choose_layer_bounds (include/packkv/calibration.hpp) picks, for a KL budget,
// one rel per (layer, side) with the fewest bits whose increases add up to the budget.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "kv_cache.hpp"
#include "llama_model.hpp"
#include "packkv/calibration.hpp"

namespace llama {

/// A menu's measurements: loss = mean KL less the control's (clamped at 0: noise can make it
/// negative), bits = that layer-side's compressed bits per element; per layer the control (rel
/// 1/255) first, then the menu in its order.
struct LayerSensitivity {
  packkv::LayerBoundMenu menu;
  double control_kl = 0.0;  ///< every side at 1/255
  int positions = 0;        ///< scored positions of the calibration window
};

/// The cache a calibration run measures, from its config (rels per layer set).
using CacheFactory = std::function<std::unique_ptr<KvCache>(const packkv::CacheConfig&)>;

/// Runs the menu on `tokens` (the calibration window). `base` gives everything but the rels;
/// `threads` runs at a time; `progress(done, total)` after each run; `make_cache` makes each run's
/// cache (default: make_packkv_cache), so that the menu is measured with the levers it is used with.
LayerSensitivity measure_layer_sensitivity(const LlamaModel& model, const std::vector<int>& tokens,
                                           const packkv::CacheConfig& base, const std::vector<float>& k_menu,
                                           const std::vector<float>& v_menu, int threads,
                                           const std::function<void(int done, int total)>& progress = {},
                                           const CacheFactory& make_cache = {});

}  // namespace llama
