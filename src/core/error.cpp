#include "packkv/error.hpp"

namespace packkv::detail {

void throw_error(const std::string& message) { throw error(message); }

void throw_out_of_memory(const std::string& what) {
  throw error("out of memory: " + what + " could not be allocated; the cache is unchanged (free memory, or set "
              "memory_budget_bytes so that the cache refuses work before the system runs out)");
}

}  // namespace packkv::detail
