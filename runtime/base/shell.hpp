#pragma once
// POSIX shell quoting, for every command line the runner builds (guest set-up and
// steps, the SSH exec wrapper, job file adapters).
#include <string>
#include <string_view>

namespace solstice {

// 'it'\''s' — one single-quoted word, safe for any bytes in a POSIX shell.
std::string shell_quote(std::string_view text);

}  // namespace solstice
