// Just over 500 lines: its three cases (who may do what) share the raw TLS peer
// and the coordinator helpers above them; split, each part would repeat them.
// Cluster roles from certificates, enforced by a real TLS coordinator process
// per message: a real node (node-1) runs submitter alice's job on the test
// guest while bob (another submitter), an operator and a second node (node-2)
// try what their roles do not allow. The peers that misbehave are in-process
// CAF clients holding the real certificates (a well-behaved `solstice-runner`
// would not even try).
// A little over 500 lines: one shared cluster (coordinator, node, guest job) serves
// every refusal case, and splitting it would boot that cluster once per file.
#include <doctest/doctest.h>

#include <csignal>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include <openssl/ssl.h>

#include <caf/actor_system.hpp>
#include <caf/binary_serializer.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/openssl/remote_actor.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include "actors/actors.hpp"
#include "actors/host/cluster_cli.hpp"
#include "actors/runner_types.hpp"
#include "tests/cluster/cluster_clients.hpp"
#include "tests/cluster/cluster_process.hpp"

using namespace solstice;
using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

void make_role_certificates(const fs::path& dir) {
  auto script = "set -e\n"
                "sh '" SOLSTICE_SOURCE_DIR "/deploy/examples/make-cluster-certs.sh' '" +
                dir.string() +
                "' coordinator:coordinator node:node-1 node:node-2 submitter:alice "
                "submitter:bob operator:ops\n";
  write_text(dir / "make-certs.sh", script);
  auto command = "sh '" + (dir / "make-certs.sh").string() + "' >'" +
                 (dir / "make-certs.log").string() + "' 2>&1";
  REQUIRE_MESSAGE(std::system(command.c_str()) == 0, "make-cluster-certs.sh failed");
}

std::vector<std::string> tls_args(const fs::path& dir, const std::string& who) {
  return {"--cert", (dir / (who + ".pem")).string(), "--key", (dir / (who + ".key")).string(),
          "--ca", (dir / "cluster-ca.pem").string()};
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A node that runs nothing: it keeps the relay of the job dispatched to it.
struct FakeNodeState {
  std::mutex mutex;
  std::optional<event_sink_actor> relay;
  std::string job_id;
};

runner_node_actor::behavior_type fake_node(runner_node_actor::pointer,
                                           std::shared_ptr<FakeNodeState> state) {
  return {
    [state](run_job_atom, const v1::JobSpec& spec, event_sink_actor sink) {
      std::lock_guard<std::mutex> lock{state->mutex};
      state->relay = std::move(sink);
      state->job_id = spec.id();
      return ok_atom::value;
    },
    [](cancel_atom, const std::string&) {},
    [](stop_atom) {},
    [](event_atom, v1::JobEvent&) {},
  };
}

// One peer process's worth of CAF: its own actor system with its certificate.
struct Peer {
  ClientConfig cfg;
  caf::actor_system sys;
  coordinator_actor coordinator;

  Peer(const fs::path& dir, const std::string& who, const std::string& endpoint)
      : cfg(dir, who), sys(cfg) {
    auto port = static_cast<uint16_t>(std::stoul(endpoint.substr(endpoint.rfind(':') + 1)));
    auto found = caf::openssl::remote_actor<coordinator_actor>(sys, "127.0.0.1", port);
    REQUIRE_MESSAGE(found, who << ": " << sys.render(found.error()));
    coordinator = *found;
  }

  // "" when the coordinator answers ok, else its error's text.
  template <class... Ts>
  std::string ask(Ts&&... xs) {
    caf::scoped_actor self{sys};
    std::string problem;
    self->request(coordinator, std::chrono::milliseconds(20s), std::forward<Ts>(xs)...)
      .receive([](ok_atom) {}, [&](caf::error& err) { problem = sys.render(err); });
    return problem;
  }

  cluster_status status() {
    caf::scoped_actor self{sys};
    cluster_status result;
    self->request(coordinator, std::chrono::milliseconds(20s), status_atom::value)
      .receive([&](cluster_status& s) { result = std::move(s); },
               [&](caf::error& err) { FAIL("status: " << sys.render(err)); });
    return result;
  }

  std::string submit(const v1::JobSpec& spec, const event_sink_actor& sink) {
    caf::scoped_actor self{sys};
    std::string id;
    self->request(coordinator, std::chrono::milliseconds(20s), submit_atom::value, spec, sink)
      .receive([&](std::string& job_id) { id = job_id; },
               [&](caf::error& err) { FAIL("submit: " << sys.render(err)); });
    return id;
  }
};

bool lists_job(const cluster_status& status, const std::string& job_id) {
  for (const auto* list : {&status.queued, &status.running})
    for (const auto& job : *list)
      if (job.job_id == job_id)
        return true;
  return false;
}

bool lists_node(const cluster_status& status, const std::string& name) {
  for (const auto& node : status.nodes)
    if (node.offer.name == name)
      return true;
  return false;
}

// A TLS connection that speaks raw BASP (CAF 0.17.6's wire protocol), as a
// hostile peer would: it can claim any node id and route messages.
class RawPeer {
 public:
  RawPeer(const fs::path& dir, const std::string& who, uint16_t port) {
    ctx_ = SSL_CTX_new(TLS_client_method());
    REQUIRE(SSL_CTX_use_certificate_chain_file(ctx_, (dir / (who + ".pem")).c_str()) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey_file(ctx_, (dir / (who + ".key")).c_str(), SSL_FILETYPE_PEM) ==
            1);
    REQUIRE(SSL_CTX_load_verify_locations(ctx_, (dir / "cluster-ca.pem").c_str(), nullptr) == 1);
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    timeval timeout{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    ssl_ = SSL_new(ctx_);
    SSL_set_fd(ssl_, fd_);
    REQUIRE(SSL_connect(ssl_) == 1);
  }
  ~RawPeer() {
    SSL_free(ssl_);
    ::close(fd_);
    SSL_CTX_free(ctx_);
  }

  // The coordinator's node id, from its server handshake (the payload starts
  // with it: an 8-byte implementation id, a 4-byte process id, a 20-byte host id).
  std::string coordinator_node_id() {
    std::string header, payload;
    REQUIRE(read_exact(header, 32));
    REQUIRE(header[0] == 0);
    REQUIRE(read_exact(payload, be32(header.data() + 4)));
    return payload.substr(0, 32);
  }

  bool send(uint8_t operation, const std::string& payload) {
    std::string message(32, '\0');
    message[0] = static_cast<char>(operation);
    for (int i = 0; i < 4; ++i)
      message[4 + i] = static_cast<char>(payload.size() >> (8 * (3 - i)) & 0xff);
    message += payload;
    return SSL_write(ssl_, message.data(), static_cast<int>(message.size())) ==
           static_cast<int>(message.size());
  }

  // Whether the coordinator closes the connection within `wait` (reading on
  // through its heartbeats meanwhile).
  bool closed_within(std::chrono::milliseconds wait) {
    auto deadline = Clock::now() + wait;
    while (Clock::now() < deadline) {
      char buffer[4096];
      errno = 0;
      int got = SSL_read(ssl_, buffer, sizeof buffer);
      if (got <= 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        return true;
    }
    return false;
  }

 private:
  static size_t be32(const char* data) {
    size_t value = 0;
    for (int i = 0; i < 4; ++i)
      value = value << 8 | static_cast<uint8_t>(data[i]);
    return value;
  }
  bool read_exact(std::string& out, size_t size) {
    auto deadline = Clock::now() + 20s;
    while (out.size() < size && Clock::now() < deadline) {
      char buffer[4096];
      int got = SSL_read(ssl_, buffer, static_cast<int>(std::min(size - out.size(), sizeof buffer)));
      if (got > 0)
        out.append(buffer, static_cast<size_t>(got));
      else if (errno != EAGAIN && errno != EWOULDBLOCK)
        return false;
    }
    return out.size() == size;
  }

  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
};

std::string serialized_node_id(caf::actor_system& sys) {
  std::vector<char> out;
  caf::binary_serializer sink{sys, out};
  auto node = sys.node();
  REQUIRE(!sink(node));
  return std::string{out.begin(), out.end()};
}

}  // namespace

TEST_CASE("a peer cannot speak for another: a connection that claims the coordinator's or another "
          "peer's node id, or routes a message, is closed and logged") {
  TempDir dir;
  auto& d = dir.path();
  make_role_certificates(d);
  RunnerProcess coordinator{
    concat({"coordinator", "--listen", "127.0.0.1:0"}, tls_args(d, "coordinator"))};
  auto endpoint = coordinator_endpoint(coordinator, 20s);
  REQUIRE_MESSAGE(endpoint, coordinator.describe());
  auto port = static_cast<uint16_t>(std::stoul(endpoint->substr(endpoint->rfind(':') + 1)));

  // node-2 joins properly; its node id is what a thief would claim (node ids
  // are guessable: host hash, process id, a counter).
  Peer node2{d, "node-2", *endpoint};
  EndActors end;
  auto node2_actor = end(node2.sys.spawn(fake_node, std::make_shared<FakeNodeState>()));
  node_offer offer;
  offer.name = "node-2";
  REQUIRE(node2.ask(join_atom::value, offer, node2_actor).empty());
  auto victim = serialized_node_id(node2.sys);
  REQUIRE(victim.size() == 32);

  SUBCASE("the coordinator's own node id") {
    RawPeer thief{d, "alice", port};
    auto own = thief.coordinator_node_id();
    REQUIRE(thief.send(1, own));
    CHECK(thief.closed_within(10s));
    CHECK_MESSAGE(coordinator.wait_for_output("closed the connection of submitter alice: its "
                                              "handshake claims the coordinator's own node id",
                                              10s),
                  coordinator.describe());
  }

  SUBCASE("another peer's node id") {
    RawPeer thief{d, "alice", port};
    thief.coordinator_node_id();
    REQUIRE(thief.send(1, victim));
    CHECK(thief.closed_within(10s));
    CHECK_MESSAGE(coordinator.wait_for_output(
                    "closed the connection of submitter alice: it claims the node id of node "
                    "node-2",
                    10s),
                  coordinator.describe());
  }

  SUBCASE("an honest handshake stays; a routed message closes it") {
    RawPeer peer{d, "alice", port};
    peer.coordinator_node_id();
    auto own_id = victim;
    own_id[9] ^= 0x5a;  // another process id: a node id nobody holds
    REQUIRE(peer.send(1, own_id));
    CHECK_FALSE(peer.closed_within(3s));
    REQUIRE(peer.send(3, victim + std::string(32, '\0')));
    CHECK(peer.closed_within(10s));
    CHECK_MESSAGE(coordinator.wait_for_output("closed the connection of submitter alice: it "
                                              "routes a message through the coordinator",
                                              10s),
                  coordinator.describe());
  }

  // The victim was not disturbed.
  std::this_thread::sleep_for(1s);
  Peer ops{d, "ops", *endpoint};
  CHECK(lists_node(ops.status(), "node-2"));
  coordinator.kill(SIGTERM);
  CHECK_MESSAGE(coordinator.wait_exit(20s), coordinator.describe());
}

TEST_CASE("roles from certificates: submitters see, follow and cancel only their own jobs, only "
          "nodes join under their own names and report only on their own dispatches, an "
          "operator sees all") {
  TempDir dir;
  auto& d = dir.path();
  make_role_certificates(d);

  RunnerProcess coordinator{
    concat({"coordinator", "--listen", "127.0.0.1:0"}, tls_args(d, "coordinator"))};
  auto endpoint = coordinator_endpoint(coordinator, 20s);
  REQUIRE_MESSAGE(endpoint, coordinator.describe());
  // No --name: a node is named by its certificate.
  RunnerProcess node{concat({"node", "--join", *endpoint, "--slots", "1", "--memory-mib", "2048",
                             "--state-dir", (d / "state").string(), "--accel", "tcg"},
                            tls_args(d, "node-1"))};
  REQUIRE_MESSAGE(node.wait_for_output("node node-1 joined the coordinator", 30s), node.describe());

  Peer alice{d, "alice", *endpoint};
  Peer bob{d, "bob", *endpoint};
  Peer ops{d, "ops", *endpoint};
  Peer node2{d, "node-2", *endpoint};
  EndActors end;

  // Alice's job runs on node-1 (a real guest) for as long as the test needs.
  auto alice_events = std::make_shared<Received>();
  auto alice_sink = end(alice.sys.spawn(collector, alice_events));
  v1::JobSpec job;
  job.set_name("alice's");
  job.set_runs_on("solstice-test-guest");
  job.add_steps()->set_script("echo alice-started; sleep 3600");
  auto job_id = alice.submit(job, alice_sink);
  REQUIRE(!job_id.empty());
  REQUIRE_MESSAGE(alice_events->wait_for(
                    [](const v1::JobEvent& e) {
                      return e.has_notice() &&
                             e.notice().message().find("dispatched to node node-1") !=
                               std::string::npos;
                    },
                    60s),
                  coordinator.describe());

  // Seeing: alice and the operator see the job, bob does not.
  CHECK(lists_job(alice.status(), job_id));
  CHECK(lists_job(ops.status(), job_id));
  CHECK_FALSE(lists_job(bob.status(), job_id));
  CHECK(lists_node(bob.status(), "node-1"));

  // Following: bob is refused, the operator may.
  auto bob_events = std::make_shared<Received>();
  auto bob_sink = end(bob.sys.spawn(collector, bob_events));
  CHECK(bob.ask(follow_atom::value, job_id, bob_sink).find("refused") != std::string::npos);
  auto ops_events = std::make_shared<Received>();
  auto ops_sink = end(ops.sys.spawn(collector, ops_events));
  CHECK(ops.ask(follow_atom::value, job_id, ops_sink).empty());

  // Cancelling: bob's cancel changes nothing.
  {
    caf::scoped_actor self{bob.sys};
    self->send(bob.coordinator, cancel_atom::value, job_id);
  }
  REQUIRE_MESSAGE(coordinator.wait_for_output("refused a cancel from submitter bob", 20s),
                  coordinator.describe());

  // Joining: a submitter cannot join as a node; node-2 cannot take node-1's name.
  auto fake = std::make_shared<FakeNodeState>();
  auto alice_node = end(alice.sys.spawn(fake_node, fake));
  node_offer offer;
  offer.name = "alice-node";
  offer.labels["solstice-test-guest"] = 512;
  CHECK(alice.ask(join_atom::value, offer, alice_node).find("refused") != std::string::npos);
  auto node2_actor = end(node2.sys.spawn(fake_node, fake));
  offer.name = "node-1";
  auto stolen = node2.ask(join_atom::value, offer, node2_actor);
  CHECK_MESSAGE(stolen.find("not its certificate's name") != std::string::npos, stolen);
  auto seen = ops.status();
  CHECK_FALSE(lists_node(seen, "alice-node"));
  REQUIRE(seen.running.size() == 1);
  CHECK(seen.running[0].job_id == job_id);
  CHECK(seen.running[0].node == "node-1");

  // Forging: node-2 relays a result for alice's dispatch straight to the coordinator.
  v1::JobEvent forged;
  forged.set_job_id(job_id);
  forged.set_sequence(1000);
  forged.mutable_result()->set_status(v1::SUCCEEDED);
  {
    caf::scoped_actor self{node2.sys};
    self->send(node2.coordinator, relay_atom::value, uint64_t{1}, forged);
  }
  REQUIRE_MESSAGE(coordinator.wait_for_output("refused a relayed event from node node-2", 20s),
                  coordinator.describe());

  // node-2, joined under its own name, gets a job of its own; its relay takes
  // nothing out of sequence, and whatever job id its events name, they are its
  // own job's.
  offer.name = "node-2";
  offer.labels = {{"node-2-only", 512}};
  REQUIRE(node2.ask(join_atom::value, offer, node2_actor).empty());
  auto second_events = std::make_shared<Received>();
  auto second_sink = end(alice.sys.spawn(collector, second_events));
  v1::JobSpec second;
  second.set_runs_on("node-2-only");
  second.add_steps()->set_script("true");
  auto second_id = alice.submit(second, second_sink);
  auto deadline = Clock::now() + 20s;
  std::optional<event_sink_actor> relay;
  while (!relay && Clock::now() < deadline) {
    std::this_thread::sleep_for(100ms);
    std::lock_guard<std::mutex> lock{fake->mutex};
    relay = fake->relay;
  }
  REQUIRE(relay);
  {
    caf::scoped_actor self{node2.sys};
    self->send(*relay, event_atom::value, forged);  // sequence 1000: refused
  }
  REQUIRE_MESSAGE(coordinator.wait_for_output("out of sequence", 20s), coordinator.describe());
  CHECK_FALSE(second_events->has_result());
  forged.set_sequence(0);
  {
    caf::scoped_actor self{node2.sys};
    self->send(*relay, event_atom::value, forged);  // in sequence, names alice's other job
  }
  REQUIRE(second_events->wait_for([](const v1::JobEvent& e) { return e.has_result(); }, 20s));
  std::this_thread::sleep_for(1s);
  CHECK_FALSE(alice_events->has_result());
  CHECK(lists_job(ops.status(), job_id));

  // The operator sees every job and may cancel any: alice's job ends cancelled,
  // and both alice and the operator's follower see it; bob sees nothing.
  {
    caf::scoped_actor self{ops.sys};
    self->send(ops.coordinator, cancel_atom::value, job_id);
  }
  auto cancelled = [](const v1::JobEvent& e) {
    return e.has_result() && e.result().status() == v1::CANCELLED;
  };
  CHECK_MESSAGE(alice_events->wait_for(cancelled, 120s), coordinator.describe());
  CHECK(ops_events->wait_for(cancelled, 10s));
  CHECK(bob_events->events.empty());

  // Every refusal is logged with the peer's name.
  auto log = coordinator.out() + coordinator.err();
  CHECK(log.find("refused a follow from submitter bob") != std::string::npos);
  CHECK(log.find("refused a join from submitter alice") != std::string::npos);
  CHECK(log.find("refused a join from node node-2") != std::string::npos);

  node.kill(SIGTERM);
  CHECK_MESSAGE(node.wait_exit(60s), node.describe());
  coordinator.kill(SIGTERM);
  CHECK_MESSAGE(coordinator.wait_exit(20s), coordinator.describe());
}

// The other direction: a client (node, submitter, status, follow) talks only to a
// peer whose certificate has the coordinator role. An impostor with a cluster
// certificate of another role (a submitter's stolen key, say) learns no job and
// gets no node.
TEST_CASE("nodes and clients refuse a peer whose certificate is not a coordinator's") {
  TempDir dir;
  auto& d = dir.path();
  make_role_certificates(d);
  RunnerProcess impostor{concat({"coordinator", "--listen", "127.0.0.1:0"}, tls_args(d, "alice"))};
  auto endpoint = coordinator_endpoint(impostor, 20s);
  REQUIRE_MESSAGE(endpoint, impostor.describe());
  const std::string why = "is not a coordinator: its certificate 'alice' has the submitter role";

  RunnerProcess status{concat({"status", "--to", *endpoint}, tls_args(d, "ops"))};
  REQUIRE_MESSAGE(status.wait_exit(60s), status.describe());
  CHECK_MESSAGE(status.exit_code() != 0, status.describe());
  CHECK_MESSAGE(status.err().find(why) != std::string::npos, status.describe());

  RunnerProcess follow{concat({"follow", "--coordinator", *endpoint, "some-job"}, tls_args(d, "ops"))};
  REQUIRE_MESSAGE(follow.wait_exit(60s), follow.describe());
  CHECK_MESSAGE(follow.exit_code() != 0, follow.describe());
  CHECK_MESSAGE(follow.err().find(why) != std::string::npos, follow.describe());

  // A node keeps trying (the real coordinator may come back), and never joins.
  RunnerProcess node{concat({"node", "--join", *endpoint, "--slots", "1", "--state-dir",
                             (d / "state").string(), "--accel", "tcg"},
                            tls_args(d, "node-1"))};
  CHECK_MESSAGE(node.wait_for_output(why, 60s), node.describe());
  CHECK(node.err().find("joined the coordinator") == std::string::npos);
  node.kill(SIGTERM);
  CHECK_MESSAGE(node.wait_exit(30s), node.describe());
  impostor.kill(SIGTERM);
  CHECK_MESSAGE(impostor.wait_exit(20s), impostor.describe());
}
