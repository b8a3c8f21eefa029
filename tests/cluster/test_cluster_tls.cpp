// The cluster's network security, with real processes on 127.0.0.1: mutual TLS
// against the cluster's CA (certificates made with the openssl CLI in the test's
// temporary directory), refusal of peers with a certificate from another CA and
// of plaintext peers, and refusal of peers speaking another protocol version.
#include <doctest/doctest.h>

#include <csignal>
#include <cstdlib>
#include <set>
#include <string>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/publish.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include "actors/cluster/coordinator.hpp"
#include "actors/host/cluster_cli.hpp"
#include "actors/runner_types.hpp"
#include "tests/cluster/cluster_process.hpp"

using namespace solstice;
using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// Two CAs; the coordinator, a node and a client signed by the first, a rogue
// peer signed by the second; `both.pem` trusts both CAs (so the rogue peer
// accepts the coordinator and only the coordinator's check can refuse it).
void make_certificates(const fs::path& dir) {
  auto script = R"(set -e
cd ")" + dir.string() + R"("
ca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$1.key" -out "$1.pem" -days 2 -subj "/CN=$1"; }
cert() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
  echo "subjectAltName=URI:solstice:role/$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
  -out "$1.pem" -days 2 -extfile "$1.ext"; }
ca cluster-ca; ca other-ca
cert coordinator cluster-ca coordinator; cert trusted-node cluster-ca node
cert client cluster-ca submitter; cert rogue-node other-ca node
cat cluster-ca.pem other-ca.pem > both.pem
)";
  write_text(dir / "make-certs.sh", script);
  auto command = "sh '" + (dir / "make-certs.sh").string() + "' >'" +
                 (dir / "make-certs.log").string() + "' 2>&1";
  REQUIRE_MESSAGE(std::system(command.c_str()) == 0, "openssl failed, see make-certs.log");
}

std::vector<std::string> tls_args(const fs::path& dir, const std::string& who,
                                  const std::string& ca = "cluster-ca") {
  return {"--cert", (dir / (who + ".pem")).string(), "--key", (dir / (who + ".key")).string(),
          "--ca", (dir / (ca + ".pem")).string()};
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST_CASE("TLS: peers with certificates from the cluster's CA run a job; a node or client with "
          "a certificate from another CA, or without TLS, is refused with a clear error") {
  TempDir dir;
  make_certificates(dir.path());
  auto& d = dir.path();

  RunnerProcess coordinator{concat({"coordinator", "--listen", "127.0.0.1:0"},
                                   tls_args(d, "coordinator"))};
  auto endpoint = coordinator_endpoint(coordinator, 20s);
  REQUIRE_MESSAGE(endpoint, coordinator.describe());
  CHECK(coordinator.out().find("TLS") != std::string::npos);

  RunnerProcess node{concat({"node", "--join", *endpoint, "--name", "trusted-node", "--slots", "1",
                             "--memory-mib", "2048", "--state-dir", (d / "state").string(),
                             "--accel", "tcg"},
                            tls_args(d, "trusted-node"))};
  REQUIRE_MESSAGE(node.wait_for_output("joined the coordinator", 30s), node.describe());

  // A node whose certificate comes from another CA never joins.
  RunnerProcess rogue_node{concat({"node", "--join", *endpoint, "--name", "rogue-node",
                                   "--state-dir", (d / "rogue-state").string()},
                                  tls_args(d, "rogue-node", "both"))};
  CHECK_MESSAGE(rogue_node.wait_for_output("closed the connection during the handshake", 20s),
                rogue_node.describe());
  CHECK(rogue_node.out().find("joined") == std::string::npos);

  SUBCASE("a client signed by the cluster's CA sees the trusted node only") {
    RunnerProcess status{concat({"status", "--to", *endpoint}, tls_args(d, "client"))};
    REQUIRE_MESSAGE(status.wait_exit(30s), status.describe());
    CHECK_MESSAGE(status.exit_code() == 0, status.describe());
    CHECK(status.out().find("1 node(s)") != std::string::npos);
    CHECK(status.out().find("trusted-node") != std::string::npos);
    CHECK(status.out().find("rogue-node") == std::string::npos);
  }

  SUBCASE("a client with a certificate from another CA is refused, at once") {
    RunnerProcess status{concat({"status", "--to", *endpoint}, tls_args(d, "rogue-node", "both"))};
    REQUIRE_MESSAGE(status.wait_exit(30s), status.describe());
    CHECK_MESSAGE(status.exit_code() == 125, status.describe());
    CHECK_MESSAGE(status.err().find("closed the connection during the handshake") !=
                    std::string::npos,
                  status.describe());
    CHECK(status.out().find("trusted-node") == std::string::npos);
  }

  SUBCASE("a certificate the client's own CA does not sign is caught before connecting") {
    RunnerProcess status{concat({"status", "--to", *endpoint}, tls_args(d, "rogue-node"))};
    REQUIRE_MESSAGE(status.wait_exit(30s), status.describe());
    CHECK_MESSAGE(status.exit_code() == 2, status.describe());
    CHECK_MESSAGE(status.err().find("is not accepted by --ca") != std::string::npos,
                  status.describe());
  }

  SUBCASE("a plaintext client is refused; TLS without files is refused before connecting") {
    RunnerProcess plain{{"status", "--to", *endpoint, "--insecure"}};
    REQUIRE_MESSAGE(plain.wait_exit(30s), plain.describe());
    CHECK_MESSAGE(plain.exit_code() == 125, plain.describe());
    CHECK_MESSAGE(plain.err().find("requires TLS") != std::string::npos, plain.describe());
    RunnerProcess bare{{"status", "--to", *endpoint}};
    REQUIRE_MESSAGE(bare.wait_exit(30s), bare.describe());
    CHECK_MESSAGE(bare.exit_code() == 2, bare.describe());
    CHECK_MESSAGE(bare.err().find("--insecure") != std::string::npos, bare.describe());
  }

  SUBCASE("a job submitted over TLS runs on the trusted node") {
    auto job = d / "job.json";
    write_text(job, R"({"name": "over tls", "runs_on": "solstice-test-guest",
                        "steps": [{"name": "hello", "script": "echo hello-over-tls"}]})");
    RunnerProcess submit{concat({"submit", "--to", *endpoint, job.string()}, tls_args(d, "client"))};
    REQUIRE_MESSAGE(submit.wait_exit(420s), submit.describe());
    CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
    CHECK(submit.out().find("dispatched to node trusted-node") != std::string::npos);
    CHECK(submit.out().find("hello-over-tls") != std::string::npos);
  }

  // Peers that came and went (refused or not) never cost the trusted node its
  // connection: give its next heartbeats time to arrive, then look.
  std::this_thread::sleep_for(2500ms);
  CHECK_MESSAGE(node.err().find("lost the coordinator") == std::string::npos, node.describe());
  CHECK_MESSAGE(coordinator.out().find("lost") == std::string::npos, coordinator.describe());

  rogue_node.kill(SIGTERM);
  CHECK_MESSAGE(rogue_node.wait_exit(30s), rogue_node.describe());
  node.kill(SIGTERM);
  CHECK_MESSAGE(node.wait_exit(60s), node.describe());
  coordinator.kill(SIGTERM);
  CHECK_MESSAGE(coordinator.wait_exit(20s), coordinator.describe());
}

namespace {

// An actor system that speaks another version of the cluster protocol.
struct OtherVersionConfig : caf::actor_system_config {
  OtherVersionConfig() {
    add_runner_types(*this);
    load<caf::io::middleman>();
    set("middleman.app-identifiers", std::vector<std::string>{"solstice-runner-cluster-0"});
  }
};

}  // namespace

TEST_CASE("peers speaking another protocol version are refused with a clear error") {
  REQUIRE(std::string{cluster_protocol} != "solstice-runner-cluster-0");
  OtherVersionConfig cfg;
  caf::actor_system sys{cfg};

  SUBCASE("a client of this version refuses a coordinator of another") {
    auto old_coordinator = sys.spawn(coordinator, coordinator_options{});
    auto port = caf::io::publish(old_coordinator, 0, "127.0.0.1");
    REQUIRE_MESSAGE(port, sys.render(port.error()));
    RunnerProcess status{{"status", "--to", "127.0.0.1:" + std::to_string(*port), "--insecure"}};
    REQUIRE_MESSAGE(status.wait_exit(30s), status.describe());
    CHECK_MESSAGE(status.exit_code() == 125, status.describe());
    CHECK_MESSAGE(status.err().find("speaks another cluster protocol version") != std::string::npos,
                  status.describe());
    caf::anon_send_exit(old_coordinator, caf::exit_reason::user_shutdown);
  }

  SUBCASE("a peer of another version refuses a coordinator of this version") {
    RunnerProcess current{{"coordinator", "--listen", "127.0.0.1:0", "--insecure"}};
    auto endpoint = coordinator_endpoint(current, 20s);
    REQUIRE_MESSAGE(endpoint, current.describe());
    auto port = static_cast<uint16_t>(std::stoul(endpoint->substr(endpoint->rfind(':') + 1)));
    caf::error refused;
    {
      caf::scoped_actor self{sys};
      self->request(sys.middleman().actor_handle(), std::chrono::milliseconds(20s),
                    caf::connect_atom::value, std::string{"127.0.0.1"}, port)
        .receive([](const caf::node_id&, caf::strong_actor_ptr&,
                    const std::set<std::string>&) {},
                 [&](caf::error& err) { refused = std::move(err); });
    }
    CHECK_MESSAGE(refused == caf::sec::incompatible_application_ids, sys.render(refused));
    current.kill(SIGTERM);
    CHECK(current.wait_exit(20s));
  }
}
