#pragma once
// One HTTP(S) download into an open file with libcurl, hashed (sha256) while it is
// written, with an optional progress bar on stderr.
#include <cstdint>
#include <string>

#include "runtime/base/error.hpp"

namespace solstice {

struct Download {
  std::string sha256;  // of the bytes written, 64 lowercase hex digits
  uint64_t bytes = 0;
};

// Writes the body of `url` (http or https only, redirects followed, a server error
// is an error) to `fd` from its current position. `what` names the download on the
// progress bar (shown when `progress` is set). Gives up when no byte arrives for
// 60 s. Errors name the URL and what went wrong.
Result<Download> download_to_fd(const std::string& url, int fd, const std::string& what,
                                bool progress);

}  // namespace solstice
