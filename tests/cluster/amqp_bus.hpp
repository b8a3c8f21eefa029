#pragma once
// What the AMQP tests share: a broker (one for the whole run, or a test's own
// when it stops and starts it), `node --amqp` and `submit --amqp` as real
// processes, and readers of what `submit --json` printed.
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/amqp/amqp_client.hpp"
#include "solstice.pb.h"
#include "tests/cluster/cluster_process.hpp"
#include "tests/cluster/rabbitmq_broker.hpp"

namespace solstice::cluster_testing {

// One TCG boot takes 5-40 s on a loaded 2-core host; four at once take longer.
inline constexpr auto job_limit = std::chrono::seconds(600);

// The broker the tests share (started on first use, with a TLS listener whose
// CA, server and client files are in tls_dir()); the tests that stop the broker
// start their own.
RabbitBroker& shared_broker();
std::filesystem::path shared_tls_dir();  // ca.pem, client.pem, client.key

class Bus {
 public:
  // On the shared broker (its runner queues emptied first), or on a broker of
  // its own.
  explicit Bus(bool own_broker = false);

  RabbitBroker& broker() { return *broker_; }
  const std::filesystem::path& dir() const { return dir_.path(); }
  std::vector<std::string> amqp_args() const;
  std::filesystem::path state_dir(const std::string& node) const;

  // Starts `node --amqp` and waits until it consumes; `extra` goes on its line.
  RunnerProcess& start_node(const std::string& name, unsigned slots,
                            std::vector<std::string> connection = {});
  RunnerProcess& node(const std::string& name) { return nodes_.at(name); }
  void forget_node(const std::string& name) { nodes_.erase(name); }
  std::filesystem::path job_file(const std::string& name, const std::string& json);
  RunnerProcess submit(const std::filesystem::path& job, bool json = true,
                       std::vector<std::string> connection = {});
  std::unique_ptr<amqp::Client> client();
  void stop_nodes();

 private:
  TempDir dir_;
  std::unique_ptr<RabbitBroker> own_;
  RabbitBroker* broker_ = nullptr;
  std::map<std::string, RunnerProcess> nodes_;
};

std::string job_json(const std::string& id, const std::string& script);
std::vector<v1::JobEvent> printed_events(const std::string& out);
std::string stdout_of_steps(const std::vector<v1::JobEvent>& events);
std::vector<v1::JobResult> results(const std::vector<v1::JobEvent>& events);
// Waits until a `submit --json` has shown `text` in a step's stdout.
bool wait_for_step_output(RunnerProcess& submit, const std::string& text,
                          std::chrono::seconds limit);
size_t count_of(const std::string& text, const std::string& needle);

}  // namespace solstice::cluster_testing
