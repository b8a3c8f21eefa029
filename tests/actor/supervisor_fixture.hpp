#pragma once
// Longer than most files: the fixture and the four fakes refer to each other
// (the fakes journal into the fixture, the fixture makes the fakes), so they
// are read together.
// The fixture of the job supervisor's tests on CAF's deterministic scheduler: the
// supervisor and its real VM attempt, with fakes for the attempt's children. The
// actors around the VM are fakes that implement the same typed interfaces and
// write everything they receive into one journal, numbered on one counter, so the
// tests can prove in which order things happened (above all: no exec before the
// console tailer has stopped or is gone).
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/detail/type_list.hpp>
#include <caf/exit_reason.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>
#include <nlohmann/json.hpp>

#include "actors/actors.hpp"
#include "actors/vm/job_supervisor.hpp"
#include "actors/runner_types.hpp"
#include "runtime/job/guest_commands.hpp"

// Readable failure messages for the state sequences and line lists compared below.
namespace doctest {
template <>
struct StringMaker<std::vector<solstice::v1::JobState>> {
  static String convert(const std::vector<solstice::v1::JobState>& states) {
    std::string out = "{";
    for (auto state : states)
      out += (out.size() > 1 ? ", " : "") + solstice::v1::JobState_Name(state);
    return (out + "}").c_str();
  }
};
template <>
struct StringMaker<std::vector<std::string>> {
  static String convert(const std::vector<std::string>& lines) {
    std::string out = "{";
    for (const auto& line : lines)
      out += (out.size() > 1 ? ", \"" : "\"") + line.substr(0, 80) + "\"";
    return (out + "}").c_str();
  }
};
}  // namespace doctest

namespace {

using namespace solstice;
using namespace std::chrono_literals;

// The fake executor's `done` with this id fails its held `ready`.
constexpr uint64_t fail_ready_op = UINT64_MAX;

// The supervisor's own set-up command in the guest runs as this step index.
constexpr uint32_t setup_step = UINT32_MAX;

struct test_config : caf::actor_system_config {
  test_config() {
    add_runner_types(*this);
    set("scheduler.policy", caf::atom("testing"));
  }
};

// One thing an actor received (or did), numbered on the fixture's one counter.
struct entry {
  uint64_t seq = 0;
  std::string actor;  // qemu, qmp, tailer, ssh, supervisor
  std::string what;   // the message, or what the actor did
  std::string detail;
  std::string extra;
  std::string input;  // an exec's stdin
};

// What the fake SSH executor does for one exec.
struct exec_plan {
  // Sent to the observer before the reply (step index filled in).
  std::vector<v1::OutputChunk> output;
  int32_t exit_code = 0;
  // Default: succeeded for exit code 0, failed otherwise.
  std::optional<v1::StepOutcome> outcome;
  // Keep the reply until the test releases it (see release_exec).
  bool hold = false;
};

inline v1::OutputChunk chunk(v1::OutputStream stream, std::string data) {
  v1::OutputChunk c;
  c.set_stream(stream);
  c.set_data(std::move(data));
  return c;
}

v1::Step make_step(std::string name, std::string script, bool allow_failure = false) {
  v1::Step step;
  step.set_name(std::move(name));
  step.set_script(std::move(script));
  step.set_allow_failure(allow_failure);
  return step;
}

v1::JobSpec job_with_steps(std::vector<v1::Step> steps) {
  v1::JobSpec job;
  job.set_id("job-1");
  job.set_name("protocol test");
  job.set_image("/images/test.qcow2");
  for (auto& step : steps)
    *job.add_steps() = std::move(step);
  return job;
}

v1::JobSpec two_step_job() {
  return job_with_steps({make_step("build", "make"), make_step("test", "make test")});
}

struct fixture;

// The fakes' own interfaces: the public ones plus what the test uses to poke them.
using fake_qemu_actor = qemu_process_actor::extend<caf::reacts_to<tick_atom>>;
using fake_tailer_actor = console_tailer_actor::extend<caf::reacts_to<tick_atom>>;
using fake_ssh_actor = ssh_executor_actor::extend<
  caf::reacts_to<done_atom, uint64_t, std::string, v1::StepResult>>;

fake_qemu_actor::behavior_type fake_qemu(fake_qemu_actor::pointer self, fixture* fx,
                                         qemu_observer_actor observer);
qmp_session_actor::behavior_type fake_qmp(qmp_session_actor::pointer self, fixture* fx);
fake_tailer_actor::behavior_type fake_tailer(fake_tailer_actor::pointer self, fixture* fx,
                                             console_observer_actor observer);
fake_ssh_actor::behavior_type fake_ssh(fake_ssh_actor::pointer self, fixture* fx,
                                       output_observer_actor observer);
event_sink_actor::behavior_type recording_sink(event_sink_actor::pointer self, fixture* fx);
template_keeper_actor::behavior_type fake_keeper(template_keeper_actor::pointer self, fixture* fx);

struct fixture {
  test_config cfg;
  caf::actor_system sys{cfg};
  caf::scheduler::test_coordinator& sched;

  // ---- how the fakes behave
  // The console tailer answers `stop` at once; otherwise it keeps the promise
  // until release_stop().
  bool tailer_answers_stop = true;
  // The tailer quits on its first tick, as if the console could not be read.
  bool tailer_dies_at_boot = false;
  // Lines the tailer sends on its first tick, and the ones it drains on `stop`.
  std::vector<std::string> boot_console_lines;
  std::vector<std::string> drained_console_lines;
  // The SSH executor answers `ready` at once; otherwise never (until cancel).
  bool ssh_answers_ready = true;
  exec_plan setup_plan;
  std::map<uint32_t, exec_plan> step_plans;
  // What `info usernet` prints (QEMU 7.2 layout).
  std::string usernet =
    "Hub -1 (#net000):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]  17       127.0.0.1 40001       10.0.2.15    22     0     0\r\n";
  // QEMU exits when powered down (or quit, or killed).
  bool guest_powers_off = true;
  supervisor_timeouts timeouts;
  // The accelerator the fake QEMU reports for attempt 1, 2, ... ("tcg" after the list).
  std::vector<std::string> accel_per_attempt;
  // The configured accelerator ("auto", "kvm", "tcg"; empty = leave unset).
  std::string configured_accel;
  // A state dir with max_concurrent_vms 1 and max_concurrent_starts 1, to see the
  // VM slot and the start slot taken and freed.
  std::string slot_state_dir;
  // Faults the fakes play from now on: QMP answers every request with an error;
  // SSH fails every operation.
  bool qmp_broken = false;
  bool ssh_broken = false;
  // Templates (job_start.cpp): with `keeper_answers`, the factory has a fake template
  // keeper; "ready" answers every lookup with a template, "build" has none until
  // asked to build, "fail" fails. `snapshots` goes into the config ("" = left out).
  std::string keeper_answers;
  std::string snapshots;
  // A restoring QEMU refuses the state (QMP migrate-incoming fails).
  bool restore_refused = false;
  // query-migrate answers "active" this many times before "completed".
  int migrate_polls_active = 1;
  // The template's guest runs the identity agent (clones take their identity over
  // the identity port); the agent's failure, when not empty.
  bool template_has_agent = false;
  bool template_cloud_init_errors = false;
  std::string identity_failure;
  // The agent's answer about the job's files ("" when it made them).
  std::string identity_files_note;
  // Called after each journal entry (the fault matrix injects faults here).
  std::function<void(const entry&)> on_note;
  // Fake children made, and how many of them have ended.
  size_t children_made = 0;
  size_t children_ended = 0;

  // ---- what happened
  uint64_t clock = 0;
  std::vector<entry> journal;
  std::vector<v1::JobEvent> events;
  std::vector<entry> uploads;  // detail = remote path, extra = content
  v1::VmHandle ready_handle;   // what `ready` was given
  uint64_t acked_bytes = 0;    // output bytes the supervisor acknowledged
  std::vector<uint32_t> exec_timeouts_ms;  // each exec's own timeout, in order
  std::optional<caf::error> tailer_exit_reason;
  bool supervisor_exited = false;
  bool tailer_down_seen = false;

  // ---- the actors (declared after `sys`: destroyed before it)
  job_supervisor_actor supervisor;
  event_sink_actor sink;
  fake_qemu_actor qemu;
  qmp_session_actor qmp;
  fake_tailer_actor tailer;
  fake_ssh_actor ssh;
  // The VM attempt the supervisor made (the fakes' observer); the last one.
  caf::actor attempt;
  v1::VmHandle vm;
  bool release_stop_requested = false;
  std::optional<v1::ProcessExit> pending_exit;
  std::optional<caf::typed_response_promise<stopped_atom>> held_stop;
  std::optional<caf::typed_response_promise<ok_atom>> held_ready;
  std::map<uint32_t, caf::typed_response_promise<v1::StepResult>> held_exec;

  fixture() : sched(dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler())) {}

  ~fixture() {
    if (std::getenv("SOLSTICE_TEST_TRACE")) {
      for (const auto& e : journal)
        std::fprintf(stderr, "%3llu %-10s %-22s %s\n", (unsigned long long)e.seq, e.actor.c_str(),
                     e.what.c_str(), e.detail.c_str());
      for (const auto& e : events)
        std::fprintf(stderr, "event %s\n", e.ShortDebugString().c_str());
    }
    held_stop.reset();
    held_ready.reset();
    held_exec.clear();
    for (auto handle : {caf::actor_cast<caf::actor>(supervisor), caf::actor_cast<caf::actor>(sink),
                        caf::actor_cast<caf::actor>(qemu), caf::actor_cast<caf::actor>(qmp),
                        caf::actor_cast<caf::actor>(tailer), caf::actor_cast<caf::actor>(ssh)})
      if (handle)
        caf::anon_send_exit(handle, caf::exit_reason::kill);
    // Pending timers (the job deadline above all) must fire, or ~actor_system waits.
    while (sched.has_job() || sched.has_pending_timeout()) {
      sched.run();
      sched.trigger_timeouts();
    }
  }

  const entry& note(std::string actor, std::string what, std::string detail = {},
                    std::string extra = {}, std::string input = {}) {
    journal.push_back({++clock, std::move(actor), std::move(what), std::move(detail),
                       std::move(extra), std::move(input)});
    if (on_note) {
      auto copy = journal.back();
      on_note(copy);
    }
    return journal.back();
  }

  vm_child_factory factory() {
    vm_child_factory f;
    f.qemu = [this](caf::actor_system& s, qemu_observer_actor observer) -> qemu_process_actor {
      attempt = caf::actor_cast<caf::actor>(observer);
      qemu = s.spawn(fake_qemu, this, std::move(observer));
      return counted(qemu);
    };
    f.qmp = [this](caf::actor_system& s, qmp_observer_actor) -> qmp_session_actor {
      qmp = s.spawn(fake_qmp, this);
      return counted(qmp);
    };
    f.console = [this](caf::actor_system& s, console_observer_actor observer,
                       console_capture) -> console_tailer_actor {
      tailer = s.spawn(fake_tailer, this, std::move(observer));
      caf::actor_cast<caf::abstract_actor*>(tailer)->attach_functor(
        [this](const caf::error& reason) {
          tailer_exit_reason = reason;
          note("tailer", "terminated", caf::to_string(reason));
        });
      return counted(tailer);
    };
    f.ssh = [this](caf::actor_system& s, output_observer_actor observer) -> ssh_executor_actor {
      ssh = s.spawn(fake_ssh, this, std::move(observer));
      return counted(ssh);
    };
    if (!keeper_answers.empty())
      f.templates = [this](caf::actor_system& s) -> template_keeper_actor {
        return s.spawn(fake_keeper, this);
      };
    return f;
  }

  // Counts the fake child's end (every child must end with its attempt).
  template <class Handle>
  Handle counted(Handle child) {
    ++children_made;
    caf::actor_cast<caf::abstract_actor*>(child)->attach_functor(
      [this](const caf::error&) { ++children_ended; });
    return child;
  }

  void start(v1::JobSpec job) {
    v1::ImageSpec image;
    image.set_label("test-image");
    image.set_disk(job.image());
    image.set_user("runner");
    v1::RunnerConfig config;
    config.set_boot_timeout_seconds(120);
    config.set_powerdown_timeout_seconds(30);
    if (!configured_accel.empty())
      config.set_accel(configured_accel);
    if (!snapshots.empty())
      config.set_snapshots(snapshots);
    // The host's start slots only with a state dir of the test's own.
    config.set_max_concurrent_starts(0);
    if (!slot_state_dir.empty()) {
      config.set_state_dir(slot_state_dir);
      config.set_max_concurrent_vms(1);
      config.set_max_concurrent_starts(1);
    }
    sink = sys.spawn(recording_sink, this);
    supervisor = sys.spawn(job_supervisor, std::move(job), image, config,
                           std::vector<event_sink_actor>{sink}, factory(), timeouts);
    caf::actor_cast<caf::abstract_actor*>(supervisor)->attach_functor(
      [this](const caf::error&) { supervisor_exited = true; });
    caf::anon_send(supervisor, start_atom::value);
  }

  // Whether the VM attempt's mailbox holds the DOWN message of the tailer.
  bool tailer_down_queued() {
    if (supervisor_exited || !attempt || !tailer_exit_reason || tailer_down_seen)
      return false;
    auto* actor = dynamic_cast<caf::scheduled_actor*>(
      caf::actor_cast<caf::abstract_actor*>(attempt));
    if (actor == nullptr)
      return false;
    auto& mailbox = actor->mailbox();
    // An idle actor's mailbox is "blocked": it holds nothing, and taking from it
    // would unblock it behind the scheduler's back.
    if (mailbox.closed() || mailbox.blocked())
      return false;
    bool found = false;
    mailbox.fetch_more();
    mailbox.queue().peek_all([&](const caf::mailbox_element& element) {
      const auto& content = element.content();
      if (content.match_elements<caf::down_msg>() &&
          content.get_as<caf::down_msg>(0).source == tailer.address())
        found = true;
    });
    return found;
  }

  // Whether `handle`'s actor is waiting in the scheduler's job queue.
  template <class Handle>
  bool has_queued_job(const Handle& handle) const {
    auto* job = dynamic_cast<caf::resumable*>(caf::actor_cast<caf::abstract_actor*>(handle));
    return std::find(sched.jobs.begin(), sched.jobs.end(), job) != sched.jobs.end();
  }

  // Runs every queued message, one at a time, and notes the moment the VM attempt
  // takes the tailer's DOWN message from its mailbox.
  void drive() {
    for (size_t n = 0; sched.has_job(); ++n) {
      REQUIRE_MESSAGE(n < 100000, "the actors never went idle");
      bool down_queued = tailer_down_queued();
      sched.run_once();
      if (down_queued && !tailer_down_queued() && !supervisor_exited) {
        tailer_down_seen = true;
        note("attempt", "processed tailer DOWN");
      }
    }
  }

  // The tailer delivers its held `stopped` (from inside the tailer).
  void release_stop() {
    release_stop_requested = true;
    caf::anon_send(tailer, tick_atom::value);
  }

  // The executor fails its held `ready` with an SSH error (from inside the executor).
  void fail_ready(const std::string& why) {
    caf::anon_send(ssh, done_atom::value, fail_ready_op, why, v1::StepResult{});
  }

  // The executor delivers the held reply of `step` (from inside the executor).
  void release_exec(uint32_t step, int32_t exit_code) {
    v1::StepResult result;
    result.set_step_index(step);
    result.set_exit_code(exit_code);
    result.set_outcome(exit_code == 0 ? v1::STEP_SUCCEEDED : v1::STEP_FAILED);
    caf::anon_send(ssh, done_atom::value, uint64_t{step}, std::string{}, result);
  }

  // QEMU exits by itself now.
  void qemu_exits(v1::ProcessExit exit) {
    pending_exit = std::move(exit);
    caf::anon_send(qemu, tick_atom::value);
  }

  // ---- reading what happened
  std::vector<entry> entries(const std::string& actor, const std::string& what = {}) const {
    std::vector<entry> out;
    for (const auto& e : journal)
      if (e.actor == actor && (what.empty() || e.what == what))
        out.push_back(e);
    return out;
  }

  size_t count(const std::string& actor, const std::string& what) const {
    return entries(actor, what).size();
  }

  std::vector<v1::JobState> states() const {
    std::vector<v1::JobState> out;
    for (const auto& event : events)
      if (event.has_state())
        out.push_back(event.state().state());
    return out;
  }

  size_t result_count() const {
    return static_cast<size_t>(
      std::count_if(events.begin(), events.end(), [](const auto& e) { return e.has_result(); }));
  }

  v1::JobResult result() const {
    REQUIRE(result_count() == 1);
    REQUIRE(events.back().has_result());
    return events.back().result();
  }

  // Index in `events` of the first state change to `state`, or events.size().
  size_t state_index(v1::JobState state) const {
    for (size_t i = 0; i < events.size(); ++i)
      if (events[i].has_state() && events[i].state().state() == state)
        return i;
    return events.size();
  }

  std::vector<std::string> console_lines() const {
    std::vector<std::string> out;
    for (const auto& event : events)
      if (event.has_console())
        out.push_back(event.console().line());
    return out;
  }

  std::string output_of(uint32_t step, v1::OutputStream stream) const {
    std::string out;
    for (const auto& event : events)
      if (event.has_output() && event.output().step_index() == step &&
          event.output().stream() == stream)
        out += event.output().data();
    return out;
  }

  bool has_phase(const v1::JobResult& r, const std::string& phase) const {
    return std::any_of(r.phases().begin(), r.phases().end(),
                       [&](const auto& p) { return p.phase() == phase; });
  }

  bool has_notice_containing(const std::string& text) const {
    return std::any_of(events.begin(), events.end(), [&](const auto& e) {
      return e.has_notice() && e.notice().message().find(text) != std::string::npos;
    });
  }
};

// ------------------------------------------------------------------ the fakes

fake_qemu_actor::behavior_type fake_qemu(fake_qemu_actor::pointer self, fixture* fx,
                                         qemu_observer_actor observer) {
  return {
    [=](prepare_atom, const v1::JobSpec& job, const v1::ImageSpec& image,
        const v1::RunnerConfig&, uint32_t) -> v1::VmHandle {
      fx->note("qemu", "prepare", job.id(), image.has_restore_from() ? "restore" : "cold");
      v1::VmHandle handle;
      if (image.has_restore_from()) {
        handle.set_incoming_state(image.restore_from().state_file());
        handle.set_boot_private_key(image.restore_from().template_private_key());
        handle.set_boot_host_key(image.restore_from().template_host_key());
        handle.set_template_id(image.restore_from().template_id());
        handle.set_private_key("job-private-key");
        handle.set_public_key("ssh-ed25519 JOBKEY job");
        handle.set_host_key_private("job-host-key");
        handle.set_identity_socket("/nonexistent/work/identity.sock");
        handle.set_identity_agent(image.restore_from().identity_agent());
      }
      handle.set_job_id(job.id());
      handle.set_work_dir("/nonexistent/work");
      handle.set_job_dir("/nonexistent/job");
      auto n = fx->count("qemu", "prepare") - 1;
      handle.set_accel(n < fx->accel_per_attempt.size() ? fx->accel_per_attempt[n] : "tcg");
      handle.set_vcpus(2);
      handle.set_memory_mib(1024);
      handle.set_disk(image.disk());
      handle.set_qmp_socket("/nonexistent/work/qmp.sock");
      handle.set_console_log("/nonexistent/job/console.log");
      handle.set_user(image.user());
      fx->vm = handle;
      return handle;
    },
    [=](launch_atom) -> v1::VmHandle {
      fx->note("qemu", "launch");
      auto handle = fx->vm;
      // A process that runs (this test's own): the VM attempt checks QEMU is alive.
      handle.set_qemu_pid(static_cast<int32_t>(::getpid()));
      return handle;
    },
    [=](kill_atom) {
      fx->note("qemu", "kill");
      v1::ProcessExit exit;
      exit.set_signaled(true);
      exit.set_signal(9);
      exit.set_code(137);
      exit.set_description("signal 9 (KILL)");
      fx->pending_exit = exit;
      self->send(self, tick_atom::value);
    },
    [=](cleanup_atom) -> ok_atom {
      fx->note("qemu", "cleanup");
      return ok_atom::value;
    },
    [=](tick_atom) {
      if (!fx->pending_exit)
        return;
      auto exit = *std::exchange(fx->pending_exit, std::nullopt);
      fx->note("qemu", "exited", exit.description());
      self->send(observer, exited_atom::value, exit);
    },
  };
}

qmp_session_actor::behavior_type fake_qmp(qmp_session_actor::pointer self, fixture* fx) {
  return {
    [=](connect_atom, const std::string& socket, uint32_t, int32_t) -> caf::result<ok_atom> {
      fx->note("qmp", "connect", socket);
      if (fx->qmp_broken)
        return caf::make_error(runner_errc::qmp_failed, "QMP socket " + socket + " never appeared");
      return ok_atom::value;
    },
    [=](command_atom, const std::string& name, const std::string& args) -> caf::result<std::string> {
      fx->note("qmp", "command", name, args);
      if (fx->qmp_broken)
        return caf::make_error(runner_errc::qmp_failed, "QEMU closed the QMP connection");
      if (name == "human-monitor-command")
        return nlohmann::json(fx->usernet).dump();
      if (name == "migrate-incoming" && fx->restore_refused)
        return caf::make_error(runner_errc::qmp_failed, "QMP command migrate-incoming failed: "
                                                        "GenericError: load of migration failed");
      if (name == "query-migrate") {
        auto status = fx->migrate_polls_active-- > 0 ? "active" : "completed";
        return nlohmann::json{{"status", status}}.dump();
      }
      if ((name == "system_powerdown" || name == "quit") && fx->guest_powers_off) {
        v1::ProcessExit exit;
        exit.set_description("exit code 0");
        fx->pending_exit = exit;
        self->send(fx->qemu, tick_atom::value);
      }
      return "{}";
    },
  };
}

fake_tailer_actor::behavior_type fake_tailer(fake_tailer_actor::pointer self, fixture* fx,
                                             console_observer_actor observer) {
  auto deliver = [=](caf::typed_response_promise<stopped_atom>& rp) {
    for (const auto& line : std::exchange(fx->drained_console_lines, {}))
      self->send(observer, console_atom::value, line);
    fx->note("tailer", "stopped");
    rp.deliver(stopped_atom::value);
  };
  self->send(self, tick_atom::value);
  return {
    [=](stop_atom) mutable {
      fx->note("tailer", "stop");
      auto rp = self->make_response_promise<stopped_atom>();
      if (fx->tailer_answers_stop)
        deliver(rp);
      else
        fx->held_stop = rp;
      return rp;
    },
    [=](tick_atom) mutable {
      if (fx->tailer_dies_at_boot) {
        self->quit(caf::make_error(runner_errc::console_failed, "cannot read the console"));
        return;
      }
      for (const auto& line : std::exchange(fx->boot_console_lines, {}))
        self->send(observer, console_atom::value, line);
      if (fx->release_stop_requested && fx->held_stop) {
        auto rp = *std::exchange(fx->held_stop, std::nullopt);
        deliver(rp);
      }
    },
  };
}

// The fake counts the output bytes the supervisor acknowledges (flow control).
template <class... Handlers>
fake_ssh_actor::behavior_type ssh_behavior(fixture* fx, Handlers... handlers) {
  return {handlers..., [=](ack_atom, uint64_t bytes) { fx->acked_bytes += bytes; },
          [=](rekey_atom, const v1::VmHandle& handle, uint32_t timeout_ms) -> caf::result<ok_atom> {
            fx->note("ssh", "rekey", std::to_string(handle.ssh_port()), std::to_string(timeout_ms));
            return ok_atom::value;
          },
          [=](connect_atom, const std::string& socket, uint32_t timeout_ms) -> caf::result<ok_atom> {
            fx->note("ssh", "identity connect", socket, std::to_string(timeout_ms));
            return ok_atom::value;
          },
          // detail: the key the guest is given; extra: the boot key still in the handle.
          // input: the host key and timeout, then the job files (directories | env
          // file | each step script, then |).
          [=](identity_atom, const v1::VmHandle& handle, const std::vector<std::string>& directories,
              const std::string& env_file, const std::vector<std::string>& step_scripts,
              uint32_t timeout_ms) -> caf::result<std::string> {
            std::string files;
            for (const auto& directory : directories)
              files += directory + " ";
            files += "| " + env_file;
            for (const auto& script : step_scripts)
              files += " | " + script;
            fx->note("ssh", "identity", handle.public_key(), handle.boot_private_key(),
                     handle.host_key_private() + " " + std::to_string(timeout_ms) + "\n" + files);
            if (!fx->identity_failure.empty())
              return caf::make_error(runner_errc::ssh_failed, fx->identity_failure);
            return fx->identity_files_note;
          }};
}

fake_ssh_actor::behavior_type fake_ssh(fake_ssh_actor::pointer self, fixture* fx,
                                       output_observer_actor observer) {
  auto cancelled = [] { return caf::make_error(runner_errc::cancelled, "cancelled"); };
  return ssh_behavior(
    fx,
    [=](ready_atom, const v1::VmHandle& handle, uint32_t timeout_ms) {
      fx->note("ssh", "ready", std::to_string(handle.ssh_port()), std::to_string(timeout_ms));
      fx->ready_handle = handle;
      auto rp = self->make_response_promise<ok_atom>();
      if (fx->ssh_broken)
        rp.deliver(caf::make_error(runner_errc::ssh_failed, "connection refused"));
      else if (fx->ssh_answers_ready)
        rp.deliver(ok_atom::value);
      else
        fx->held_ready = rp;
      return rp;
    },
    [=](upload_atom, const std::string& content, const std::string& remote,
        uint32_t mode) -> caf::result<ok_atom> {
      const auto& e = fx->note("ssh", "upload", remote, std::to_string(mode));
      if (fx->ssh_broken)
        return caf::make_error(runner_errc::ssh_failed, "connection reset");
      fx->uploads.push_back({e.seq, "ssh", "upload", remote, content, {}});
      return ok_atom::value;
    },
    [=](put_file_atom, const std::string& local, const std::string& remote,
        uint32_t) -> caf::result<ok_atom> {
      fx->note("ssh", "put_file", local, remote);
      if (fx->ssh_broken)
        return caf::make_error(runner_errc::ssh_failed, "connection reset");
      return ok_atom::value;
    },
    [=](download_atom, const std::string& remote, const std::string& local,
        uint64_t) -> caf::result<ok_atom> {
      fx->note("ssh", "download", remote, local);
      if (fx->ssh_broken)
        return caf::make_error(runner_errc::ssh_failed, "connection reset");
      return ok_atom::value;
    },
    [=](exec_atom, uint32_t step, const std::string& command, const std::string& input,
        uint32_t timeout_ms) {
      fx->note("ssh", "exec", std::to_string(step), command, input);
      fx->exec_timeouts_ms.push_back(timeout_ms);
      auto rp = self->make_response_promise<v1::StepResult>();
      if (fx->ssh_broken) {
        rp.deliver(caf::make_error(runner_errc::ssh_failed, "connection reset"));
        return rp;
      }
      const auto& plan = step == setup_step ? fx->setup_plan : fx->step_plans[step];
      for (auto c : plan.output) {
        c.set_step_index(step);
        self->send(observer, output_atom::value, c);
      }
      if (plan.hold) {
        fx->held_exec.emplace(step, rp);
        return rp;
      }
      v1::StepResult result;
      result.set_step_index(step);
      result.set_exit_code(plan.exit_code);
      result.set_outcome(
        plan.outcome.value_or(plan.exit_code == 0 ? v1::STEP_SUCCEEDED : v1::STEP_FAILED));
      rp.deliver(result);
      return rp;
    },
    [=](cancel_atom) {
      fx->note("ssh", "cancel");
      for (auto& [step, rp] : std::exchange(fx->held_exec, {}))
        rp.deliver(cancelled());
      if (fx->held_ready)
        std::exchange(fx->held_ready, std::nullopt)->deliver(cancelled());
    },
    // The test's way to release a held exec reply (uint64_t = step index), or
    // to fail the held `ready` (fail_ready_op).
    [=](done_atom, uint64_t step, const std::string& why, const v1::StepResult& result) {
      if (step == fail_ready_op) {
        if (fx->held_ready)
          std::exchange(fx->held_ready, std::nullopt)
            ->deliver(caf::make_error(runner_errc::ssh_failed, why));
        return;
      }
      auto i = fx->held_exec.find(static_cast<uint32_t>(step));
      if (i == fx->held_exec.end())
        return;
      auto rp = i->second;
      fx->held_exec.erase(i);
      fx->note("ssh", "exec reply", std::to_string(step));
      rp.deliver(result);
    },
    [=](release_atom) { fx->note("ssh", "release"); });
}

template_keeper_actor::behavior_type fake_keeper(template_keeper_actor::pointer, fixture* fx) {
  return {
    [=](template_atom, v1::ImageSpec image, const v1::RunnerConfig&, const std::string& accel,
        bool build) -> caf::result<v1::ImageSpec, bool> {
      fx->note("keeper", build ? "build" : "lookup", accel);
      if (fx->keeper_answers == "fail")
        return caf::make_error(runner_errc::prepare_failed, "the template's guest did not get to SSH");
      if (fx->keeper_answers == "build" && !build)
        return {std::move(image), false};
      auto* from = image.mutable_restore_from();
      from->set_template_id("tmpl-1");
      from->set_state_file("/nonexistent/templates/tmpl-1/state");
      from->set_template_private_key("template-private-key");
      from->set_template_host_key("template-host-key");
      from->set_identity_agent(fx->template_has_agent);
      from->set_cloud_init_errors(fx->template_cloud_init_errors);
      return {std::move(image), build};
    },
  };
}

event_sink_actor::behavior_type recording_sink(event_sink_actor::pointer, fixture* fx) {
  return {
    [=](event_atom, const v1::JobEvent& event) { fx->events.push_back(event); },
  };
}

const std::vector<v1::JobState> full_run_states = {
  v1::QUEUED,  v1::PREPARING,     v1::BOOTING,    v1::WAITING_FOR_SSH,
  v1::CONSOLE_HANDOFF, v1::RUNNING, v1::SHUTTING_DOWN, v1::CLEANED_UP};

}  // namespace
