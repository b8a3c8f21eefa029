// Restored starts on CAF's deterministic scheduler (job_start.cpp, vm_restore.cpp):
// the supervisor asks the template keeper, the attempt loads the template's state
// before anything polls SSH, the clone gets its own identity and the shell is
// rekeyed before any job file is made, and a refused restore falls back to a cold
// attempt. The fakes of supervisor_fixture.hpp journal every message.
#include "runtime/vm/vm_slots.hpp"
#include "tests/actor/supervisor_fixture.hpp"
#include "tests/unit/temp_dir.hpp"

namespace {

uint64_t first_seq(const fixture& fx, const std::string& actor, const std::string& what,
                   const std::string& detail = {}) {
  for (const auto& e : fx.journal)
    if (e.actor == actor && e.what == what && (detail.empty() || e.detail == detail))
      return e.seq;
  return UINT64_MAX;
}

// Timers (query-migrate polls, grace periods) in 100 ms ticks until the job has
// a result, at most half a second.
void tick_until_result(fixture& f) {
  for (int i = 0; i < 5 && f.result_count() == 0; ++i) {
    f.sched.advance_time(100ms);
    f.sched.trigger_timeouts();
    f.drive();
  }
}

}  // namespace

TEST_CASE_FIXTURE(fixture, "a restored VM loads the template's state, runs, then SSH; identity and rekey come before the job's files") {
  keeper_answers = "ready";
  migrate_polls_active = 2;
  start(two_step_job());
  drive();
  // query-migrate is polled on a timer while the state loads.
  tick_until_result(*this);

  auto migrate = first_seq(*this, "qmp", "command", "migrate-incoming");
  auto cont = first_seq(*this, "qmp", "command", "cont");
  auto ready = first_seq(*this, "ssh", "ready");
  REQUIRE(migrate != UINT64_MAX);
  CHECK(first_seq(*this, "keeper", "lookup") < first_seq(*this, "qemu", "prepare"));
  CHECK(entries("qemu", "prepare")[0].extra == "restore");
  // The state comes through the descriptor after the console's (fd 3).
  for (const auto& e : entries("qmp", "command"))
    if (e.detail == "migrate-incoming")
      CHECK(e.extra.find("fd:4") != std::string::npos);
  CHECK(count("qmp", "command") >= 5);  // usernet, migrate-incoming, query-migrate x3, cont
  CHECK(migrate < first_seq(*this, "qmp", "command", "query-migrate"));
  CHECK(first_seq(*this, "qmp", "command", "query-migrate") < cont);
  CHECK(cont < ready);
  // SSH is first tried with the template's key and host key.
  CHECK(ready_handle.boot_private_key() == "template-private-key");
  CHECK(ready_handle.boot_host_key() == "template-host-key");

  // Before any job file: the identity exec (the job's key in its stdin, never the
  // template's), then the rekey, then the usual set-up.
  auto execs = entries("ssh", "exec");
  REQUIRE(execs.size() >= 2);
  CHECK(execs[0].detail == std::to_string(setup_step));
  CHECK(execs[0].extra.find("authorized_keys") != std::string::npos);
  CHECK(execs[0].input.find("ssh-ed25519 JOBKEY job") == 0);
  CHECK(execs[0].input.find("job-host-key") != std::string::npos);
  CHECK(execs[0].input.find("template-private-key") == std::string::npos);
  auto rekey = first_seq(*this, "ssh", "rekey");
  CHECK(execs[0].seq < rekey);
  CHECK(rekey < execs[1].seq);
  CHECK(execs[1].extra.find("mkdir") != std::string::npos);
  // Identity, reconnect and set-up get the boot's time (120 s here), not a fixed
  // minute: clones restoring together on a loaded host need it.
  REQUIRE(exec_timeouts_ms.size() >= 2);
  CHECK(exec_timeouts_ms[0] == 120000);
  CHECK(exec_timeouts_ms[1] == 120000);
  for (const auto& e : entries("ssh", "rekey"))
    CHECK(e.extra == "120000");

  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.start() == "restored");
  CHECK(has_phase(r, "restore"));
  CHECK_FALSE(has_phase(r, "boot_to_ssh"));
  CHECK(has_notice_containing("start: restored from template tmpl-1"));
  // A clone is quit, never powered down: its disk is thrown away.
  CHECK(r.shutdown_method() == "quit");
  for (const auto& e : entries("qmp", "command"))
    CHECK(e.detail != "system_powerdown");
}

TEST_CASE_FIXTURE(fixture, "a job without a template has it built first, says so, then restores it") {
  keeper_answers = "build";
  start(two_step_job());
  drive();
  tick_until_result(*this);
  CHECK(first_seq(*this, "keeper", "lookup") < first_seq(*this, "keeper", "build"));
  CHECK(first_seq(*this, "keeper", "build") < first_seq(*this, "qemu", "prepare"));
  CHECK(has_notice_containing("no template yet for image 'test-image'"));
  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.start() == "restored");
  CHECK(r.start_note() == "template built first");
}

TEST_CASE_FIXTURE(fixture, "a restore QEMU refuses marks the template stale and boots cold") {
  keeper_answers = "ready";
  restore_refused = true;
  start(two_step_job());
  drive();
  // The refusal is held briefly for a QEMU exit report that would explain it.
  sched.advance_time(timeouts.attempt.exit_report_grace);
  sched.trigger_timeouts();
  drive();
  tick_until_result(*this);
  auto prepares = entries("qemu", "prepare");
  REQUIRE(prepares.size() == 2);
  CHECK(prepares[0].extra == "restore");
  CHECK(prepares[1].extra == "cold");
  // The refused attempt ended whole before the cold one was made.
  CHECK(first_seq(*this, "qemu", "cleanup") < prepares[1].seq);
  CHECK(count("qmp", "command") > 0);
  CHECK(has_notice_containing("restoring template tmpl-1 failed"));
  CHECK(has_notice_containing("marked stale"));
  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.start() == "cold");
  CHECK(r.start_note().rfind("restore failed", 0) == 0);
  CHECK(has_phase(r, "boot_to_ssh"));
  // The cold attempt's shell is never rekeyed: its guest has the job's identity.
  CHECK(count("ssh", "rekey") == 0);
}

TEST_CASE_FIXTURE(fixture, "snapshots off never asks for a template; a keeper that fails leaves the job to boot cold") {
  SUBCASE("off") {
    keeper_answers = "ready";
    snapshots = "off";
    start(two_step_job());
    drive();
    CHECK(count("keeper", "lookup") == 0);
    auto r = result();
    CHECK(r.start() == "cold");
    CHECK(r.start_note() == "snapshots off");
  }
  SUBCASE("the keeper fails") {
    keeper_answers = "fail";
    start(two_step_job());
    drive();
    auto r = result();
    CHECK(r.status() == v1::SUCCEEDED);
    CHECK(r.start() == "cold");
    CHECK(has_notice_containing("cannot look for a template"));
    CHECK(entries("qemu", "prepare")[0].extra == "cold");
  }
}

// The identity port (vm_restore.cpp, runtime/vm/identity_channel.hpp): a template
// whose guest runs the identity agent gives every clone its identity before any SSH.
TEST_CASE_FIXTURE(fixture, "a clone of a template with the identity agent takes its identity and its job's files over the port before the one SSH connection, and runs no set-up") {
  keeper_answers = "ready";
  template_has_agent = true;
  auto job = two_step_job();
  (*job.mutable_env())["STAGE"] = "ci";
  (*job.mutable_secrets())["TOKEN"] = "s3cret";
  auto* upload = job.add_uploads();
  upload->set_source("/nonexistent/tool");
  upload->set_destination("/opt/tools/tool");
  start(job);
  drive();
  tick_until_result(*this);

  auto connect = first_seq(*this, "ssh", "identity connect");
  auto migrate = first_seq(*this, "qmp", "command", "migrate-incoming");
  auto cont = first_seq(*this, "qmp", "command", "cont");
  auto identity = first_seq(*this, "ssh", "identity");
  auto ready = first_seq(*this, "ssh", "ready");
  REQUIRE(connect != UINT64_MAX);
  REQUIRE(identity != UINT64_MAX);
  // Connected before the state loads (the agent never sees the host side closed),
  // the identity sent once the guest runs, SSH only after the agent answered.
  CHECK(entries("ssh", "identity connect")[0].detail == "/nonexistent/work/identity.sock");
  CHECK(connect < migrate);
  CHECK(cont < identity);
  CHECK(identity < ready);
  auto given = entries("ssh", "identity");
  REQUIRE(given.size() == 1);
  CHECK(given[0].detail == "ssh-ed25519 JOBKEY job");
  // The boot's time; the job's files go with the identity: the upload's directory,
  // the env file as the set-up would write it (secrets too, never on a command
  // line) and the steps' scripts as the steps would write them.
  CHECK(given[0].input ==
        "job-host-key 120000\n/opt/tools | " +
          make_env_file({{"SOLSTICE_JOB_ID", job.id()}, {"STAGE", "ci"}}, {{"TOKEN", "s3cret"}}) +
          " | " + make_step_script("make") + " | " + make_step_script("make test"));
  // The one SSH connection already uses the job's key and pins the job's host key.
  CHECK(ready_handle.boot_private_key().empty());
  CHECK(ready_handle.boot_host_key().empty());
  CHECK(ready_handle.private_key() == "job-private-key");
  CHECK(count("ssh", "ready") == 1);
  // No identity over SSH, no reconnect, no set-up: the upload, then the steps.
  CHECK(count("ssh", "rekey") == 0);
  auto execs = entries("ssh", "exec");
  REQUIRE(execs.size() == 2);
  // The agent wrote the scripts: the steps only run them (nothing on their stdin).
  CHECK(execs[0].extra == step_command_written(0));
  CHECK(execs[1].extra == step_command_written(1));
  CHECK(execs[0].input.empty());
  for (const auto& e : execs)
    CHECK(e.extra.find("authorized_keys") == std::string::npos);
  CHECK(first_seq(*this, "ssh", "put_file") < first_seq(*this, "ssh", "exec"));

  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.start() == "restored");
  // The phases add up: the state load, the identity exchange, the one handshake.
  std::vector<std::string> names;
  for (const auto& p : r.phases())
    names.push_back(p.phase());
  auto at = [&](const std::string& name) {
    return std::find(names.begin(), names.end(), name) - names.begin();
  };
  REQUIRE(has_phase(r, "restore"));
  REQUIRE(has_phase(r, "identity"));
  REQUIRE(has_phase(r, "ssh_ready"));
  CHECK_FALSE(has_phase(r, "setup"));  // it did not run: `identity` holds that work
  CHECK(at("restore") < at("identity"));
  CHECK(at("identity") < at("ssh_ready"));
  CHECK(at("ssh_ready") < at("console_handoff"));
}

TEST_CASE_FIXTURE(fixture, "a clone of a template whose cloud-init ended with errors says so, as a cold boot's set-up does") {
  keeper_answers = "ready";
  template_has_agent = true;
  SUBCASE("errors") {
    template_cloud_init_errors = true;
    start(two_step_job());
    drive();
    tick_until_result(*this);
    CHECK(has_notice_containing("cloud-init finished with errors in the guest"));
  }
  SUBCASE("none") {
    start(two_step_job());
    drive();
    tick_until_result(*this);
    CHECK_FALSE(has_notice_containing("cloud-init"));
  }
  CHECK(entries("ssh", "exec").size() == 2);  // no set-up in either case
  CHECK(result().status() == v1::SUCCEEDED);
}

TEST_CASE_FIXTURE(fixture, "a clone whose agent gave the identity but could not make the job's files gets the set-up over SSH") {
  keeper_answers = "ready";
  template_has_agent = true;
  identity_files_note = "mkdir: cannot create directory '/opt': Read-only file system";
  start(two_step_job());
  drive();
  tick_until_result(*this);
  auto execs = entries("ssh", "exec");
  REQUIRE(execs.size() == 3);
  CHECK(execs[0].extra == setup_command({}));
  // The steps write their scripts themselves, as after a cold boot.
  CHECK(execs[1].extra == step_command(0));
  CHECK(execs[1].input == make_step_script("make"));
  CHECK(first_seq(*this, "ssh", "identity") < first_seq(*this, "ssh", "exec"));
  CHECK(has_notice_containing("Read-only file system"));
  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.start() == "restored");  // not a failed restore: the template stays good
  CHECK(has_phase(r, "setup"));
  CHECK(count("ssh", "rekey") == 0);
}

TEST_CASE_FIXTURE(fixture, "a clone whose identity agent fails is a failed restore: the template is marked stale and the job boots cold") {
  keeper_answers = "ready";
  template_has_agent = true;
  identity_failure = "the guest's identity agent failed: no dropbear or OpenSSH server";
  start(two_step_job());
  drive();
  for (int i = 0; i < 10 && result_count() == 0; ++i) {
    sched.advance_time(timeouts.attempt.exit_report_grace);
    sched.trigger_timeouts();
    drive();
  }
  auto prepares = entries("qemu", "prepare");
  REQUIRE(prepares.size() == 2);
  CHECK(prepares[0].extra == "restore");
  CHECK(prepares[1].extra == "cold");
  // Nothing of the clone was reached over SSH: its only `ready` is the cold attempt's.
  CHECK(first_seq(*this, "ssh", "identity") < prepares[1].seq);
  CHECK(first_seq(*this, "ssh", "ready") > prepares[1].seq);
  CHECK(first_seq(*this, "qemu", "cleanup") < prepares[1].seq);
  CHECK(has_notice_containing("no dropbear or OpenSSH server"));
  CHECK(has_notice_containing("marked stale"));
  auto r = result();
  CHECK(r.status() == v1::SUCCEEDED);
  CHECK(r.start() == "cold");
  CHECK(r.start_note().find("identity") != std::string::npos);
}

// The host's start slots (job_start.cpp, max_concurrent_starts): a clone holds one
// from before its QEMU starts until its first output (a second after its guest
// is ready at most), 20 s at most in all. Time moves
// in steps here (advance_time fires only what is due; trigger_timeouts would fire
// the 20 s limit at once).
struct start_slot_fixture : fixture {
  test::TempDir state{"solstice-start-slots-"};
  start_slot_fixture() {
    slot_state_dir = state.path.string();  // one start slot
    keeper_answers = "ready";
    template_has_agent = true;
  }
  bool start_slot_free() {
    auto slot = VmSlot::try_acquire(slot_state_dir, 1, VmSlot::start_pool);
    REQUIRE(slot);
    return slot->has_value();
  }
  // Another restored job of this host is starting: it holds the only slot.
  VmSlot other_job_starting() {
    auto slot = VmSlot::try_acquire(slot_state_dir, 1, VmSlot::start_pool);
    REQUIRE(slot);
    REQUIRE(slot->has_value());
    return std::move(**slot);
  }
  void pass(std::chrono::milliseconds step, int times) {
    for (int i = 0; i < times; ++i) {
      sched.advance_time(step);
      drive();
    }
  }
};

TEST_CASE_FIXTURE(start_slot_fixture, "a clone waits for one of the host's start slots, restores once it frees, and frees its own at its first output") {
  int held_at_prepare = -1, held_at_ready = -1, held_at_first_exec = -1;
  on_note = [&](const entry& e) {
    if (e.actor == "qemu" && e.what == "prepare")
      held_at_prepare = !start_slot_free();
    if (e.actor == "ssh" && e.what == "ready")
      held_at_ready = !start_slot_free();
    if (e.actor == "ssh" && e.what == "exec" && held_at_first_exec < 0)
      held_at_first_exec = !start_slot_free();
  };
  step_plans[0].output = {chunk(v1::STDOUT, "first\n")};
  step_plans[0].hold = true;
  std::optional<VmSlot> other = other_job_starting();
  start(two_step_job());
  drive();
  pass(100ms, 5);
  CHECK(has_notice_containing("waiting to start: 1 restored jobs are starting on this host"));
  CHECK(count("qemu", "prepare") == 0);
  CHECK(result_count() == 0);

  other.reset();  // that job's guest is ready
  for (int i = 0; i < 50 && count("ssh", "exec") == 0; ++i)
    pass(100ms, 1);
  REQUIRE(count("ssh", "exec") == 1);
  CHECK(held_at_prepare == 1);
  CHECK(held_at_ready == 1);
  // Held while the first exec starts (the guest's session and shell take the
  // emulated CPU), given up with the step's first output.
  CHECK(held_at_first_exec == 1);
  on_note = nullptr;
  CHECK(start_slot_free());
  release_exec(0, 0);
  for (int i = 0; i < 50 && result_count() == 0; ++i)
    pass(100ms, 1);
  REQUIRE(result_count() == 1);
  CHECK(result().status() == v1::SUCCEEDED);
  CHECK(result().start() == "restored");
  CHECK(start_slot_free());
}

TEST_CASE_FIXTURE(start_slot_fixture, "a clone whose first step prints nothing frees its start slot a second after its guest is ready") {
  step_plans[0].hold = true;  // no output, no end
  start(two_step_job());
  drive();
  for (int i = 0; i < 50 && count("ssh", "exec") == 0; ++i)
    pass(100ms, 1);
  REQUIRE(count("ssh", "exec") == 1);
  CHECK_FALSE(start_slot_free());
  pass(100ms, 8);  // 0.8-0.9 s after the guest was ready
  CHECK_FALSE(start_slot_free());
  pass(100ms, 3);
  CHECK(start_slot_free());
  CHECK(result_count() == 0);  // the step goes on
  release_exec(0, 0);
  for (int i = 0; i < 50 && result_count() == 0; ++i)
    pass(100ms, 1);
  REQUIRE(result_count() == 1);
  CHECK(result().status() == v1::SUCCEEDED);
}

TEST_CASE_FIXTURE(start_slot_fixture, "a clone whose guest never gets ready gives its start slot up after 20 s") {
  ssh_answers_ready = false;  // SSH never answers
  start(two_step_job());
  drive();
  pass(1s, 3);
  REQUIRE(count("ssh", "ready") == 1);
  CHECK_FALSE(start_slot_free());
  pass(1s, 15);  // 18 s
  CHECK_FALSE(start_slot_free());
  pass(1s, 3);  // 21 s
  CHECK(start_slot_free());
  CHECK(result_count() == 0);  // the job itself goes on (its boot timeout is its own)
}

TEST_CASE_FIXTURE(start_slot_fixture, "a clone cancelled while it waits for a start slot ends cancelled, with no VM made") {
  auto other = other_job_starting();
  start(two_step_job());
  drive();
  pass(100ms, 3);
  REQUIRE(has_notice_containing("waiting to start"));
  caf::anon_send(supervisor, cancel_atom::value);
  drive();
  pass(100ms, 3);
  REQUIRE(result_count() == 1);
  CHECK(result().status() == v1::CANCELLED);
  CHECK(count("qemu", "prepare") == 0);
  // Its VM slot is free again (the one max_concurrent_vms allows).
  auto vm_slot = VmSlot::try_acquire(slot_state_dir, 1);
  REQUIRE(vm_slot);
  CHECK(vm_slot->has_value());
}
