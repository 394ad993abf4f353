// The packed formats of packkv, version 2: the one normative definition, host and device alike
// (docs/format.md explains every field). No other file restates a layout.
//
//   format/bits.hpp    the 8-value bit stream primitive (pack8 / unpack8), packs of 16
//   format/quant.hpp   storable values, range reduction, (step, min), codes, dequantization
//   format/block.hpp   block header, directory, permutation, section layout and accessors
//   format/rounds.hpp  plain and frame-of-reference rounds, their descriptors and packs
//   format/image.hpp   sequence images (export / import)
#pragma once

#include "packkv/format/bits.hpp"
#include "packkv/format/block.hpp"
#include "packkv/format/image.hpp"
#include "packkv/format/quant.hpp"
#include "packkv/format/rounds.hpp"
