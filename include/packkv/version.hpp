#pragma once

#define PACKKV_VERSION_MAJOR 0
#define PACKKV_VERSION_MINOR 2
#define PACKKV_VERSION_PATCH 0

namespace packkv {
inline constexpr const char* kVersionString = "0.2.0";
}
