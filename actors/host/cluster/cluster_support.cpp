#include "actors/host/cluster/cluster_support.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>
#include <vector>

#include <CLI/CLI.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/scoped_actor.hpp>
#include <spdlog/spdlog.h>

#include "actors/host/cluster_cli.hpp"
#include "actors/runner_types.hpp"

namespace solstice::cluster_cli {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

void add_network_options(CLI::App& app, NetworkOptions& net) {
  app.add_option("--cert", net.cert, "this peer's certificate (PEM), signed by the cluster's CA");
  app.add_option("--key", net.key, "the private key of --cert (PEM, not encrypted)");
  app.add_option("--ca", net.ca, "the cluster's CA certificate (PEM): peers must be signed by it");
  app.add_flag("--insecure", net.insecure,
               "plaintext and unauthenticated: no TLS (only on a network you trust)");
  app.add_option("--connection-timeout", net.connection_timeout_seconds,
                 "seconds without a heartbeat before a peer counts as lost (default 10)")
    ->check(CLI::Range(2u, 3600u));
}

Result<Endpoint> checked_endpoint(const std::string& text, const std::string& option,
                                  const NetworkOptions& net) {
  auto endpoint = parse_endpoint(text, option);
  if (!endpoint)
    return endpoint;
  if (auto ok = check_tls_files(net); !ok)
    return tl::unexpected(ok.error());
  return endpoint;
}

Result<Endpoint> parse_endpoint(const std::string& text, const std::string& option) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
    return fail(option + " '" + text + "': expected HOST:PORT, e.g. 127.0.0.1:4711");
  Endpoint endpoint;
  endpoint.host = text.substr(0, colon);
  if (endpoint.host.size() > 2 && endpoint.host.front() == '[' && endpoint.host.back() == ']')
    endpoint.host = endpoint.host.substr(1, endpoint.host.size() - 2);
  auto port_text = text.substr(colon + 1);
  if (port_text.find_first_not_of("0123456789") != std::string::npos || port_text.size() > 5 ||
      std::stoul(port_text) > 65535)
    return fail(option + " '" + text + "': the port must be a number from 0 to 65535");
  endpoint.port = static_cast<uint16_t>(std::stoul(port_text));
  return endpoint;
}

ClusterConfig::ClusterConfig(const NetworkOptions& net) {
  add_runner_types(*this);
  load<caf::io::middleman>();
  if (net.tls()) {
    load<caf::openssl::manager>();
    openssl_certificate = fs::absolute(net.cert).string();
    openssl_key = fs::absolute(net.key).string();
    openssl_cafile = fs::absolute(net.ca).string();
  }
  set("middleman.app-identifiers", std::vector<std::string>{cluster_protocol});
  // Heartbeats in both directions make a silent peer count as lost after the
  // connection timeout (CAF has both off by default).
  caf::timespan timeout = std::chrono::seconds(net.connection_timeout_seconds);
  caf::timespan heartbeat = std::min<caf::timespan>(1s, timeout / 4);
  set("middleman.heartbeat-interval", caf::timespan{heartbeat});
  set("middleman.connection-timeout", caf::timespan{timeout});
  set("scheduler.max-threads", 4);
}

namespace {

std::string connect_error_text(const caf::actor_system& sys, const caf::error& err,
                               const Endpoint& to, const NetworkOptions& net) {
  auto where = to.text();
  if (err == caf::sec::incompatible_application_ids)
    return where + " speaks another cluster protocol version (this runner speaks " +
           cluster_protocol + "): run the same solstice-runner version on both sides";
  if (err == caf::sec::unexpected_actor_messaging_interface)
    return where + " is a CAF application but not a compatible solstice-runner coordinator";
  if (err == caf::sec::no_actor_published_at_port)
    return "nothing is published at " + where;
  if (err == caf::sec::request_timeout)
    return "no handshake from " + where + " within the timeout (is it a solstice-runner "
                                          "coordinator, and reachable?)";
  if (err == caf::sec::disconnect_during_handshake)
    return where + " closed the connection during the handshake: " +
           (net.tls() ? "it refused our certificate (is it signed by the coordinator's CA?), "
                        "its certificate is not signed by --ca " + net.ca +
                          ", or it does not use TLS (--insecure)"
                      : "it probably requires TLS (give --cert, --key and --ca)");
  // CAF's own text (system_error(...), with its internals) says nothing a user can act on.
  if (err == caf::sec::cannot_connect_to_node)
    return "cannot connect to " + where + ": nothing accepts connections there (connection "
           "refused or host unreachable); is a coordinator running with --listen " + where + "?";
  return "cannot reach the coordinator at " + where + ": " + sys.render(err);
}


}  // namespace

Result<coordinator_actor> connect_to_coordinator(caf::actor_system& sys, const Endpoint& to,
                                                 const NetworkOptions& net,
                                                 std::chrono::milliseconds timeout) {
  auto manager = net.tls() ? sys.openssl_manager().actor_handle() : sys.middleman().actor_handle();
  if (net.tls())
    expect_coordinator_certificate();
  caf::scoped_actor self{sys};
  Result<coordinator_actor> result = fail("no answer");
  self->request(manager, timeout, caf::connect_atom::value, to.host, to.port)
    .receive(
      [&](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>& ifs) {
        if (!ptr)
          result = fail("nothing is published at " + to.text());
        else if (!sys.assignable<coordinator_actor>(ifs))
          result = fail(connect_error_text(sys, caf::sec::unexpected_actor_messaging_interface,
                                           to, net));
        else
          result = caf::actor_cast<coordinator_actor>(std::move(ptr));
      },
      [&](caf::error& err) {
        auto refusal = net.tls() ? coordinator_certificate_refusal() : std::string{};
        result = fail(refusal.empty() ? connect_error_text(sys, err, to, net)
                                      : to.text() + " is not a coordinator: " + refusal);
      });
  return result;
}

void say(const char* format, const std::string& text) {
  // The formats say "solstice-runner: %s\n"; the log line has its own prefix.
  std::string line(std::snprintf(nullptr, 0, format, text.c_str()), '\0');
  std::snprintf(line.data(), line.size() + 1, format, text.c_str());
  line.erase(0, line.find_first_not_of('\n'));
  if (line.rfind("solstice-runner: ", 0) == 0)
    line.erase(0, 17);
  while (!line.empty() && line.back() == '\n')
    line.pop_back();
  spdlog::info("{}", line);
}

}  // namespace solstice::cluster_cli
