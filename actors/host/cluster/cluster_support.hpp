#pragma once
// What the cluster subcommands share: network options and endpoints, the TLS
// file checks, the actor system configuration, connecting to a coordinator,
// termination signals taken synchronously, and messages on stderr.
#include <signal.h>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <string>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "actors/cluster/coordinator.hpp"
#include "runtime/base/error.hpp"

namespace CLI {
class App;
}
struct x509_st;  // OpenSSL's X509

namespace solstice::cluster_cli {

struct NetworkOptions {
  std::string cert, key, ca;
  bool insecure = false;
  unsigned connection_timeout_seconds = 10;

  bool tls() const { return !insecure; }
};

struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::string text() const {
    return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
           std::to_string(port);
  }
};

// --cert, --key, --ca, --insecure and --connection-timeout on `app`.
void add_network_options(CLI::App& app, NetworkOptions& net);

// HOST:PORT (or [IPv6]:PORT) given to `option`.
Result<Endpoint> parse_endpoint(const std::string& text, const std::string& option);

// CAF's TLS layer throws deep inside its network thread when a file is bad; this
// checks everything first (readable, matching, the certificate signed by the CA)
// so the user gets a plain message instead (tls_files.cpp).
Result<void> check_tls_files(const NetworkOptions& net);

// What every cluster command checks first: its endpoint option parses and the
// TLS files are usable (either failure is invalid input).
Result<Endpoint> checked_endpoint(const std::string& text, const std::string& option,
                                  const NetworkOptions& net);

// The actor system of a cluster peer: the runner's types, the middleman (with
// TLS unless --insecure), the protocol version, heartbeats.
struct ClusterConfig : caf::actor_system_config {
  explicit ClusterConfig(const NetworkOptions& net);
};

// Connects to the coordinator at `to` (through TLS unless --insecure), waiting
// at most `timeout` for the connection and CAF's handshake.
Result<coordinator_actor> connect_to_coordinator(caf::actor_system& sys, const Endpoint& to,
                                                 const NetworkOptions& net,
                                                 std::chrono::milliseconds timeout);

// Blocks the termination signals in this thread (and every thread it starts
// later), so they can be taken synchronously with next_signal().
class BlockedSignals {
 public:
  BlockedSignals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~BlockedSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  BlockedSignals(const BlockedSignals&) = delete;
  BlockedSignals& operator=(const BlockedSignals&) = delete;

  // The next pending termination signal, waiting at most `wait`; 0 if none.
  int next_signal(std::chrono::milliseconds wait) {
    timespec timeout{static_cast<time_t>(wait.count() / 1000),
                     static_cast<long>((wait.count() % 1000) * 1000000)};
    int sig = ::sigtimedwait(&set_, nullptr, &timeout);
    return sig > 0 ? sig : 0;
  }

 private:
  sigset_t set_{};
  sigset_t old_{};
};

// The role and name a cluster certificate gives its holder: exactly one
// subjectAltName URI solstice:role/node|submitter|operator, and the subject CN
// (peer_identity.cpp says why these fields).
Result<peer_identity> certificate_identity(::x509_st* cert);
Result<peer_identity> certificate_file_identity(const std::string& pem_path);

// For a TLS coordinator: from now on every accepted TLS connection is watched
// (peer_identity.cpp), and the function returned tells which certificate speaks
// for a peer's node id. Call it once, after the actor system is up.
peer_identifier watch_peer_identities(caf::actor_system& sys);

// For a client under TLS: every connection it makes from now on must meet a
// certificate with the coordinator role, or is closed; why the last one did not
// ("" if none was refused). connect_to_coordinator calls it.
void expect_coordinator_certificate();
std::string coordinator_certificate_refusal();

// `format` with one %s for `text`, on stderr, flushed.
void say(const char* format, const std::string& text);

// Keeps the OpenSSL error-queue wrappers (openssl_error_queue.cpp) in every
// executable that has the cluster commands: a static library member is linked
// only when something refers to it.
void keep_openssl_error_queue_wrappers();

}  // namespace solstice::cluster_cli
