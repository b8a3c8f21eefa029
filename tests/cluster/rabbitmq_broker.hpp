#pragma once
// A real RabbitMQ broker for the AMQP tests: its own epmd and its own node name,
// data, log and config directories, everything on free ports of 127.0.0.1.
// rabbitmq-server's script execs the Erlang VM, so the PID kept is the VM's
// (beam.smp); it and the test's epmd are stopped by PID, never by name.
#include <cstdint>
#include <optional>
#include <string>

#include "tests/cluster/cluster_process.hpp"

namespace solstice::cluster_testing {

// A free TCP port of 127.0.0.1 (bound and released).
uint16_t free_port();

// A TLS listener's files (PEM): the broker's certificate and key, and the CA
// that client certificates must be signed by (a client without one is refused).
struct BrokerTls {
  std::filesystem::path ca, cert, key;
};

class RabbitBroker {
 public:
  // Starts the broker in `dir`; waits until it accepts connections. REQUIREs it.
  // With `tls` it listens for amqps:// too.
  explicit RabbitBroker(const std::filesystem::path& dir,
                        std::optional<BrokerTls> tls = std::nullopt);
  ~RabbitBroker();

  // amqp://guest@127.0.0.1:PORT (vhost "/"; the password is "guest": password_file()).
  std::string url() const;
  std::filesystem::path password_file() const;
  // amqps://guest@localhost:PORT (only with a TLS listener; it listens on 127.0.0.1).
  std::string amqps_url() const;

  // SIGTERM and wait (SIGKILL after 30 s); start() again keeps the data dir.
  void stop();
  void start();
  bool running() const { return broker_.has_value(); }

  // rabbitmqctl against this broker (its output), for queue depths and the like.
  std::string ctl(const std::vector<std::string>& args);

 private:
  std::filesystem::path dir_;
  uint16_t amqp_port_ = 0, amqps_port_ = 0, dist_port_ = 0, epmd_port_ = 0;
  std::string node_name_;
  std::optional<RunnerProcess> epmd_;
  std::optional<RunnerProcess> broker_;
};

}  // namespace solstice::cluster_testing
