// Per-layer relative error bounds chosen from measured sensitivity: bits go where the model
// notices them.
//
// Sensitivity: on a calibration window (tokens the evaluation does not score), each (layer, side,
// rel) of a menu runs alone: that layer's side at the rel, everything else at 1/255 (8-bit codes,
// the control). Its mean KL against the exact cache, less the control's, and that layer-side's
// bits per element are recorded.
//
// Allocation: one rel per (layer, side) with the fewest bits such that the predicted KL (the sum of
// the one-at-a-time increases: small errors add up) stays within a budget. That is a
// multiple-choice knapsack; it is solved by Lagrangian relaxation: for a price lambda each
// (layer, side) takes the rel with the least bits + lambda * KL increase, and lambda is bisected
// until the budget holds. The answer is optimal for the budget it actually spends.
#pragma once

#include <functional>
#include <vector>

#include "kv_cache.hpp"
#include "llama_model.hpp"

namespace llama {

struct LayerMenuPoint {
  float rel = 0.0f;
  double kl_increase = 0.0;  ///< mean KL less the control's, clamped at 0 (noise can make it negative)
  double bits = 0.0;         ///< that layer-side's compressed bits per element
};

struct LayerSensitivity {
  /// [layer][point]: the control (rel 1/255) first, then the menu in its order.
  std::vector<std::vector<LayerMenuPoint>> k, v;
  double control_kl = 0.0;  ///< every side at 1/255
  int positions = 0;        ///< scored positions of the calibration window
};

struct LayerRelPlan {
  std::vector<float> k_rel, v_rel;  ///< per layer
  double predicted_kl_increase = 0.0;
  double predicted_bits = 0.0;  ///< K and V together, mean over layers (the layers hold equal token counts)
};

/// Runs the menu on `tokens` (the calibration window). `base` gives everything but the rels;
/// `threads` runs at a time; `progress(done, total)` after each run.
LayerSensitivity measure_layer_sensitivity(const LlamaModel& model, const std::vector<int>& tokens,
                                           const packkv::CacheConfig& base, const std::vector<float>& k_menu,
                                           const std::vector<float>& v_menu, int threads,
                                           const std::function<void(int done, int total)>& progress = {});

/// The plan with the fewest bits whose predicted KL increase is at most `kl_budget`.
LayerRelPlan allocate_layer_rels(const LayerSensitivity& sensitivity, double kl_budget);

}  // namespace llama
