// `solstice-runner coordinator`: publishes a coordinator actor until a termination signal.
#include <cstdio>
#include <memory>

#include <caf/io/publish.hpp>
#include <caf/openssl/publish.hpp>
#include <caf/send.hpp>

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/host/metrics_server.hpp"
#include "actors/host/runner_host.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

int coordinator_command(const CoordinatorOptions& options) {
  auto listen = checked_endpoint(options.listen, "--listen", options.net);
  if (!listen) {
    say("solstice-runner: %s\n", listen.error().message);
    return exit_invalid_input;
  }
  BlockedSignals signals;
  auto metrics_server = MetricsServer::start_if_asked(options.metrics_listen);
  if (!metrics_server) {
    say("solstice-runner: %s\n", metrics_server.error().message);
    return exit_invalid_input;
  }
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  coordinator_options settings;
  settings.queue_timeout = std::chrono::seconds(options.queue_timeout_seconds);
  settings.dispatch_timeout = std::chrono::seconds(options.dispatch_timeout_seconds);
  // Under TLS each peer may do what its certificate's role allows; without TLS
  // there are no roles (README, "Roles").
  if (options.net.tls())
    settings.identify = watch_peer_identities(sys);
  auto coordinator_handle = sys.spawn(coordinator, settings);
  const char* address = listen->host == "*" ? nullptr : listen->host.c_str();
  auto port = options.net.tls()
                ? caf::openssl::publish(coordinator_handle, listen->port, address, true)
                : caf::io::publish(coordinator_handle, listen->port, address, true);
  if (!port) {
    say("solstice-runner: cannot listen on %s\n", listen->text() + ": " + sys.render(port.error()));
    caf::anon_send_exit(coordinator_handle, caf::exit_reason::user_shutdown);
    return exit_infrastructure_error;
  }
  // The first line on stdout says where it listens (with the port chosen when
  // --listen gave port 0).
  Endpoint bound{listen->host, *port};
  std::printf("solstice-runner coordinator listening on %s (%s)\n", bound.text().c_str(),
              options.net.tls() ? ("TLS, peers must be signed by " + options.net.ca).c_str()
                                : "plaintext, --insecure");
  std::fflush(stdout);
  while (!signals.next_signal(1000ms)) {
  }
  say("solstice-runner: %s\n", "coordinator shutting down");
  caf::anon_send_exit(coordinator_handle, caf::exit_reason::user_shutdown);
  return 0;
}

}  // namespace solstice::cluster_cli
