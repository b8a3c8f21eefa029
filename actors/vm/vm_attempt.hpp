#pragma once
// One boot attempt of a job's VM: prepare, launch, QMP, SSH ready, console
// hand-off, shutdown. It owns the attempt's four children and is the only actor
// they report to; the job supervisor hears from it through attempt_observer_actor.
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <caf/typed_response_promise.hpp>

#include "actors/actors.hpp"
#include "actors/vm/console_tailer.hpp"  // console_capture

namespace solstice {

// How an attempt makes its children. The default spawns the real actors
// (detached where they block); tests put in their own.
struct vm_child_factory {
  std::function<qemu_process_actor(caf::actor_system&, qemu_observer_actor)> qemu;
  std::function<qmp_session_actor(caf::actor_system&, qmp_observer_actor)> qmp;
  std::function<console_tailer_actor(caf::actor_system&, console_observer_actor, console_capture)>
    console;
  std::function<ssh_executor_actor(caf::actor_system&, output_observer_actor)> ssh;
  // Templates for restored starts; empty: every job boots cold (actor tests).
  std::function<template_keeper_actor(caf::actor_system&)> templates;
};

vm_child_factory real_vm_children();

struct vm_attempt_timeouts {
  std::chrono::milliseconds prepare{std::chrono::minutes(2)};
  std::chrono::milliseconds launch{std::chrono::seconds(30)};
  std::chrono::milliseconds qmp_connect{std::chrono::seconds(10)};
  std::chrono::milliseconds qmp_command{std::chrono::seconds(15)};
  // How long the console tailer has to answer `stop` before it is killed.
  std::chrono::milliseconds console_stop{std::chrono::seconds(5)};
  // After `quit`, and after SIGKILL, how long to wait for QEMU's exit.
  std::chrono::milliseconds quit_wait{std::chrono::seconds(5)};
  std::chrono::milliseconds kill_wait{std::chrono::seconds(5)};
  // How long an SSH/QMP failure waits for a QEMU exit report that would explain it.
  std::chrono::milliseconds exit_report_grace{500};
};

// What one attempt boots.
struct vm_attempt_spec {
  v1::JobSpec job;
  v1::ImageSpec image;
  v1::RunnerConfig config;  // accel as the attempt must use it ("auto", "kvm", "tcg")
  uint32_t number = 1;      // 1 for the first attempt of a job
};

// Console lines kept for error reports.
inline constexpr size_t console_tail_lines = 30;

// Where the attempt is. Each phase accepts only the messages that make sense in
// it; anything else is logged as unexpected and changes nothing.
enum class attempt_phase {
  idle,             // made, `boot` not asked yet
  preparing,        // qemu_process makes the VM's files
  launching,        // QEMU is being started
  connecting_qmp,   // waiting for QMP's greeting
  reading_port,     // asking QEMU which port the SSH forward got
  restoring,        // a clone: QMP migrate-incoming of the template's state, then cont
  identifying,      // a clone: its identity goes over its virtio-serial port, before SSH
  waiting_for_ssh,  // polling SSH until handshake and auth succeed
  booted,           // SSH works; the console tailer still runs
  handing_off,      // waiting for the tailer's `stopped` (or its DOWN)
  handed_off,       // the SSH executor is released: the job's steps run
  failed,           // boot failed and was reported; waiting for `shutdown`
  lost,             // the booted VM went away and was reported; waiting for `shutdown`
  shutting_down,    // powerdown / quit / kill, then cleanup
  ended,            // replied to `shutdown`; quitting
};

const char* to_string(attempt_phase phase);

// Where a shutdown is: which way QEMU is being asked to end.
enum class shutdown_stage { powerdown, quit, kill, cleanup };

struct vm_attempt_state {
  static inline const char* name = "vm_attempt";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  vm_attempt_state() = default;

  vm_attempt_spec spec;
  vm_child_factory factory;
  vm_attempt_timeouts timeouts;
  attempt_observer_actor observer;
  output_observer_actor output_observer;
  // Held by every child: whatever the supervisor wants to outlive them all.
  std::shared_ptr<void> keep_alive;

  attempt_phase phase = attempt_phase::idle;
  v1::VmHandle vm;
  qemu_process_actor qemu;
  qmp_session_actor qmp;
  console_tailer_actor tailer;
  ssh_executor_actor ssh;
  // Every child made; shared with the attach functor that ends them with the
  // attempt (the state is gone by the time it runs).
  std::shared_ptr<std::vector<caf::actor>> children = std::make_shared<std::vector<caf::actor>>();

  // What is known of QEMU and its guest.
  enum class qemu_status { not_started, running, exited } qemu_state = qemu_status::not_started;
  v1::ProcessExit qemu_exit;
  std::string ended_by = "exited";  // how QEMU's exit came: "exited", or the shutdown stage
  bool qmp_connected = false;
  bool vm_paused = false;     // STOP without RESUME: the guest cannot see the power button
  bool tailer_gone = false;   // the tailer ended (stopped, killed or died)
  bool ssh_was_ready = false; // a guest that never got to SSH gets a short powerdown
  std::deque<std::string> console_tail;

  // A boot failure (or, once booted, a lost QMP connection) held for
  // `exit_report_grace`: QEMU's exit, if it comes, names the real cause.
  std::optional<std::string> held_failure;
  uint64_t held_token = 0;

  shutdown_stage stage = shutdown_stage::powerdown;
  uint64_t stage_token = 0;
  std::string shutdown_problem;  // e.g. QEMU did not exit after SIGKILL
  uint64_t next_token = 1;

  // A restore polls query-migrate with this timer token until the state is loaded.
  uint64_t restore_token = 0;

  std::optional<caf::typed_response_promise<v1::VmHandle>> boot_reply;
  std::optional<caf::typed_response_promise<guest_shell_actor>> handoff_reply;
  std::vector<caf::typed_response_promise<std::string>> shutdown_replies;
};

// The attempt's own interface: the public one, the observer interfaces of its
// children, and its timers (which only it sends).
using vm_attempt_internal = vm_attempt_actor::extend_with<
  qemu_observer_actor, qmp_observer_actor, console_observer_actor>::extend<
  caf::reacts_to<timeout_atom, uint64_t>>;

// One boot attempt. `observer` hears the attempt's boot phases, console lines,
// notices and a lost VM; `output_observer` gets the SSH executor's step output.
// Spawn it as an ordinary (scheduled) actor: it never blocks.
vm_attempt_internal::behavior_type
vm_attempt(vm_attempt_internal::stateful_pointer<vm_attempt_state> self, vm_attempt_spec spec,
           vm_child_factory factory, vm_attempt_timeouts timeouts,
           attempt_observer_actor observer, output_observer_actor output_observer,
           std::shared_ptr<void> keep_alive);

}  // namespace solstice
