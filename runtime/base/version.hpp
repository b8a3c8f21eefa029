#pragma once
// The runner's version and the git commit it was built from (cmake/version.cmake
// writes them at build time).
#include <string>

namespace solstice {

// The CMake project version, "0.1.0".
const char* runner_version();
// The short git commit ("3f2a9c1e0b7d", "-dirty" when the tree had changes), or
// "unknown" when built outside a git checkout.
const char* runner_commit();

// "solstice-runner 0.1.0 (commit 3f2a9c1e0b7d)": what --version prints.
inline std::string runner_version_text() {
  return std::string("solstice-runner ") + runner_version() + " (commit " + runner_commit() + ")";
}

}  // namespace solstice
