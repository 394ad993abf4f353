// The one error type packkv throws. Every invalid input (config, shape, id, data) and every
// exhausted resource raises packkv::error with a message that names the offending value; the
// object the call was made on is left exactly as it was.
#pragma once

#include <stdexcept>
#include <string>

namespace packkv {

class error : public std::runtime_error {
 public:
  explicit error(const std::string& message) : std::runtime_error("packkv: " + message), message_(message) {}
  /// The message without the "packkv: " prefix of what(), for adding context to it.
  const std::string& message() const noexcept { return message_; }

 private:
  std::string message_;
};

namespace detail {
/// Out-of-line thrower keeps the formatting code off hot paths.
[[noreturn]] void throw_error(const std::string& message);
/// Throws packkv::error for an exhausted allocation (`what` says what was being allocated).
[[noreturn]] void throw_out_of_memory(const std::string& what);
}  // namespace detail

}  // namespace packkv

/// Check a precondition; on failure throw packkv::error with the given message (a std::string
/// expression, evaluated only on failure).
#define PACKKV_REQUIRE(cond, message)                    \
  do {                                                   \
    if (!(cond)) ::packkv::detail::throw_error(message); \
  } while (0)
