#include "packkv/error.hpp"

namespace packkv::detail {

void throw_error(const std::string& message) { throw error(message); }

}  // namespace packkv::detail
