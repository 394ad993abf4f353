// packkv: a compressed KV cache for LLM inference. This header is the cache's API; the block
// format (packkv/format.hpp), the block codec (packkv/codec.hpp), the CUDA encoder
// (packkv/cuda/device_codec.hpp) and a synthetic KV stream (packkv/synthetic.hpp) have their own.
#pragma once

#include "packkv/cache.hpp"
#include "packkv/calibration.hpp"
#include "packkv/config.hpp"
#include "packkv/error.hpp"
#include "packkv/image_coding.hpp"
#include "packkv/stats.hpp"
#include "packkv/types.hpp"
#include "packkv/version.hpp"
