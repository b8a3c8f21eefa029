#pragma once
// The cluster subcommands of `solstice-runner`: `coordinator`, `node`, `submit`
// and `status`. They speak CAF's own network protocol (caf::io), with mutual
// TLS through caf::openssl unless `--insecure` is given.
#include <optional>
#include <string>

namespace CLI {
class App;
}

namespace solstice {

// Protocol version of the cluster, sent in CAF's handshake as the application
// identifier: peers with another one are refused.
inline constexpr const char* cluster_protocol = "solstice-runner-cluster-1";

// Adds the cluster subcommands to `app`. When one of them is chosen it runs as
// `app.parse()` finishes, and its exit code is stored in `exit_code`.
void add_cluster_commands(CLI::App& app, std::optional<int>& exit_code);

}  // namespace solstice
