// Remote jobs are self-contained: `submit` packs each upload's bytes into the job
// (at most 16 MiB in all), a submitted job names its image by label only, and a
// node refuses any job from the network that names a path on the node. Real
// coordinator and node processes on 127.0.0.1; the byte-identical upload runs on
// the real test guest.
#include <doctest/doctest.h>

#include <csignal>
#include <cstdlib>
#include <optional>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/remote_actor.hpp>
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

// Submits `spec` as a client that does not go through `submit` (which would
// pack the files), and waits for the job's result.
v1::JobResult submit_raw(const std::string& endpoint, const v1::JobSpec& spec) {
  ClientConfig cfg;
  caf::actor_system sys{cfg};
  auto port = static_cast<uint16_t>(std::stoul(endpoint.substr(endpoint.rfind(':') + 1)));
  auto coordinator = caf::io::remote_actor<coordinator_actor>(sys, "127.0.0.1", port);
  REQUIRE_MESSAGE(coordinator, sys.render(coordinator.error()));
  auto received = std::make_shared<Received>();
  EndActors end;
  auto sink = end(sys.spawn(collector, received));
  {
    caf::scoped_actor self{sys};
    self->request(*coordinator, std::chrono::milliseconds(30s), submit_atom::value, spec, sink)
      .receive([](const std::string&) {},
               [&](caf::error& err) { FAIL("the coordinator refused the job: " << sys.render(err)); });
  }
  auto deadline = Clock::now() + 60s;
  while (!received->result() && Clock::now() < deadline)
    std::this_thread::sleep_for(100ms);
  auto result = received->result();
  REQUIRE_MESSAGE(result, "no result within 60 s");
  return *result;
}

// `size` bytes of every value (zeros, newlines, high bytes), written to `path`.
void write_random_file(const fs::path& path, size_t size) {
  std::mt19937 random{42};
  std::string bytes(size, '\0');
  for (auto& byte : bytes)
    byte = static_cast<char>(random() & 0xff);
  std::ofstream out{path, std::ios::binary};
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string sha256_of(const fs::path& path) {
  auto out = path.string() + ".sha256";
  auto command = "sha256sum '" + path.string() + "' | cut -d' ' -f1 > '" + out + "'";
  REQUIRE(std::system(command.c_str()) == 0);
  std::ifstream in{out};
  std::string hex;
  in >> hex;
  REQUIRE(hex.size() == 64);
  return hex;
}

}  // namespace

TEST_CASE("a submitted job's uploads are packed into it and arrive byte-identical in the guest") {
  OneNodeCluster cluster;
  auto& d = cluster.dir.path();
  write_random_file(d / "payload.bin", 3u << 20);
  auto hash = sha256_of(d / "payload.bin");
  auto job = d / "job.json";
  write_text(job, R"({"name": "packed", "runs_on": "solstice-test-guest",
    "uploads": [{"source": "payload.bin", "destination": "/tmp/in/payload.bin"}],
    "steps": [{"name": "check", "script": "test \"$(sha256sum /tmp/in/payload.bin | cut -d' ' -f1)\" = )" +
                   hash + R"( && echo upload-identical"}]})");
  // The file is gone from the submitter's disk once `submit` has read it: the
  // node could not have read it from a path.
  auto submit = cluster.submit(job);
  REQUIRE_MESSAGE(submit.wait_for_output("submitted to", 30s), submit.describe());
  fs::remove(d / "payload.bin");
  REQUIRE_MESSAGE(submit.wait_exit(420s), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  CHECK_MESSAGE(submit.out().find("upload-identical") != std::string::npos, submit.describe());
}

TEST_CASE("submit refuses uploads over 16 MiB in all, naming the file, and an image path") {
  TempDir dir;
  auto& d = dir.path();
  write_random_file(d / "small.bin", 1u << 20);
  write_random_file(d / "big.bin", 16u << 20);
  auto job = d / "job.json";
  write_text(job, R"({"runs_on": "solstice-test-guest", "uploads": [
    {"source": "small.bin", "destination": "/tmp/small.bin"},
    {"source": "big.bin", "destination": "/tmp/big.bin"}],
    "steps": [{"script": "true"}]})");
  // Nothing listens there: the job is refused before any connection.
  RunnerProcess over{{"submit", "--to", "127.0.0.1:9", "--insecure", job.string()}};
  REQUIRE_MESSAGE(over.wait_exit(30s), over.describe());
  CHECK_MESSAGE(over.exit_code() == 2, over.describe());
  CHECK_MESSAGE(over.err().find("uploads[1].source") != std::string::npos, over.describe());
  CHECK_MESSAGE(over.err().find("big.bin") != std::string::npos, over.describe());
  CHECK_MESSAGE(over.err().find("16 MiB") != std::string::npos, over.describe());

  auto image_job = d / "image.json";
  write_text(image_job, R"({"image": "/var/lib/images/disk.qcow2", "steps": [{"script": "true"}]})");
  RunnerProcess image{{"submit", "--to", "127.0.0.1:9", "--insecure", image_job.string()}};
  REQUIRE_MESSAGE(image.wait_exit(30s), image.describe());
  CHECK_MESSAGE(image.exit_code() == 2, image.describe());
  CHECK_MESSAGE(image.err().find("runs_on label only") != std::string::npos, image.describe());
}

TEST_CASE("a node refuses a job from the network that names a path on the node") {
  OneNodeCluster cluster;
  // A node file a hostile submitter would like in its guest (any readable one).
  const std::string node_file = "/etc/hostname";

  SUBCASE("an upload source") {
    v1::JobSpec spec;
    spec.set_runs_on("solstice-test-guest");
    spec.add_steps()->set_script("cat /tmp/stolen");
    auto upload = spec.add_uploads();
    upload->set_source(node_file);
    upload->set_destination("/tmp/stolen");
    auto result = submit_raw(cluster.endpoint, spec);
    // The submitter's to fix, not the cluster's: invalid input, exit code 2.
    CHECK(result.status() == v1::INVALID_INPUT);
    CHECK(result.exit_code() == 2);
    CHECK_MESSAGE(result.error().find("uploads[0].source \"" + node_file +
                                      "\" names a file on the node") != std::string::npos,
                  result.error());
    CHECK_MESSAGE(result.error().find("node-1 refuses job") != std::string::npos, result.error());
  }

  SUBCASE("an image path") {
    v1::JobSpec spec;
    spec.set_image(node_file);
    spec.add_steps()->set_script("true");
    auto result = submit_raw(cluster.endpoint, spec);
    CHECK(result.status() == v1::INVALID_INPUT);
    CHECK(result.exit_code() == 2);
    CHECK_MESSAGE(result.error().find("image \"" + node_file + "\" names a file on the node") !=
                    std::string::npos,
                  result.error());
  }
  CHECK_MESSAGE(cluster.node->err().find("stolen") == std::string::npos, cluster.node->describe());
}
