// Merging partial softmax results of one query head (flash-decoding), on every backend.
//
// Part i covers some keys and holds its largest score m_i, its sum of exponentials
// l_i = sum e^(s - m_i) and its unnormalised output o_i = sum e^(s - m_i) v. With M = max m_i the
// merged output is sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i, and the log-sum-exp of all the
// scores is M + log(sum_i e^(m_i - M) l_i). A part with no keys has m_i = -inf and weight 0.
#pragma once

#include <cmath>

#include "packkv/types.hpp"

namespace packkv::detail {

struct SoftmaxMerge {
  float max = -INFINITY;
  float sum = 0.0f;

  /// First pass: every part's largest score.
  PACKKV_HOST_DEVICE void observe(float part_max) { max = part_max > max ? part_max : max; }
  /// e^(m_i - M): the factor of part i's output and sum.
  PACKKV_HOST_DEVICE float weight(float part_max) const {
    return part_max == -INFINITY ? 0.0f : expf(part_max - max);
  }
  /// Second pass: every part's sum of exponentials.
  PACKKV_HOST_DEVICE void add(float part_max, float part_sum) { sum += weight(part_max) * part_sum; }
  PACKKV_HOST_DEVICE float lse() const { return max + logf(sum); }
};

}  // namespace packkv::detail
