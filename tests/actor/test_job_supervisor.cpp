// Longer than most files: one test per rule of the supervisor's protocol, each
// short; splitting them would only scatter the protocol.
// Protocol tests of the job supervisor and its VM attempt on CAF's deterministic
// scheduler (the fixture and the fakes are in supervisor_fixture.hpp).
#include "supervisor_fixture.hpp"

namespace {
using namespace solstice;
using namespace std::chrono_literals;
}  // namespace

// ------------------------------------------------------------------ the hand-off

TEST_CASE_FIXTURE(fixture, "no exec or upload reaches the SSH executor before the tailer's stopped") {
  tailer_answers_stop = false;
  start(two_step_job());
  drive();

  REQUIRE(count("tailer", "stop") == 1);
  auto ssh_seen = entries("ssh");
  REQUIRE(ssh_seen.size() == 1);
  CHECK(ssh_seen[0].what == "ready");
  CHECK(count("ssh", "exec") == 0);
  CHECK(count("ssh", "upload") == 0);
  CHECK(count("ssh", "put_file") == 0);
  CHECK(states() == std::vector<v1::JobState>{v1::QUEUED, v1::PREPARING, v1::BOOTING,
                                               v1::WAITING_FOR_SSH, v1::CONSOLE_HANDOFF});
  CHECK(entries("tailer", "stop")[0].seq > ssh_seen[0].seq);

  // Time passes, just short of the stop deadline: still nothing runs.
  sched.advance_time(timeouts.attempt.console_stop - 1ms);
  drive();
  CHECK(entries("ssh").size() == 1);
  CHECK(count("tailer", "terminated") == 0);
  CHECK(result_count() == 0);

  release_stop();
  drive();
  auto stopped = entries("tailer", "stopped");
  REQUIRE(stopped.size() == 1);
  ssh_seen = entries("ssh");
  REQUIRE(ssh_seen.size() >= 3);
  // After `ready`: the attempt releases the executor once the tailer stopped,
  // and the first request through the guest shell is the set-up exec.
  CHECK(ssh_seen[1].what == "release");
  CHECK(ssh_seen[1].seq > stopped[0].seq);
  CHECK(ssh_seen[2].what == "exec");
  CHECK(ssh_seen[2].detail == std::to_string(setup_step));
  for (const auto& e : ssh_seen)
    if (e.what != "ready")
      CHECK(e.seq > stopped[0].seq);

  CHECK(states() == full_run_states);
  CHECK(result().status() == v1::SUCCEEDED);
  CHECK(supervisor_exited);
}

TEST_CASE_FIXTURE(fixture, "a tailer that never answers stop is killed, and exec waits for its DOWN") {
  tailer_answers_stop = false;
  start(two_step_job());
  drive();
  REQUIRE(count("tailer", "stop") == 1);
  REQUIRE(count("ssh", "exec") == 0);

  sched.advance_time(timeouts.attempt.console_stop + 1ms);
  drive();

  REQUIRE(tailer_exit_reason.has_value());
  CHECK(*tailer_exit_reason == caf::exit_reason::kill);
  CHECK(has_notice_containing("console tailer did not stop"));
  auto terminated = entries("tailer", "terminated");
  auto down = entries("attempt", "processed tailer DOWN");
  REQUIRE(terminated.size() == 1);
  REQUIRE(down.size() == 1);
  CHECK(count("tailer", "stopped") == 0);
  auto execs = entries("ssh", "exec");
  REQUIRE(!execs.empty());
  CHECK(execs[0].detail == std::to_string(setup_step));
  // Nothing but `ready` reached the executor before the DOWN was handled.
  for (const auto& e : entries("ssh"))
    if (e.what != "ready")
      CHECK(e.seq > down[0].seq);
  CHECK(down[0].seq > terminated[0].seq);

  CHECK(states() == full_run_states);
  CHECK(result().status() == v1::SUCCEEDED);
}

// Known bug: the supervisor ignores the tailer's DOWN while it is not waiting for
// it, so a tailer that is already gone at the hand-off (its `stop` request fails at
// once with request_receiver_down) leaves the job waiting for a second DOWN that
// never comes, until the job deadline.
TEST_CASE_FIXTURE(fixture, "a tailer that died during boot does not block the job") {
  // The console is best effort: its loss must not stall the job until its deadline.
  tailer_dies_at_boot = true;
  start(two_step_job());
  drive();
  REQUIRE(tailer_exit_reason.has_value());
  CHECK(count("ssh", "ready") == 1);
  CHECK(count("ssh", "exec") == 3);
  CHECK(result_count() == 1);
  if (result_count() == 1)
    CHECK(result().status() == v1::SUCCEEDED);
}

TEST_CASE_FIXTURE(fixture, "console lines before the hand-off are events once, in order; output comes from the executor") {
  boot_console_lines = {"SeaBIOS (version 1.16)", "Booting from Hard Disk...",
                        "login: ready"};
  drained_console_lines = {"cloud-init finished"};
  setup_plan.output = {chunk(v1::STDOUT, "set-up noise\n")};
  step_plans[0].output = {chunk(v1::STDOUT, "compiling\n"), chunk(v1::STDERR, "warning: x\n"),
                          chunk(v1::STDOUT, "done\n")};
  step_plans[1].output = {chunk(v1::STDOUT, "tests pass\n")};
  start(two_step_job());
  drive();

  CHECK(console_lines() ==
        std::vector<std::string>{"SeaBIOS (version 1.16)", "Booting from Hard Disk...",
                                 "login: ready", "cloud-init finished"});
  // Every console event precedes RUNNING; every output event follows it.
  auto running = state_index(v1::RUNNING);
  REQUIRE(running < events.size());
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].has_console())
      CHECK(i < running);
    if (events[i].has_output())
      CHECK(i > running);
  }
  CHECK(output_of(0, v1::STDOUT) == "compiling\ndone\n");
  CHECK(output_of(0, v1::STDERR) == "warning: x\n");
  CHECK(output_of(1, v1::STDOUT) == "tests pass\n");
  // The runner's own set-up command is not the job's output.
  CHECK(output_of(setup_step, v1::STDOUT).empty());
  // Per-step, per-stream numbering from 0 without gaps.
  std::map<std::pair<uint32_t, int>, uint64_t> next;
  for (const auto& event : events)
    if (event.has_output()) {
      auto key = std::make_pair(event.output().step_index(), int(event.output().stream()));
      CHECK(event.output().sequence() == next[key]++);
    }
  // Event sequence numbers count from 0.
  for (size_t i = 0; i < events.size(); ++i)
    CHECK(events[i].sequence() == i);
  CHECK(result().console_tail_size() == 4);
}

// ------------------------------------------------------------------ whole jobs

TEST_CASE_FIXTURE(fixture, "a two-step job succeeds through the whole protocol") {
  step_plans[0].output = {chunk(v1::STDOUT, "built\n")};
  step_plans[1].output = {chunk(v1::STDOUT, "tested\n")};
  start(two_step_job());
  drive();

  // The SSH port came from `info usernet`.
  auto monitor = entries("qmp", "command");
  REQUIRE(!monitor.empty());
  CHECK(monitor[0].detail == "human-monitor-command");
  CHECK(nlohmann::json::parse(monitor[0].extra)["command-line"] == "info usernet");
  CHECK(ready_handle.ssh_port() == 40001);
  CHECK(ready_handle.qemu_pid() == ::getpid());
  CHECK(ready_handle.vcpus() == 2);

  // One round trip each: the set-up exec carries the environment file in its
  // stdin, each step's exec carries that step's script. Nothing goes over SFTP.
  CHECK(uploads.empty());
  auto execs = entries("ssh", "exec");
  REQUIRE(execs.size() == 3);
  CHECK(execs[0].detail == std::to_string(setup_step));
  CHECK(execs[0].extra == setup_command({}));
  CHECK(execs[0].input.find("export SOLSTICE_JOB_ID='job-1'\n") != std::string::npos);
  CHECK(execs[1].detail == "0");
  CHECK(execs[1].extra == step_command(0));
  CHECK(execs[1].input == make_step_script("make"));
  CHECK(execs[2].detail == "1");
  CHECK(execs[2].extra == step_command(1));
  CHECK(execs[2].input == make_step_script("make test"));

  // Graceful shutdown through QMP, then cleanup.
  auto commands = entries("qmp", "command");
  REQUIRE(commands.size() == 2);
  CHECK(commands[1].detail == "system_powerdown");
  CHECK(count("qemu", "kill") == 0);
  REQUIRE(count("qemu", "cleanup") == 1);
  REQUIRE(count("qemu", "exited") == 1);
  CHECK(entries("qemu", "cleanup")[0].seq > entries("qemu", "exited")[0].seq);

  CHECK(states() == full_run_states);
  REQUIRE(events.size() >= 2);
  CHECK(events[events.size() - 2].has_state());
  CHECK(events[events.size() - 2].state().state() == v1::CLEANED_UP);
  auto r = result();
  CHECK(r.job_id() == "job-1");
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.exit_code() == 0);
  CHECK(r.error().empty());
  CHECK(r.shutdown_method() == "powerdown");
  REQUIRE(r.steps_size() == 2);
  CHECK(r.steps(0).name() == "build");
  CHECK(r.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(r.steps(1).name() == "test");
  CHECK(r.steps(1).outcome() == v1::STEP_SUCCEEDED);
  CHECK(r.steps(1).exit_code() == 0);
  for (auto phase : {"prepare", "boot_to_ssh", "console_handoff", "setup", "step:build", "step:test",
                     "shutdown"})
    CHECK_MESSAGE(has_phase(r, phase), phase);
  CHECK(r.summary().find("succeeded") != std::string::npos);
  CHECK(output_of(0, v1::STDOUT) == "built\n");
  CHECK(output_of(1, v1::STDOUT) == "tested\n");
  // Every byte of output is acknowledged to the executor (its flow control).
  CHECK(acked_bytes == std::string("built\ntested\n").size());
  // Each step's events: started, output, finished.
  std::vector<uint32_t> started, finished;
  for (const auto& e : events) {
    if (e.has_step_started())
      started.push_back(e.step_started().step_index());
    if (e.has_step_finished())
      finished.push_back(e.step_finished().step_index());
  }
  CHECK(started == std::vector<uint32_t>{0, 1});
  CHECK(finished == std::vector<uint32_t>{0, 1});
  // The children are told to go, and they do.
  CHECK(supervisor_exited);
  CHECK(tailer_exit_reason.has_value());
}

TEST_CASE_FIXTURE(fixture, "the job's uploads go between the set-up exec, which makes their directories, and the first step") {
  auto job = two_step_job();
  auto* upload = job.add_uploads();
  upload->set_source("/host/src.tar.gz");
  upload->set_destination("/srv/build/src.tar.gz");
  start(job);
  drive();

  auto execs = entries("ssh", "exec");
  auto puts = entries("ssh", "put_file");
  REQUIRE(execs.size() == 3);
  REQUIRE(puts.size() == 1);
  CHECK(execs[0].extra == setup_command({"/srv/build"}));
  CHECK(puts[0].detail == "/host/src.tar.gz");
  CHECK(puts[0].extra == "/srv/build/src.tar.gz");
  CHECK(execs[0].seq < puts[0].seq);
  CHECK(puts[0].seq < execs[1].seq);
  CHECK(result().status() == v1::SUCCEEDED);
}

TEST_CASE_FIXTURE(fixture, "cloud-init errors reported by the set-up are a notice; a failed set-up is an infrastructure error") {
  SUBCASE("cloud-init ended with errors: the job goes on") {
    setup_plan.exit_code = setup_cloud_init_failed_exit;
    start(two_step_job());
    drive();
    CHECK(has_notice_containing("cloud-init finished with errors"));
    CHECK(count("ssh", "exec") == 3);
    CHECK(result().status() == v1::SUCCEEDED);
  }
  SUBCASE("the set-up itself failed: no step runs") {
    setup_plan.exit_code = 1;
    start(two_step_job());
    drive();
    CHECK_FALSE(has_notice_containing("cloud-init"));
    CHECK(count("ssh", "exec") == 1);
    CHECK(result().status() == v1::INFRASTRUCTURE_ERROR);
    CHECK(result().error().find("cannot create the job's directories") != std::string::npos);
  }
  CHECK(has_phase(result(), "setup"));
}

TEST_CASE_FIXTURE(fixture, "a failing step fails the job and skips the rest") {
  step_plans[1].exit_code = 3;
  start(job_with_steps({make_step("one", "true"), make_step("two", "exit 3"),
                        make_step("three", "true")}));
  drive();

  auto r = result();
  CHECK(r.status() == v1::FAILED);
  CHECK(r.exit_code() == 3);
  REQUIRE(r.steps_size() == 3);
  CHECK(r.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(r.steps(1).outcome() == v1::STEP_FAILED);
  CHECK(r.steps(1).exit_code() == 3);
  CHECK(r.steps(2).outcome() == v1::STEP_SKIPPED);
  CHECK(r.error().find("'two'") != std::string::npos);
  CHECK(r.error().find("exit code 3") != std::string::npos);
  // The third step never reached the guest.
  for (const auto& e : entries("ssh", "exec"))
    CHECK(e.detail != "2");
  CHECK(count("ssh", "exec") == 3);  // set-up, one, two
  CHECK(r.shutdown_method() == "powerdown");
  CHECK(count("qemu", "cleanup") == 1);
}

TEST_CASE_FIXTURE(fixture, "a failing step with allow_failure does not stop the job") {
  step_plans[1].exit_code = 3;
  start(job_with_steps({make_step("one", "true"), make_step("two", "exit 3", true),
                        make_step("three", "true")}));
  drive();

  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.exit_code() == 0);
  REQUIRE(r.steps_size() == 3);
  CHECK(r.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(r.steps(1).outcome() == v1::STEP_ALLOWED_FAILURE);
  CHECK(r.steps(1).exit_code() == 3);
  CHECK(r.steps(2).outcome() == v1::STEP_SUCCEEDED);
  CHECK(count("ssh", "exec") == 4);
}

TEST_CASE_FIXTURE(fixture, "secrets are redacted from output split across chunks and from console lines") {
  auto job = job_with_steps({make_step("deploy", "deploy.sh")});
  (*job.mutable_secrets())["TOKEN"] = "hunter2";
  boot_console_lines = {"cloud-init: password hunter2 set"};
  step_plans[0].output = {chunk(v1::STDOUT, "token is hun"), chunk(v1::STDOUT, "ter2 ok\n"),
                          chunk(v1::STDERR, "echo hunter2\n"), chunk(v1::STDOUT, "ends with hun")};
  start(job);
  drive();

  CHECK(output_of(0, v1::STDOUT) == "token is *** ok\nends with hun");
  CHECK(output_of(0, v1::STDERR) == "echo ***\n");
  CHECK(console_lines() == std::vector<std::string>{"cloud-init: password *** set"});
  // No event carries the secret anywhere, in any field.
  std::string everything;
  for (const auto& event : events)
    everything += event.SerializeAsString() + event.DebugString();
  CHECK(everything.find("hunter2") == std::string::npos);
  CHECK(everything.find("***") != std::string::npos);
  // The guest still gets it, through the environment file in the set-up's stdin,
  // and never in a command line (which the guest's process list shows).
  auto execs = entries("ssh", "exec");
  REQUIRE(!execs.empty());
  CHECK(execs[0].detail == std::to_string(setup_step));
  CHECK(execs[0].input.find("export TOKEN='hunter2'") != std::string::npos);
  for (const auto& e : execs)
    CHECK(e.extra.find("hunter2") == std::string::npos);
  CHECK(result().status() == v1::SUCCEEDED);
}

// ------------------------------------------------------------------ failures

TEST_CASE_FIXTURE(fixture, "QEMU exiting while waiting for SSH is an infrastructure error") {
  ssh_answers_ready = false;
  start(two_step_job());
  drive();
  REQUIRE(count("ssh", "ready") == 1);
  REQUIRE(states().back() == v1::WAITING_FOR_SSH);

  v1::ProcessExit exit;
  exit.set_code(1);
  exit.set_description("exit code 1");
  exit.set_stderr_tail("qemu-system-x86_64: cannot set up guest memory\n");
  qemu_exits(exit);
  drive();

  auto r = result();
  CHECK(r.status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(r.exit_code() == 125);
  CHECK(r.error().find("QEMU exited unexpectedly") != std::string::npos);
  CHECK(r.error().find("exit code 1") != std::string::npos);
  CHECK(r.error().find("cannot set up guest memory") != std::string::npos);
  CHECK(r.shutdown_method() == "exited");
  CHECK(count("ssh", "cancel") == 1);
  CHECK(count("ssh", "exec") == 0);
  CHECK(count("tailer", "stop") == 0);
  // Nothing left to power down; what the VM made is cleaned up.
  CHECK(count("qmp", "command") == 1);  // only info usernet
  CHECK(count("qemu", "cleanup") == 1);
  REQUIRE(r.steps_size() == 2);
  CHECK(r.steps(0).outcome() == v1::STEP_SKIPPED);
  CHECK(r.steps(1).outcome() == v1::STEP_SKIPPED);
  CHECK(states().back() == v1::CLEANED_UP);
}

// When QEMU dies, the SSH failure it causes can arrive before QEMU's exit report:
// the job's error must still name the real cause.
TEST_CASE_FIXTURE(fixture, "an SSH failure followed by QEMU's exit report names the exit") {
  ssh_answers_ready = false;
  start(two_step_job());
  drive();
  REQUIRE(held_ready.has_value());
  fail_ready("transport read (libssh2 error -43)");
  drive();
  CHECK(result_count() == 0);  // held back for a moment
  v1::ProcessExit exit;
  exit.set_signaled(true);
  exit.set_signal(9);
  exit.set_description("signal 9 (KILL)");
  qemu_exits(exit);
  drive();
  auto r = result();
  CHECK(r.status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(r.error().find("QEMU exited unexpectedly (signal 9 (KILL))") != std::string::npos);
  CHECK(r.error().find("libssh2") == std::string::npos);
}

TEST_CASE_FIXTURE(fixture, "an SSH failure with QEMU still running is decided after the grace") {
  ssh_answers_ready = false;
  start(two_step_job());
  drive();
  REQUIRE(held_ready.has_value());
  fail_ready("authentication failed");
  drive();
  CHECK(result_count() == 0);
  sched.advance_time(timeouts.attempt.exit_report_grace);
  sched.trigger_timeouts();
  drive();
  auto r = result();
  CHECK(r.status() == v1::INFRASTRUCTURE_ERROR);
  CHECK_MESSAGE(r.error().find("SSH did not become ready: authentication failed") != std::string::npos,
                r.error());
}

TEST_CASE_FIXTURE(fixture, "cancel during a step powers the VM down and ends cancelled") {
  step_plans[0].hold = true;
  start(two_step_job());
  drive();
  REQUIRE(count("ssh", "exec") == 2);
  REQUIRE(result_count() == 0);

  caf::anon_send(supervisor, cancel_atom::value);
  drive();

  auto r = result();
  CHECK(r.status() == v1::CANCELLED);
  CHECK(r.exit_code() == 130);
  CHECK(count("ssh", "cancel") == 1);
  auto commands = entries("qmp", "command");
  REQUIRE(commands.size() == 2);
  CHECK(commands[1].detail == "system_powerdown");
  REQUIRE(count("ssh", "cancel") == 1);
  CHECK(commands[1].seq > entries("ssh", "cancel")[0].seq);
  CHECK(r.shutdown_method() == "powerdown");
  CHECK(count("qemu", "cleanup") == 1);
  REQUIRE(r.steps_size() == 2);
  CHECK(r.steps(0).outcome() == v1::STEP_CANCELLED);
  CHECK(r.steps(1).outcome() == v1::STEP_SKIPPED);
  CHECK(count("ssh", "exec") == 2);  // step two never started
  CHECK(states().back() == v1::CLEANED_UP);
}

TEST_CASE_FIXTURE(fixture, "the job deadline ends a job that runs too long") {
  auto job = two_step_job();
  job.set_timeout_seconds(5);
  step_plans[0].hold = true;
  start(job);
  drive();
  REQUIRE(count("ssh", "exec") == 2);

  sched.advance_time(4s);
  drive();
  CHECK(result_count() == 0);
  CHECK(count("ssh", "cancel") == 0);

  sched.advance_time(1s + 1ms);
  drive();
  auto r = result();
  CHECK(r.status() == v1::TIMED_OUT);
  CHECK(r.exit_code() == 124);
  CHECK(r.error().find("timed out after 5 s") != std::string::npos);
  CHECK(count("ssh", "cancel") == 1);
  CHECK(r.shutdown_method() == "powerdown");
  CHECK(count("qemu", "cleanup") == 1);
}

TEST_CASE_FIXTURE(fixture, "a guest that ignores powerdown is quit, then killed") {
  guest_powers_off = false;
  start(two_step_job());
  drive();
  REQUIRE(count("qmp", "command") == 2);  // info usernet, system_powerdown
  REQUIRE(result_count() == 0);

  sched.advance_time(30s + 1ms);  // the config's powerdown timeout
  drive();
  auto commands = entries("qmp", "command");
  REQUIRE(commands.size() == 3);
  CHECK(commands[2].detail == "quit");
  CHECK(result_count() == 0);

  sched.advance_time(timeouts.attempt.quit_wait + 1ms);
  drive();
  CHECK(count("qemu", "kill") == 1);
  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.shutdown_method() == "kill");
  CHECK(count("qemu", "cleanup") == 1);
}

TEST_CASE_FIXTURE(fixture, "a step that times out without allow_failure times the job out") {
  step_plans[0].exit_code = 124;
  step_plans[0].outcome = v1::STEP_TIMED_OUT;
  auto job = two_step_job();
  job.mutable_steps(0)->set_timeout_seconds(7);
  start(job);
  drive();
  auto r = result();
  CHECK(r.status() == v1::TIMED_OUT);
  CHECK(r.exit_code() == 124);
  CHECK(r.error().find("'build' timed out after 7 s") != std::string::npos);
  REQUIRE(r.steps_size() == 2);
  CHECK(r.steps(0).outcome() == v1::STEP_TIMED_OUT);
  CHECK(r.steps(1).outcome() == v1::STEP_SKIPPED);
  CHECK(count("ssh", "exec") == 2);
}

TEST_CASE_FIXTURE(fixture, "a guest kernel panic during a step is an infrastructure error") {
  step_plans[0].hold = true;
  start(two_step_job());
  drive();
  REQUIRE(count("ssh", "exec") == 2);
  v1::QmpEvent panic;
  panic.set_name("GUEST_PANICKED");
  panic.set_data_json(R"({"action":"pause"})");
  // QMP events reach the VM attempt, which reports the lost VM to the supervisor.
  caf::anon_send(caf::actor_cast<qmp_observer_actor>(attempt), qmp_event_atom::value, panic);
  drive();
  auto r = result();
  CHECK(r.status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(r.error().find("panicked") != std::string::npos);
  CHECK(has_notice_containing("GUEST_PANICKED"));
  CHECK(count("ssh", "cancel") == 1);
  CHECK(count("qemu", "cleanup") == 1);
}

// Runs queued messages until `actor` has received `what` (and no further).
#define RUN_UNTIL_RECEIVED(actor, what)                                   \
  for (size_t n = 0; count(actor, what) == 0; ++n) {                      \
    REQUIRE_MESSAGE(sched.has_job(), "never received: " << what);         \
    REQUIRE(n < 10000);                                                   \
    sched.run_once();                                                     \
  }

// Cancelling while QEMU's files are being prepared must not start QEMU, and the
// shutdown happens once.
TEST_CASE_FIXTURE(fixture, "cancel while preparing ends cancelled without starting QEMU") {
  start(two_step_job());
  // The prepare request is on its way to QEMU's actor; the user cancels now.
  sched.run_once();  // the supervisor takes `start`, sends prepare
  caf::anon_send(supervisor, cancel_atom::value);
  drive();

  auto r = result();
  CHECK(r.status() == v1::CANCELLED);
  CHECK(r.exit_code() == 130);
  CHECK(count("qemu", "prepare") == 1);
  CHECK(count("qemu", "launch") == 0);
  CHECK(r.shutdown_method() == "none");
  // The attempt got `shutdown` before it could say it was preparing.
  CHECK(states() == std::vector<v1::JobState>{v1::QUEUED, v1::SHUTTING_DOWN, v1::CLEANED_UP});
  CHECK(count("qemu", "cleanup") == 1);
}

TEST_CASE_FIXTURE(fixture, "cancel while QEMU launches stops QEMU and shuts down once") {
  start(two_step_job());
  RUN_UNTIL_RECEIVED("qemu", "prepare");
  // Run until the launch request waits in QEMU's actor's mailbox; cancel then.
  for (size_t n = 0; !has_queued_job(qemu); ++n) {
    REQUIRE(sched.has_job());
    REQUIRE(n < 10000);
    sched.run_once();
  }
  caf::anon_send(supervisor, cancel_atom::value);
  drive();

  auto r = result();
  CHECK(r.status() == v1::CANCELLED);
  CHECK(count("qmp", "command") == 0);
  CHECK(count("ssh", "ready") == 0);
  REQUIRE(count("qemu", "launch") == 1);
  REQUIRE(count("qemu", "cleanup") == 1);
  // Whatever was started is gone: cleanup (which kills QEMU) comes after launch.
  CHECK(entries("qemu", "cleanup")[0].seq > entries("qemu", "launch")[0].seq);
  CHECK(states() == std::vector<v1::JobState>{v1::QUEUED, v1::PREPARING, v1::BOOTING,
                                               v1::SHUTTING_DOWN, v1::CLEANED_UP});
}

// ------------------------------------------------------------------ flow control

TEST_CASE_FIXTURE(fixture, "the executor is credited only for output every sink has handled") {
  const std::string setup_noise = "set-up noise\n";
  setup_plan.output = {chunk(v1::STDOUT, setup_noise)};
  const std::string big(256u << 10, 'x');
  step_plans[0].output = {chunk(v1::STDOUT, big), chunk(v1::STDERR, "warning\n"),
                          chunk(v1::STDOUT, big)};
  step_plans[0].hold = true;
  start(two_step_job());

  // Everything runs except the sink: a terminal that reads nothing.
  for (size_t n = 0;; ++n) {
    REQUIRE(n < 100000);
    auto next = std::find_if(sched.jobs.begin(), sched.jobs.end(), [&](caf::resumable* job) {
      return job != dynamic_cast<caf::resumable*>(caf::actor_cast<caf::abstract_actor*>(sink));
    });
    if (next == sched.jobs.end())
      break;
    std::rotate(sched.jobs.begin(), next, std::next(next));
    sched.run_once();
  }
  REQUIRE(held_exec.count(0) == 1);
  // Output the sinks never see (the runner's own set-up command) is credited at
  // once; the step's output is not, while the sink has not handled it.
  CHECK(acked_bytes == setup_noise.size());
  CHECK(output_of(0, v1::STDOUT).empty());

  // The sink catches up: every byte it handled is credited, exactly once.
  drive();
  CHECK(output_of(0, v1::STDOUT) == big + big);
  CHECK(acked_bytes == setup_noise.size() + 2 * big.size() + std::string("warning\n").size());

  release_exec(0, 0);
  drive();
  CHECK(result().status() == v1::SUCCEEDED);
}
