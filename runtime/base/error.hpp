#pragma once
// Errors as values: every fallible runtime call returns Result<T>, whose error
// message already carries the context a user needs (file, field, value, why).
#include <string>
#include <utility>

#include <tl/expected.hpp>

namespace solstice {

struct Error {
  std::string message;
};

template <class T = void>
using Result = tl::expected<T, Error>;

inline tl::unexpected<Error> fail(std::string message) {
  return tl::unexpected<Error>{Error{std::move(message)}};
}

// "what: strerror(errno)" for system call failures.
std::string errno_message(const std::string& what, int err);

}  // namespace solstice
