#include "packkv/calibration.hpp"

#include <cmath>
#include <cstddef>

#include <fmt/format.h>

#include "packkv/error.hpp"

namespace packkv {

void LayerBounds::apply_to(CacheConfig& config) const {
  PACKKV_REQUIRE(k_rel.size() == static_cast<std::size_t>(config.num_layers) && v_rel.size() == k_rel.size(),
                 fmt::format("layer bounds for {} (K) and {} (V) layers do not fit a config of {} layers", k_rel.size(),
                             v_rel.size(), config.num_layers));
  config.layer_k_rel = k_rel;
  config.layer_v_rel = v_rel;
}

namespace {

void check_menu(const LayerBoundMenu& menu, double loss_budget) {
  PACKKV_REQUIRE(!menu.k.empty() && menu.k.size() == menu.v.size(),
                 fmt::format("layer bound menu: K has {} layers and V {}; both need the same number, at least 1",
                             menu.k.size(), menu.v.size()));
  PACKKV_REQUIRE(std::isfinite(loss_budget) && loss_budget >= 0.0,
                 fmt::format("layer bounds: the loss budget must be finite and >= 0, got {}", loss_budget));
  for (int side = 0; side < 2; ++side) {
    const auto& layers = side == 0 ? menu.k : menu.v;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const char* name = side == 0 ? "K" : "V";
      PACKKV_REQUIRE(!layers[l].empty(), fmt::format("layer bound menu: layer {} {} has no choices", l, name));
      for (const BoundChoice& c : layers[l]) {
        PACKKV_REQUIRE(std::isfinite(c.rel) && c.rel >= kMinRel && c.rel <= kMaxRel,
                       fmt::format("layer bound menu: layer {} {} offers rel {}, outside [1/255, 1]", l, name, c.rel));
        PACKKV_REQUIRE(std::isfinite(c.loss) && c.loss >= 0.0 && std::isfinite(c.bits) && c.bits >= 0.0,
                       fmt::format("layer bound menu: layer {} {} rel {} has loss {} and bits {}; both must be finite "
                                   "and >= 0",
                                   l, name, c.rel, c.loss, c.bits));
      }
    }
  }
}

/// For price lambda, each (layer, side) independently takes its choice with the fewest
/// bits + lambda * loss; ties go to the smaller loss, so that a large lambda lands on the smallest.
LayerBounds bounds_at(const LayerBoundMenu& menu, double lambda) {
  const std::size_t layers = menu.k.size();
  LayerBounds b;
  b.k_rel.resize(layers);
  b.v_rel.resize(layers);
  double bits = 0.0;
  for (std::size_t l = 0; l < layers; ++l) {
    for (int side = 0; side < 2; ++side) {
      const std::vector<BoundChoice>& choices = side == 0 ? menu.k[l] : menu.v[l];
      const BoundChoice* best = &choices.front();
      for (const BoundChoice& c : choices) {
        const double cost = c.bits + lambda * c.loss, best_cost = best->bits + lambda * best->loss;
        if (cost < best_cost || (cost == best_cost && c.loss < best->loss)) best = &c;
      }
      (side == 0 ? b.k_rel : b.v_rel)[l] = best->rel;
      b.predicted_loss += best->loss;
      bits += best->bits;
    }
  }
  b.predicted_bits = bits / (2.0 * static_cast<double>(layers));
  return b;
}

}  // namespace

LayerBounds choose_layer_bounds(const LayerBoundMenu& menu, double loss_budget) {
  check_menu(menu, loss_budget);
  // The loss spent falls as lambda grows: find a lambda within budget, then bisect (in log space)
  // the smallest one.
  const LayerBounds cheapest = bounds_at(menu, 0.0);
  if (cheapest.predicted_loss <= loss_budget) return cheapest;
  double hi = 1.0;
  while (hi < 1e300 && bounds_at(menu, hi).predicted_loss > loss_budget) hi *= 1e3;
  double lo = 1e-300;
  for (int i = 0; i < 200 && hi / lo > 1.0 + 1e-12; ++i) {
    const double mid = std::sqrt(lo) * std::sqrt(hi);
    if (bounds_at(menu, mid).predicted_loss <= loss_budget) hi = mid;
    else lo = mid;
  }
  return bounds_at(menu, hi);
}

}  // namespace packkv
