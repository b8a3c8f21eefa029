// The fault matrix: every fault at every point of a job's life, for each
// accelerator setting, on CAF's deterministic scheduler with the real job
// supervisor and VM attempt around fake children. Generated, not hand-listed:
// each combination must end in exactly one result (the last event) with the
// status the fault calls for, every child actor ended, the VM's files removed
// for every attempt, and the host's VM slot free again.
#include <cstdlib>
#include <filesystem>

#include "runtime/job/job_result.hpp"
#include "runtime/vm/vm_slots.hpp"
#include "supervisor_fixture.hpp"
#include "../unit/temp_dir.hpp"

namespace {

using namespace solstice;
using namespace std::chrono_literals;

enum class fault {
  qemu_exits_with_code,
  qemu_killed_by_signal,
  vm_stops,       // QMP STOP, as on a KVM internal error
  qmp_breaks,     // the socket never appears / QEMU closes it
  tailer_dies,
  ssh_breaks,     // never ready / the connection drops
  cancel,
  second_cancel,
  job_timeout,
  step_timeout,
};

const std::vector<fault> all_faults = {
  fault::qemu_exits_with_code, fault::qemu_killed_by_signal, fault::vm_stops,
  fault::qmp_breaks,           fault::tailer_dies,           fault::ssh_breaks,
  fault::cancel,               fault::second_cancel,         fault::job_timeout,
  fault::step_timeout};

const char* name_of(fault f) {
  switch (f) {
    case fault::qemu_exits_with_code: return "QEMU exits (code)";
    case fault::qemu_killed_by_signal: return "QEMU exits (signal)";
    case fault::vm_stops: return "VM stops";
    case fault::qmp_breaks: return "QMP breaks";
    case fault::tailer_dies: return "tailer dies";
    case fault::ssh_breaks: return "SSH breaks";
    case fault::cancel: return "cancel";
    case fault::second_cancel: return "second cancel";
    case fault::job_timeout: return "job timeout";
    case fault::step_timeout: return "step timeout";
  }
  return "?";
}

enum class stage { before_qemu, boot, handoff, work, shutdown };

// Where a fault strikes: the moment a fake child takes this message, before it
// answers.
struct point {
  std::string actor, what, detail;  // detail empty: any
  stage where;
  std::string label;
};

std::vector<point> all_points() {
  return {
    {"qemu", "prepare", "", stage::before_qemu, "preparing"},
    {"qemu", "launch", "", stage::boot, "launching (before QMP connects)"},
    {"qmp", "connect", "", stage::boot, "QMP connecting"},
    {"qmp", "command", "human-monitor-command", stage::boot, "reading the SSH port"},
    {"ssh", "ready", "", stage::boot, "waiting for SSH"},
    {"tailer", "stop", "", stage::handoff, "console hand-off"},
    {"ssh", "exec", std::to_string(runner_setup_step), stage::work, "set-up"},
    {"ssh", "exec", "0", stage::work, "step 1 running"},
    {"ssh", "download", "", stage::work, "collecting artifacts"},
    {"qmp", "command", "system_powerdown", stage::shutdown, "powering down"},
  };
}

bool applies(fault f, const point& p) {
  bool qemu_runs = p.where != stage::before_qemu;
  switch (f) {
    case fault::qemu_exits_with_code:
    case fault::qemu_killed_by_signal:
    case fault::vm_stops: return qemu_runs;
    case fault::step_timeout: return p.label == "step 1 running";
    default: return true;
  }
}

// What the job must end as.
v1::JobStatus expected_status(fault f, const point& p, const std::string& accel) {
  if (p.where == stage::shutdown)
    return v1::SUCCEEDED;  // decided before the fault
  switch (f) {
    case fault::qemu_exits_with_code:
    case fault::qemu_killed_by_signal:
    case fault::vm_stops:
      if (p.where == stage::boot)  // KVM's shapes: "auto" retries on TCG
        return accel == "auto" ? v1::SUCCEEDED : v1::INFRASTRUCTURE_ERROR;
      // The last artifact's reply reaches the supervisor before the VM's end
      // does: the job's work was complete. A paused VM only gets a notice.
      if (f == fault::vm_stops || p.label == "collecting artifacts")
        return v1::SUCCEEDED;
      return v1::INFRASTRUCTURE_ERROR;
    case fault::qmp_breaks:
      // The VM can no longer be controlled: it is lost (after a short wait for
      // QEMU's exit report, so the last artifact's reply comes first).
      return p.label == "collecting artifacts" ? v1::SUCCEEDED : v1::INFRASTRUCTURE_ERROR;
    case fault::tailer_dies: return v1::SUCCEEDED;
    case fault::ssh_breaks:
      // A missing artifact fails the job; anything else SSH does is infrastructure.
      return p.label == "collecting artifacts" ? v1::FAILED : v1::INFRASTRUCTURE_ERROR;
    case fault::cancel:
    case fault::second_cancel: return v1::CANCELLED;
    case fault::job_timeout:
    case fault::step_timeout: return v1::TIMED_OUT;
  }
  return v1::JOB_STATUS_UNSPECIFIED;
}

struct matrix_run : fixture {
  std::optional<point> at;
  fault what = fault::cancel;
  bool fired = false;

  void strike() {
    v1::ProcessExit exit;
    v1::QmpEvent stop;
    switch (what) {
      case fault::qemu_exits_with_code:
        exit.set_code(1);
        exit.set_description("exit code 1");
        exit.set_stderr_tail("qemu: fatal: something went wrong\n");
        caf::anon_send(caf::actor_cast<qemu_observer_actor>(attempt), exited_atom::value, exit);
        return;
      case fault::qemu_killed_by_signal:
        exit.set_signaled(true);
        exit.set_signal(6);
        exit.set_code(134);
        exit.set_description("signal 6 (ABRT)");
        exit.set_stderr_tail("kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n");
        caf::anon_send(caf::actor_cast<qemu_observer_actor>(attempt), exited_atom::value, exit);
        return;
      case fault::vm_stops:
        stop.set_name("STOP");
        stop.set_data_json("{}");
        caf::anon_send(caf::actor_cast<qmp_observer_actor>(attempt), qmp_event_atom::value, stop);
        return;
      case fault::qmp_breaks:
        // The VM's loss is known only after the grace for QEMU's exit report;
        // the guest's work takes longer than that (it is held until cancelled).
        setup_plan.hold = true;
        step_plans[0].hold = true;
        step_plans[1].hold = true;
        qmp_broken = true;
        caf::anon_send(caf::actor_cast<qmp_observer_actor>(attempt), qmp_closed_atom::value,
                       std::string{"QEMU closed its QMP connection"});
        return;
      case fault::tailer_dies: caf::anon_send_exit(tailer, caf::exit_reason::kill); return;
      case fault::ssh_breaks: ssh_broken = true; return;
      case fault::second_cancel: caf::anon_send(supervisor, cancel_atom::value); [[fallthrough]];
      case fault::cancel: caf::anon_send(supervisor, cancel_atom::value); return;
      case fault::job_timeout: sched.advance_time(6s); return;  // the job's timeout is 5 s
      case fault::step_timeout: return;                           // planned before the start
    }
  }

  void arm(const point& p, fault f, const std::string& accel) {
    at = p;
    what = f;
    configured_accel = accel;
    accel_per_attempt = accel == "tcg" ? std::vector<std::string>{"tcg"}
                                       : std::vector<std::string>{"kvm", "tcg"};
    if (f == fault::step_timeout)
      step_plans[0].outcome = v1::STEP_TIMED_OUT;
    on_note = [this](const entry& e) {
      if (fired || e.actor != at->actor || e.what != at->what ||
          (!at->detail.empty() && e.detail != at->detail))
        return;
      fired = true;
      strike();
    };
  }

  // Runs everything, letting time pass while only timers are left.
  void run_to_end() {
    for (int idle = 0; !supervisor_exited && idle < 400; ++idle) {
      drive();
      if (!supervisor_exited)
        sched.advance_time(500ms);
    }
  }
};

v1::JobSpec matrix_job() {
  auto job = two_step_job();
  job.set_timeout_seconds(5);
  auto* artifact = job.add_artifacts();
  artifact->set_path("/tmp/out.txt");
  return job;
}

}  // namespace

TEST_CASE("fault matrix: every fault at every point ends in one honest result and leaves nothing") {
  size_t combinations = 0;
  for (const auto& accel : {std::string{"auto"}, std::string{"kvm"}, std::string{"tcg"}})
    for (const auto& p : all_points())
      for (auto f : all_faults) {
        if (!applies(f, p))
          continue;
        ++combinations;
        CAPTURE(accel);
        CAPTURE(p.label);
        auto fault_name = std::string{name_of(f)};
        CAPTURE(fault_name);
        test::TempDir state("solstice-matrix-");
        auto expected = expected_status(f, p, accel);
        {
          matrix_run run;
          run.slot_state_dir = state.path.string();
          run.arm(p, f, accel);
          run.start(matrix_job());
          run.run_to_end();
          REQUIRE(run.fired);
          REQUIRE(run.supervisor_exited);
          REQUIRE(run.result_count() == 1);
          REQUIRE(run.events.back().has_result());
          auto r = run.events.back().result();
          CHECK_MESSAGE(r.status() == expected, r.ShortDebugString());
          CHECK(r.exit_code() == exit_code_for(r.status(), r.status() == v1::FAILED ? 1 : 0));
          if (expected == v1::INFRASTRUCTURE_ERROR && accel == "kvm" && p.where == stage::boot &&
              (f == fault::qemu_exits_with_code || f == fault::qemu_killed_by_signal ||
               f == fault::vm_stops))
            CHECK(r.error().find("KVM") != std::string::npos);
          if (expected == v1::SUCCEEDED && accel == "auto" && p.where == stage::boot &&
              f != fault::qmp_breaks && f != fault::ssh_breaks && f != fault::tailer_dies &&
              f != fault::cancel && f != fault::second_cancel && f != fault::job_timeout)
            CHECK(run.has_notice_containing("falling back to TCG"));
          // Every attempt that made VM files removed them.
          CHECK(run.count("qemu", "cleanup") == run.count("qemu", "prepare"));
          run.drive();
          CHECK(run.children_ended == run.children_made);
        }
        // The host's VM slot is free again.
        auto slot = VmSlot::try_acquire(state.path.string(), 1);
        REQUIRE(slot);
        CHECK(slot->has_value());
      }
  MESSAGE("fault matrix: " << combinations << " combinations ran");
  CHECK(combinations > 200);
}
