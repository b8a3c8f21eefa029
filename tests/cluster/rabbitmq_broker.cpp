#include "tests/cluster/rabbitmq_broker.hpp"

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

namespace solstice::cluster_testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

uint16_t free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

namespace {

// The environment rabbitmq-server reads: every path inside the test's dir, no
// system config, no input shell, epmd not started by the VM (the test runs its
// own), distribution on loopback only.
std::vector<std::string> broker_env(const fs::path& dir, const std::string& node,
                                    uint16_t amqp, uint16_t dist, uint16_t epmd) {
  return {"HOME=" + (dir / "home").string(),
          "ERL_EPMD_PORT=" + std::to_string(epmd),
          "RABBITMQ_NODENAME=" + node,
          "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
          "RABBITMQ_NODE_PORT=" + std::to_string(amqp),
          "RABBITMQ_DIST_PORT=" + std::to_string(dist),
          "RABBITMQ_MNESIA_BASE=" + (dir / "mnesia").string(),
          "RABBITMQ_LOG_BASE=" + (dir / "log").string(),
          "RABBITMQ_CONFIG_FILE=" + (dir / "rabbitmq.conf").string(),
          "RABBITMQ_ADVANCED_CONFIG_FILE=" + (dir / "advanced.config").string(),
          "RABBITMQ_ENABLED_PLUGINS_FILE=" + (dir / "enabled_plugins").string(),
          "RABBITMQ_CONF_ENV_FILE=" + (dir / "rabbitmq-env.conf").string(),
          // Exec the VM directly (no signal-forwarding shell in between), without
          // its input shell.
          "RABBITMQ_ALLOW_INPUT=true",
          "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-noinput -start_epmd false "
          "-kernel inet_dist_use_interface {127,0,0,1}"};
}

}  // namespace

RabbitBroker::RabbitBroker(const fs::path& dir, std::optional<BrokerTls> tls) : dir_(dir) {
  fs::create_directories(dir_ / "home");
  fs::create_directories(dir_ / "mnesia");
  fs::create_directories(dir_ / "log");
  amqp_port_ = free_port();
  dist_port_ = free_port();
  epmd_port_ = free_port();
  node_name_ = "solstice-test-" + std::to_string(::getpid()) + "-" + std::to_string(amqp_port_) +
               "@localhost";
  std::string conf = "listeners.tcp.1 = 127.0.0.1:" + std::to_string(amqp_port_) +
                     "\nloopback_users = none\n";
  if (tls) {
    amqps_port_ = free_port();
    conf += "listeners.ssl.1 = 127.0.0.1:" + std::to_string(amqps_port_) +
            "\nssl_options.cacertfile = " + tls->ca.string() +
            "\nssl_options.certfile = " + tls->cert.string() +
            "\nssl_options.keyfile = " + tls->key.string() +
            "\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n";
  }
  write_text(dir_ / "rabbitmq.conf", conf);
  write_text(dir_ / "enabled_plugins", "[].\n");
  write_text(dir_ / "password", "guest\n");
  epmd_.emplace(fs::path("/usr/bin/epmd"),
                std::vector<std::string>{"-port", std::to_string(epmd_port_), "-address",
                                         "127.0.0.1"});
  REQUIRE_MESSAGE(epmd_->started(), epmd_->start_error);
  std::this_thread::sleep_for(300ms);
  start();
}

RabbitBroker::~RabbitBroker() {
  stop();
  if (epmd_) {
    epmd_->kill(SIGKILL);
    epmd_->wait_exit(10s);
  }
}

void RabbitBroker::start() {
  auto args = broker_env(dir_, node_name_, amqp_port_, dist_port_, epmd_port_);
  args.push_back("/usr/lib/rabbitmq/bin/rabbitmq-server");
  broker_.emplace(fs::path("/usr/bin/env"), args);
  REQUIRE_MESSAGE(broker_->started(), broker_->start_error);
  // The broker prints this once its listeners are up.
  REQUIRE_MESSAGE(broker_->wait_for_output("Starting broker... completed", 180s),
                  broker_->describe());
}

void RabbitBroker::stop() {
  if (!broker_)
    return;
  broker_->kill(SIGTERM);
  if (!broker_->wait_exit(30s)) {
    broker_->kill(SIGKILL);
    broker_->wait_exit(10s);
  }
  broker_.reset();
}

std::string RabbitBroker::url() const {
  return "amqp://guest@127.0.0.1:" + std::to_string(amqp_port_);
}

std::string RabbitBroker::amqps_url() const {
  // By name: rabbitmq-c checks the certificate's DNS names, not its IP addresses.
  return "amqps://guest@localhost:" + std::to_string(amqps_port_);
}

fs::path RabbitBroker::password_file() const { return dir_ / "password"; }

std::string RabbitBroker::ctl(const std::vector<std::string>& args) {
  auto argv = broker_env(dir_, node_name_, amqp_port_, dist_port_, epmd_port_);
  argv.push_back("/usr/lib/rabbitmq/bin/rabbitmqctl");
  argv.push_back("-n");
  argv.push_back(node_name_);
  argv.insert(argv.end(), args.begin(), args.end());
  RunnerProcess ctl{fs::path("/usr/bin/env"), argv};
  CHECK_MESSAGE(ctl.wait_exit(120s), ctl.describe());
  return ctl.out();
}

}  // namespace solstice::cluster_testing
