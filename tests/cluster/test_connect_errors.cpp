// `submit` and `status` to a port where nothing listens: a plain sentence naming
// HOST:PORT, not CAF's system_error(...) text. No coordinator, no guest needed.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tests/cluster/cluster_process.hpp"

using namespace solstice::cluster_testing;
using namespace std::chrono_literals;

namespace {

// A port on 127.0.0.1 that is bound but not listening (so nobody else gets it
// while the test runs): connections to it are refused.
struct RefusingPort {
  int fd = -1;
  int port = 0;
  RefusingPort() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    socklen_t len = sizeof addr;
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    port = ntohs(addr.sin_port);
  }
  ~RefusingPort() { ::close(fd); }
};

}  // namespace

TEST_CASE("submit and status to a port where nothing listens say so plainly") {
  RefusingPort closed;
  TempDir dir;
  const auto where = "127.0.0.1:" + std::to_string(closed.port);
  const auto job = dir.path() / "job.json";
  write_text(job, R"({"runs_on": "solstice-test-guest", "steps": [{"script": "true"}]})");
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"status", "--to", where, "--insecure"},
        std::vector<std::string>{"submit", job.string(), "--to", where, "--insecure"}}) {
    RunnerProcess runner(args);
    REQUIRE_MESSAGE(runner.started(), runner.start_error);
    REQUIRE_MESSAGE(runner.wait_exit(30s), runner.describe());
    INFO(args[0] << ": " << runner.describe());
    CHECK(runner.exit_code() != 0);
    CHECK(runner.err().find("cannot connect to " + where + ": nothing accepts connections there") !=
          std::string::npos);
    CHECK(runner.err().find("system_error") == std::string::npos);
  }
}
