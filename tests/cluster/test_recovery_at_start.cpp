// Recovery at start for the long-lived hosts: a runner node, and a host that embeds
// the runner (the example in examples/embedded_host). Each starts on a state
// directory where a runner that died left a job behind (its VM's work directory
// and owner record, its record without a result) and must clean it before it works.
#include <doctest/doctest.h>

#include <signal.h>

#include <chrono>
#include <string>

#include "runtime/base/proc_stat.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/vm/recovery.hpp"
#include "runtime/vm/vm_prepare.hpp"
#include "solstice.pb.h"
#include "tests/cluster/cluster_process.hpp"

using namespace solstice;
using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// What a runner that died mid-job leaves in `state_dir`.
struct AbandonedJob {
  std::string job_id;
  fs::path job_dir, work_dir;

  AbandonedJob(const fs::path& state_dir, std::string id) : job_id(std::move(id)) {
    v1::RunnerConfig config;
    config.set_state_dir(state_dir.string());
    job_dir = job_dir_for(config, job_id);
    work_dir = work_dir_for(config, job_id);
    REQUIRE(make_private_dir(job_dir));
    REQUIRE(make_private_dir(work_dir));
    write_text(work_dir / "overlay.qcow2", "the dead runner's overlay");
    auto log = EventLog::open(job_dir / "events.jsonl");
    REQUIRE(log);
    v1::JobEvent running;
    running.set_job_id(job_id);
    running.set_sequence(0);
    running.mutable_state()->set_state(v1::RUNNING);
    REQUIRE(log->append(running));

    // Its runner: a process that has exited.
    OwnerRecord owner;
    auto gone = ChildProcess::spawn({"true"});
    REQUIRE(gone);
    owner.runner_pid = gone->pid();
    owner.runner_start_time = process_start_time(gone->pid()).value_or(1);
    REQUIRE(gone->wait_for(10s));
    owner.job_id = job_id;
    owner.job_dir = job_dir.string();
    owner.work_dir = work_dir.string();
    REQUIRE(write_owner_record(work_dir, owner));
  }

  // Recovered: the work directory is gone and the job's record ends with an
  // infrastructure_error result saying why.
  void check_recovered() const {
    CHECK_FALSE(fs::exists(work_dir));
    CHECK(fs::exists(job_dir / "result.json"));
    auto events = read_event_log(job_dir / "events.jsonl");
    REQUIRE(events);
    REQUIRE_FALSE(events->empty());
    REQUIRE(events->back().has_result());
    CHECK(events->back().result().status() == v1::INFRASTRUCTURE_ERROR);
    CHECK(events->back().result().error() == abandoned_job_error);
  }

  std::string report() const { return "job " + job_id + " was left by a runner that stopped"; }
};

}  // namespace

TEST_CASE("a node cleans what a dead runner left in its state directory before it joins") {
  TempDir dir;
  RunnerProcess coordinator{{"coordinator", "--listen", "127.0.0.1:0", "--insecure"}};
  auto endpoint = coordinator_endpoint(coordinator, 20s);
  REQUIRE_MESSAGE(endpoint, coordinator.describe());
  const auto state = dir.path() / "state";
  AbandonedJob left{state, "left-by-a-dead-node"};

  RunnerProcess node{{"node", "--join", *endpoint, "--insecure", "--name", "heir", "--slots", "1",
                      "--state-dir", state.string(), "--accel", "tcg"}};
  REQUIRE_MESSAGE(node.wait_for_output("joined the coordinator", 30s), node.describe());
  // Reported on stderr, as `run` does, and done before the node took any job.
  CHECK_MESSAGE(node.err().find(left.report()) != std::string::npos, node.describe());
  left.check_recovered();

  node.kill(SIGTERM);
  REQUIRE_MESSAGE(node.wait_exit(60s), node.describe());
  CHECK_MESSAGE(node.exit_code() == 0, node.describe());
  coordinator.kill(SIGTERM);
  CHECK_MESSAGE(coordinator.wait_exit(20s), coordinator.describe());
}

TEST_CASE("an embedding host recovers at its start, then runs its job") {
  REQUIRE_MESSAGE(fs::exists(embedded_host_binary()),
                  embedded_host_binary().string() << " is not built (ninja embedded_host)");
  TempDir dir;
  const auto state = dir.path() / "state";
  AbandonedJob left{state, "left-by-a-dead-host"};

  RunnerProcess host{embedded_host_binary(), {SOLSTICE_TEST_GUEST_DIR, state.string()}};
  REQUIRE_MESSAGE(host.wait_for_output("host started job", 30s), host.describe());
  // Recovered before its own job started.
  const auto& out = host.out();
  auto recovered_at = out.find("host recovered: " + left.report());
  CHECK_MESSAGE(recovered_at != std::string::npos, host.describe());
  CHECK_MESSAGE(recovered_at < out.find("host started job"), host.describe());
  left.check_recovered();

  // One TCG boot takes 5-40 s on a loaded 2-core host.
  REQUIRE_MESSAGE(host.wait_exit(420s), host.describe());
  CHECK_MESSAGE(host.exit_code() == 0, host.describe());
  CHECK_MESSAGE(host.out().find("host saw result SUCCEEDED") != std::string::npos, host.describe());
}
