// The guest walled off from the host (runtime/vm/guest_firewall.hpp): a step on the
// real test guest cannot connect to a listener on the host, neither through the
// gateway mapping (10.0.2.2 → the host's 127.0.0.1) nor through any of the host's
// own addresses, while it still reaches a server in a network namespace the test
// made to stand for "the internet". Needs root (the rules bind to QEMU's user, and
// the namespace needs root too).
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

#include "tests/reliability/harness.hpp"
#include "tests/reliability/qemu_wrappers.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

bool run_quietly(const std::vector<std::string>& argv) {
  auto program = Runner::start_program(argv);
  auto status = program.wait(30s);
  return status && !status->signaled && status->code == 0;
}

// An HTTP server answering every GET with `body`, bound to `address` port 0, started
// (optionally inside network namespace `netns`) and stopped by its PID (Runner's
// destructor). port() is what it bound.
class MarkerServer {
 public:
  MarkerServer(const std::string& netns, const std::string& address, const std::string& body) {
    std::vector<std::string> argv;
    if (!netns.empty()) argv = {"ip", "netns", "exec", netns};
    const std::string script =
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        b = sys.argv[2].encode() + b'\\n'\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(b)))\n"
        "        self.end_headers(); self.wfile.write(b)\n"
        "    def log_message(self, *a): pass\n"
        "s = http.server.HTTPServer((sys.argv[1], 0), H)\n"
        "print('port', s.server_address[1], flush=True)\n"
        "s.serve_forever()\n";
    for (const auto& arg : {std::string("python3"), std::string("-c"), script, address, body})
      argv.push_back(arg);
    server_.emplace(Runner::start_program(argv));
    REQUIRE_MESSAGE(server_->wait_until([&] { return contains(server_->out(), "\n"); }, 30s),
                    server_->output());
    port_ = std::stoi(server_->out().substr(server_->out().find("port ") + 5));
  }
  int port() const { return port_; }

 private:
  std::optional<Runner> server_;
  int port_ = 0;
};

// A network namespace joined to this host by a veth pair: the host side gets
// 10.213.N.1/30, the namespace side 10.213.N.2/30, so traffic from the host (QEMU's
// slirp among it) to 10.213.N.2 goes there as it would to the internet. Deleted by
// its own name at the end (which removes the veth pair).
class InternetNamespace {
 public:
  InternetNamespace() {
    const auto tag = std::to_string(::getpid() % 100000);
    name_ = "solstice-inet-" + tag;
    const std::string host_if = "sinh" + tag, ns_if = "sinn" + tag;
    const std::string net = "10.213." + std::to_string(::getpid() % 250) + ".";
    host_address_ = net + "1";
    address_ = net + "2";
    REQUIRE(run_quietly({"ip", "netns", "add", name_}));
    made_ = true;
    REQUIRE(run_quietly({"ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if,
                         "netns", name_}));
    REQUIRE(run_quietly({"ip", "addr", "add", host_address_ + "/30", "dev", host_if}));
    REQUIRE(run_quietly({"ip", "link", "set", host_if, "up"}));
    REQUIRE(run_quietly({"ip", "netns", "exec", name_, "ip", "addr", "add", address_ + "/30",
                         "dev", ns_if}));
    REQUIRE(run_quietly({"ip", "netns", "exec", name_, "ip", "link", "set", ns_if, "up"}));
    REQUIRE(run_quietly({"ip", "netns", "exec", name_, "ip", "link", "set", "lo", "up"}));
  }
  ~InternetNamespace() {
    if (made_) run_quietly({"ip", "netns", "delete", name_});
  }
  const std::string& name() const { return name_; }
  const std::string& address() const { return address_; }  // inside the namespace
  const std::string& host_address() const { return host_address_; }

 private:
  std::string name_, address_, host_address_;
  bool made_ = false;
};

// Every IPv4 address of this host's interfaces (the guest has IPv4 only).
std::vector<std::string> host_ipv4_addresses() {
  std::vector<std::string> found;
  ifaddrs* list = nullptr;
  REQUIRE(::getifaddrs(&list) == 0);
  for (auto* entry = list; entry; entry = entry->ifa_next) {
    if (!entry->ifa_addr || entry->ifa_addr->sa_family != AF_INET) continue;
    char text[INET_ADDRSTRLEN];
    auto* in = reinterpret_cast<sockaddr_in*>(entry->ifa_addr);
    ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    found.emplace_back(text);
  }
  ::freeifaddrs(list);
  return found;
}

// A step asking http://ADDRESS:PORT/ for each address (busybox nc: the test guest's
// static busybox wget crashes), printing "reached ADDRESS: <answer>" or
// "blocked ADDRESS".
std::string fetch_script(const std::vector<std::string>& addresses, int port) {
  std::string script;
  for (const auto& address : addresses)
    script += "if answer=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 " + address + " " +
              std::to_string(port) + " | tail -n 1) && [ -n \"$answer\" ]; then echo \"reached " +
              address + ": $answer\"; else echo \"blocked " + address + "\"; fi\n";
  return script;
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("guest network: a step reaches the internet namespace but no address of the host") {
  if (::geteuid() != 0) return;  // rules and namespaces need root
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  InternetNamespace internet;
  MarkerServer outside(internet.name(), internet.address(), "internet-answer");
  // One listener on every host address, 127.0.0.1 and the veth's host side included.
  MarkerServer host("", "0.0.0.0", "host-answer");

  std::vector<std::string> targets{"10.0.2.2"};  // slirp's gateway: the host's loopback
  for (const auto& address : host_ipv4_addresses())
    if (address.rfind("127.", 0) != 0) targets.push_back(address);  // guest's 127 is its own
  INFO("host targets: " << nlohmann::json(targets).dump());
  REQUIRE(targets.size() >= 3);  // the gateway, this host's own address, the veth side

  Sandbox sandbox;
  const std::string id = "walled-off";
  std::string script = fetch_script(targets, host.port()) +
                       fetch_script({internet.address()}, outside.port());
  auto job = sandbox.write_json("job.json", guest_job(id, {script}));
  auto config = write_runner_config(sandbox, nlohmann::json::object());
  auto runner = run_to_end(sandbox.run_args(job, "tcg", config), 600s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  const auto output = sandbox.step_output(id, 0);
  INFO(output);
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::SUCCEEDED);
  for (const auto& address : targets) {
    CHECK(contains(output, "blocked " + address + "\n"));
    CHECK_FALSE(contains(output, "host-answer"));
  }
  CHECK(contains(output, "reached " + internet.address() + ": internet-answer"));
  check_nothing_left(sandbox);
}

TEST_CASE("guest network: with qemu_user \"\" (no rules to bind) the gateway reaches the host, "
          "as the README warns") {
  // The control of the test above: the same step without the wall reaches the host,
  // so a "blocked" there is the wall's doing and not a broken step.
  if (::geteuid() != 0) return;
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  MarkerServer host("", "127.0.0.1", "host-answer");
  Sandbox sandbox;
  const std::string id = "not-walled";
  auto job = sandbox.write_json("job.json", guest_job(id, {fetch_script({"10.0.2.2"}, host.port())}));
  auto config = write_runner_config(sandbox, {{"qemu_user", ""}});
  auto runner = run_to_end(sandbox.run_args(job, "tcg", config), 600s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  CHECK(contains(sandbox.step_output(id, 0), "reached 10.0.2.2: host-answer"));
  CHECK(contains(runner.output(), "guests can reach services on this host"));
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
