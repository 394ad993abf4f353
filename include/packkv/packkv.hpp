// packkv: a compressed KV cache for LLM inference. Include this header for the whole public API.
#pragma once

#include "packkv/cache.hpp"
#include "packkv/codec.hpp"
#include "packkv/config.hpp"
#include "packkv/error.hpp"
#include "packkv/format.hpp"
#include "packkv/stats.hpp"
#include "packkv/types.hpp"
#include "packkv/version.hpp"
#include "packkv/synthetic.hpp"
