#pragma once
// `solstice-runner image`: the image cache of a state directory (runtime/vm/image_cache).
//   image pull URL --sha256 HEX [--label L] [--firmware bios|uefi]
//   image list                 label, size, sha256, last used
//   image rm LABEL             the label, and its image when no other label uses it
//   image verify [LABEL]       hashes the cached images again
// Each takes --config / --state-dir; list takes --json. Exit codes: 0 done; 1 an
// image failed its check (pull, verify); 2 invalid input (an unknown label, a bad option).
#include <optional>

namespace CLI {
class App;
}

namespace solstice {

// Adds `image` and its subcommands to `app`; the chosen one runs as `app.parse()`
// finishes and stores its exit code in `exit_code`.
void add_image_commands(CLI::App& app, std::optional<int>& exit_code);

}  // namespace solstice
