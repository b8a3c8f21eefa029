#include "tests/cluster/amqp_bus.hpp"

#include <doctest/doctest.h>

#include <signal.h>

#include <cstdlib>
#include <sstream>

#include "runtime/job/event_log.hpp"

namespace solstice::cluster_testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// A CA, the broker's certificate (for 127.0.0.1) and a client's, made with openssl.
void make_tls_files(const fs::path& dir) {
  fs::create_directories(dir);
  const auto d = "'" + dir.string() + "'";
  const std::string script =
    "set -e; cd " + d +
    "; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key "
    "-out ca.pem -days 2 -subj '/CN=amqp test CA' 2>/dev/null"
    "; printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > server.ext"
    "; for name in server client; do"
    "  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $name.key "
    "  -out $name.csr -subj \"/CN=$name\" 2>/dev/null;"
    "  ext=; [ $name = server ] && ext='-extfile server.ext';"
    "  openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $name.pem "
    "  -days 2 $ext 2>/dev/null; done; chmod 644 *.key";
  auto path = dir / "make.sh";
  write_text(path, script + "\n");
  REQUIRE_MESSAGE(std::system(("/bin/sh '" + path.string() + "'").c_str()) == 0,
                  "making the TLS files failed");
}

struct SharedBroker {
  TempDir dir;
  std::unique_ptr<RabbitBroker> broker;
  SharedBroker() {
    make_tls_files(dir.path() / "tls");
    broker = std::make_unique<RabbitBroker>(
      dir.path() / "broker",
      BrokerTls{dir.path() / "tls" / "ca.pem", dir.path() / "tls" / "server.pem",
                dir.path() / "tls" / "server.key"});
  }
};

SharedBroker& shared() {
  static SharedBroker broker;
  return broker;
}

}  // namespace

RabbitBroker& shared_broker() { return *shared().broker; }
fs::path shared_tls_dir() { return shared().dir.path() / "tls"; }

Bus::Bus(bool own_broker) {
  if (own_broker) {
    own_ = std::make_unique<RabbitBroker>(dir_.path() / "broker");
    broker_ = own_.get();
    return;
  }
  broker_ = &shared_broker();
  // What an earlier test left in the runner's queues is not this test's.
  auto c = client();
  amqp::Names names;
  for (const auto& queue : {names.jobs_queue, names.dead_letter_queue, names.results_queue})
    REQUIRE(c->delete_queue(queue));
}

std::vector<std::string> Bus::amqp_args() const {
  return {"--amqp", broker_->url(), "--amqp-password-file", broker_->password_file().string()};
}

fs::path Bus::state_dir(const std::string& node) const { return dir_.path() / ("state-" + node); }

RunnerProcess& Bus::start_node(const std::string& name, unsigned slots,
                               std::vector<std::string> connection) {
  std::vector<std::string> args{"node", "--name", name, "--slots", std::to_string(slots),
                                "--memory-mib", "4096", "--state-dir",
                                state_dir(name).string(), "--accel", "tcg"};
  if (connection.empty())
    connection = amqp_args();
  args.insert(args.end(), connection.begin(), connection.end());
  auto [i, added] = nodes_.emplace(name, RunnerProcess{args});
  REQUIRE_MESSAGE(i->second.wait_for_output("takes jobs from queue", 60s), i->second.describe());
  return i->second;
}

fs::path Bus::job_file(const std::string& name, const std::string& json) {
  auto path = dir_.path() / (name + ".json");
  write_text(path, json);
  return path;
}

RunnerProcess Bus::submit(const fs::path& job, bool json, std::vector<std::string> connection) {
  std::vector<std::string> args{"submit"};
  if (connection.empty())
    connection = amqp_args();
  args.insert(args.end(), connection.begin(), connection.end());
  args.push_back(job.string());
  if (json)
    args.push_back("--json");
  return RunnerProcess{args};
}

std::unique_ptr<amqp::Client> Bus::client() {
  auto client = amqp::Client::connect(amqp::Endpoint{broker_->url(), "guest", {}, {}, {}}, 30s);
  REQUIRE_MESSAGE(client, client.error().message);
  REQUIRE((*client)->declare(amqp::Names{}));
  return std::move(*client);
}

void Bus::stop_nodes() {
  for (auto& [name, node] : nodes_) {
    node.kill(SIGTERM);
    CHECK_MESSAGE(node.wait_exit(60s), node.describe());
  }
}

std::string job_json(const std::string& id, const std::string& script) {
  std::string quoted;
  for (char c : script) {
    if (c == '"' || c == '\\')
      quoted += '\\';
    quoted += c == '\n' ? std::string{"\\n"} : std::string(1, c);
  }
  return "{\"id\": \"" + id + "\", \"name\": \"" + id +
         "\", \"runs_on\": \"solstice-test-guest\", \"steps\": [{\"name\": \"work\", "
         "\"script\": \"" +
         quoted + "\"}]}";
}

std::vector<v1::JobEvent> printed_events(const std::string& out) {
  std::vector<v1::JobEvent> events;
  std::istringstream lines{out};
  std::string line;
  while (std::getline(lines, line))
    if (!line.empty() && line.front() == '{')
      if (auto event = event_from_json_line(line))
        events.push_back(*event);
  return events;
}

std::string stdout_of_steps(const std::vector<v1::JobEvent>& events) {
  std::string text;
  for (const auto& event : events)
    if (event.has_output() && event.output().stream() == v1::STDOUT)
      text += event.output().data();
  return text;
}

std::vector<v1::JobResult> results(const std::vector<v1::JobEvent>& events) {
  std::vector<v1::JobResult> out;
  for (const auto& event : events)
    if (event.has_result())
      out.push_back(event.result());
  return out;
}

bool wait_for_step_output(RunnerProcess& submit, const std::string& text,
                          std::chrono::seconds limit) {
  auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    if (stdout_of_steps(printed_events(submit.out())).find(text) != std::string::npos)
      return true;
    if (submit.wait_exit(200ms))
      return false;
  }
  return false;
}

size_t count_of(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
    ++n;
  return n;
}

}  // namespace solstice::cluster_testing
