#include "runtime/base/error.hpp"

#include <cstring>

namespace solstice {

std::string errno_message(const std::string& what, int err) {
  return what + ": " + std::strerror(err);
}

}  // namespace solstice
