#include "runtime/base/shell.hpp"

namespace solstice {

std::string shell_quote(std::string_view text) {
  std::string quoted = "'";
  quoted.reserve(text.size() + 2);
  for (char c : text) {
    if (c == '\'')
      quoted += "'\\''";
    else
      quoted.push_back(c);
  }
  return quoted + "'";
}

}  // namespace solstice
