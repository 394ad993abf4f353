// Per-layer error bounds from measured sensitivity (CacheConfig::layer_k_rel / layer_v_rel).
//
// Layers differ in how much a given bound costs the model's output, by more than an order of
// magnitude, so one bound per layer and side spends bits where the model notices them. The engine
// measures, on a short calibration text its evaluations do not score, what each (layer, side,
// bound) of a menu costs alone: the accuracy lost (for example the mean KL divergence of the
// next-token distribution from an exact cache's, less a near-exact control's) and the bits per
// element that layer and side then store (MemoryStats::layers). choose_layer_bounds picks, for a
// budget of accuracy loss, the bounds with the fewest bits whose losses add up to at most the
// budget (small losses add up): a multiple-choice knapsack, solved by Lagrangian relaxation (for
// a price lambda each (layer, side) takes the choice with the fewest bits + lambda * loss; lambda
// is bisected until the budget holds). The answer is optimal for the loss it actually spends.
// examples/llama/layer_calibration.cpp measures a menu on a real model; docs/results/levers.md
// what the plans buy.
#pragma once

#include <vector>

#include "packkv/config.hpp"

namespace packkv {

/// One bound of a (layer, side)'s menu and what it was measured to cost.
struct BoundChoice {
  float rel = kMinRel;  ///< the bound, in [1/255, 1]
  double loss = 0.0;    ///< accuracy lost with this bound alone, >= 0 (the engine's measure)
  double bits = 0.0;    ///< bits per element that layer and side store with it, >= 0
};

/// The choices of every layer: k[layer] and v[layer] each hold at least one.
struct LayerBoundMenu {
  std::vector<std::vector<BoundChoice>> k, v;
};

/// One bound per layer and side, and what the menu predicts for them.
struct LayerBounds {
  std::vector<float> k_rel, v_rel;  ///< per layer
  double predicted_loss = 0.0;      ///< the sum of the chosen losses
  double predicted_bits = 0.0;      ///< K and V together, mean over layers and sides
  /// Sets config.layer_k_rel and layer_v_rel; throws packkv::error when the layer counts differ.
  void apply_to(CacheConfig& config) const;
};

/// The bounds with the fewest predicted bits whose predicted loss is at most `loss_budget` (the
/// smallest loss of each (layer, side) when even those exceed it). Throws packkv::error for an
/// empty or malformed menu (a layer without choices, a bound out of range, a negative or
/// non-finite loss or bits, K and V of different layer counts) or a negative budget.
LayerBounds choose_layer_bounds(const LayerBoundMenu& menu, double loss_budget);

}  // namespace packkv
