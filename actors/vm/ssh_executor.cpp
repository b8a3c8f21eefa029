#include "actors/vm/ssh_executor.hpp"

#include <chrono>

#include <caf/send.hpp>
#include <spdlog/spdlog.h>

#include "actors/runner_types.hpp"

namespace solstice {

namespace {

using executor_pointer = ssh_executor_internal::stateful_pointer<ssh_executor_state>;
using std::chrono::milliseconds;

constexpr auto ready_poll_interval = milliseconds(20);
constexpr size_t runner_stderr_limit = 2048;

// The handle's own identity; with `boot_identity`, the one its guest has at first
// (a restored clone answers with the template's until its set-up changes it).
SshTarget target_of(const v1::VmHandle& h, bool boot_identity = true) {
  SshTarget t;
  t.port = static_cast<uint16_t>(h.ssh_port());
  t.user = h.user();
  t.private_key = h.private_key();
  t.public_key = h.public_key();
  t.expected_host_key = h.host_key();
  if (boot_identity && !h.boot_private_key().empty()) {
    t.private_key = h.boot_private_key();
    t.public_key.clear();
    t.expected_host_key = h.boot_host_key();
  }
  return t;
}

// Posts `work` to the worker; its error text (empty = success) and step result
// come back to the actor as a `done` message for operation `id`.
template <class Work>
uint64_t post(executor_pointer self, Work work) {
  auto& st = self->state;
  auto id = st.next_op++;
  auto cancel = std::make_shared<std::atomic<bool>>(false);
  st.in_flight.emplace(id, cancel);
  auto me = caf::actor_cast<ssh_executor_internal>(self);
  st.worker->post([id, cancel, me, session = st.session, work = std::move(work)]() mutable {
    v1::StepResult result;
    std::string error;
    if (cancel->load())
      error = "cancelled";
    else
      error = work(*session, *cancel, result, me);
    caf::anon_send(me, done_atom::value, id, std::move(error), std::move(result));
  });
  return id;
}

// Guest-shell requests before the console hand-off are refused, never run:
// guest output must not be logged by the console tailer and the step at once.
caf::error refused(const char* what) {
  return caf::make_error(runner_errc::not_released,
                         std::string{what} +
                           " refused: the console hand-off has not released the SSH executor");
}

bool released(executor_pointer self) {
  return self->state.shell_gate == ssh_executor_state::gate::released;
}

std::string no_session_error() {
  return "SSH is not ready (no session)";
}

// Real cloud images restart sshd (new host keys) while cloud-init finishes, so a
// connection can die right after readiness. Operations that are safe to repeat
// run once more on a fresh connection when they fail.
template <class Op>
std::string with_reconnect(std::optional<SshSession>& session,
                           const std::shared_ptr<const SshTarget>& target,
                           std::atomic<bool>& cancel, Op op) {
  if (!session)
    return no_session_error();
  auto error = op(*session);
  // A file too large stays too large: no second try.
  if (error.empty() || cancel.load() || !target || error.rfind(download_too_large, 0) == 0)
    return error;
  auto fresh = SshSession::wait_until_ready(
    *target, std::chrono::steady_clock::now() + std::chrono::seconds(30), ready_poll_interval,
    [&cancel] { return cancel.load(); });
  if (!fresh)
    return error;
  session = std::move(*fresh);
  return op(*session);
}

}  // namespace

ssh_executor_state::~ssh_executor_state() {
  for (auto& [id, flag] : in_flight)
    flag->store(true);
}

ssh_executor_internal::behavior_type
ssh_executor(executor_pointer self, output_observer_actor observer) {
  self->state.observer = std::move(observer);
  return {
    [=](ready_atom, const v1::VmHandle& handle, uint32_t timeout_ms) {
      auto target = target_of(handle);
      self->state.target = std::make_shared<const SshTarget>(target);
      auto deadline = std::chrono::steady_clock::now() + milliseconds(timeout_ms);
      // A restored clone's identity agent has answered: its SSH server listens.
      const bool listening = handle.identity_agent() && !handle.incoming_state().empty();
      auto id = post(self, [target, deadline, listening](std::optional<SshSession>& session,
                                                         std::atomic<bool>& cancel,
                                                         v1::StepResult&,
                                                         const ssh_executor_internal&) -> std::string {
        auto ready = SshSession::wait_until_ready(
          target, deadline, ready_poll_interval, [&cancel] { return cancel.load(); }, listening);
        if (!ready)
          return ready.error().message;
        session = std::move(*ready);
        return {};
      });
      auto rp = self->make_response_promise<ok_atom>();
      self->state.ok_replies.emplace(id, rp);
      return rp;
    },
    [=](connect_atom, const std::string& socket, uint32_t timeout_ms) {
      auto deadline = std::chrono::steady_clock::now() + milliseconds(timeout_ms);
      auto id = post(self, [socket, deadline, channel = self->state.channel](
                             std::optional<SshSession>&, std::atomic<bool>& cancel,
                             v1::StepResult&, const ssh_executor_internal&) -> std::string {
        auto connected = IdentityChannel::connect(socket, deadline, &cancel);
        if (!connected)
          return connected.error().message;
        *channel = std::move(*connected);
        return {};
      });
      auto rp = self->make_response_promise<ok_atom>();
      self->state.ok_replies.emplace(id, rp);
      return rp;
    },
    [=](identity_atom, const v1::VmHandle& handle, std::vector<std::string>& directories,
        std::string& env_file, std::vector<std::string>& step_scripts, uint32_t timeout_ms) {
      auto deadline = std::chrono::steady_clock::now() + milliseconds(timeout_ms);
      auto files_note = std::make_shared<std::string>();
      GuestJobFiles files{std::move(directories), std::move(env_file), std::move(step_scripts)};
      auto id = post(self, [handle, files = std::move(files), files_note, deadline,
                            channel = self->state.channel](
                             std::optional<SshSession>&, std::atomic<bool>& cancel,
                             v1::StepResult&, const ssh_executor_internal&) -> std::string {
        // The clock and the randomness are taken now, as the guest gets them.
        auto given = give_identity_over_channel(*channel, clone_identity_input(handle, files),
                                                deadline, &cancel);
        if (!given)
          return given.error().message;
        *files_note = *given;
        return {};
      });
      auto rp = self->make_response_promise<std::string>();
      self->state.text_replies.emplace(id, std::pair{rp, files_note});
      return rp;
    },
    [=](rekey_atom, const v1::VmHandle& handle, uint32_t timeout_ms) -> caf::result<ok_atom> {
      if (!released(self))
        return refused("rekey");
      auto target = target_of(handle, false);
      self->state.target = std::make_shared<const SshTarget>(target);
      auto deadline = std::chrono::steady_clock::now() + milliseconds(timeout_ms);
      auto id = post(self, [target, deadline](std::optional<SshSession>& session,
                                              std::atomic<bool>& cancel, v1::StepResult&,
                                              const ssh_executor_internal&) -> std::string {
        session.reset();
        auto ready = SshSession::wait_until_ready(target, deadline, ready_poll_interval,
                                                  [&cancel] { return cancel.load(); });
        if (!ready)
          return "cannot connect with the job's own key and host key: " + ready.error().message;
        session = std::move(*ready);
        return {};
      });
      auto rp = self->make_response_promise<ok_atom>();
      self->state.ok_replies.emplace(id, rp);
      return rp;
    },
    [=](upload_atom, const std::string& content, const std::string& remote, uint32_t mode) -> caf::result<ok_atom> {
      if (!released(self))
        return refused("upload");
      auto id = post(self, [content, remote, mode, target = self->state.target](
                             std::optional<SshSession>& session, std::atomic<bool>& cancel,
                             v1::StepResult&, const ssh_executor_internal&) -> std::string {
        return with_reconnect(session, target, cancel, [&](SshSession& s) {
          auto ok = s.upload(content, remote, static_cast<int>(mode));
          return ok ? std::string{} : ok.error().message;
        });
      });
      auto rp = self->make_response_promise<ok_atom>();
      self->state.ok_replies.emplace(id, rp);
      return rp;
    },
    [=](put_file_atom, const std::string& local, const std::string& remote, uint32_t mode) -> caf::result<ok_atom> {
      if (!released(self))
        return refused("upload");
      auto id = post(self, [local, remote, mode, target = self->state.target](
                             std::optional<SshSession>& session, std::atomic<bool>& cancel,
                             v1::StepResult&, const ssh_executor_internal&) -> std::string {
        return with_reconnect(session, target, cancel, [&](SshSession& s) {
          auto ok = s.upload_file(local, remote, static_cast<int>(mode));
          return ok ? std::string{} : ok.error().message;
        });
      });
      auto rp = self->make_response_promise<ok_atom>();
      self->state.ok_replies.emplace(id, rp);
      return rp;
    },
    [=](download_atom, const std::string& remote, const std::string& local,
        uint64_t max_bytes) -> caf::result<ok_atom> {
      if (!released(self))
        return refused("download");
      auto id = post(self, [remote, local, max_bytes, target = self->state.target](
                             std::optional<SshSession>& session, std::atomic<bool>& cancel,
                             v1::StepResult&, const ssh_executor_internal&) -> std::string {
        return with_reconnect(session, target, cancel, [&](SshSession& s) {
          auto ok = s.download(remote, local, max_bytes);
          return ok ? std::string{} : ok.error().message;
        });
      });
      auto rp = self->make_response_promise<ok_atom>();
      self->state.ok_replies.emplace(id, rp);
      return rp;
    },
    [=](exec_atom, uint32_t step, const std::string& command, const std::string& input,
        uint32_t timeout_ms) -> caf::result<v1::StepResult> {
      if (!released(self))
        return refused("exec");
      auto id = post(self, [step, command, input, timeout_ms, target = self->state.target,
                            credit = self->state.output_credit](
                             std::optional<SshSession>& session, std::atomic<bool>& cancel,
                             v1::StepResult& result, const ssh_executor_internal& me) -> std::string {
        if (!session)
          return no_session_error();
        ExecOptions options;
        options.timeout = milliseconds(timeout_ms);
        options.cancel = &cancel;
        options.input = input;
        if (step == runner_setup_step) {
          // The runner's own set-up command is safe to repeat on a new connection.
          return with_reconnect(session, target, cancel, [&](SshSession& s) {
            // Its stderr's end says what failed (e.g. which upload).
            std::string errors;
            auto outcome = s.exec(command, [&errors](SshStream stream, std::string_view bytes) {
              if (stream != SshStream::err)
                return;
              errors.append(bytes);
              if (errors.size() > runner_stderr_limit)
                errors.erase(0, errors.size() - runner_stderr_limit);
            }, options);
            if (!outcome)
              return outcome.error().message;
            if (outcome->cancelled)
              return std::string{"cancelled"};
            if (outcome->timed_out)
              return "the runner's set-up command did not finish within " +
                     std::to_string(timeout_ms) + " ms";
            result.set_step_index(step);
            result.set_exit_code(outcome->exit_code);
            result.set_exit_signal(outcome->exit_signal);
            result.set_outcome(outcome->exit_code == 0 ? v1::STEP_SUCCEEDED : v1::STEP_FAILED);
            if (!errors.empty())
              result.set_runner_stderr(std::move(errors));
            return std::string{};
          });
        }
        uint64_t sequence[2] = {0, 0};
        // The step's timeout holds while its output is held too: the worker stops
        // waiting for credit at the deadline, and the exec call then ends the
        // command as timed out.
        const auto step_deadline = timeout_ms == 0
                                     ? std::chrono::steady_clock::time_point::max()
                                     : std::chrono::steady_clock::now() + milliseconds(timeout_ms);
        auto on_output = [&](SshStream stream, std::string_view bytes) {
          v1::OutputChunk chunk;
          chunk.set_step_index(step);
          auto index = stream == SshStream::out ? 0 : 1;
          chunk.set_stream(stream == SshStream::out ? v1::STDOUT : v1::STDERR);
          chunk.set_sequence(sequence[index]++);
          chunk.set_data(bytes.data(), bytes.size());
          // Blocks this worker (never an actor thread) while the observer lags.
          credit->take(bytes.size(), cancel, step_deadline);
          caf::anon_send(me, output_atom::value, std::move(chunk));
        };
        auto started = std::chrono::steady_clock::now();
        const auto waits_before = credit->waits();
        auto outcome = session->exec(command, on_output, options);
        // Did the sinks pace the guest (a slow terminal, a broker pushing back)?
        const auto waits = credit->waits();
        spdlog::debug("step {}: its output waited for credit {} times, {} ms in all", step,
                      waits.count - waits_before.count,
                      std::chrono::duration_cast<milliseconds>(waits.total - waits_before.total)
                        .count());
        result.set_step_index(step);
        result.set_duration_ms(std::chrono::duration_cast<milliseconds>(
                                 std::chrono::steady_clock::now() - started)
                                 .count());
        if (!outcome)
          return outcome.error().message;
        result.set_exit_code(outcome->exit_code);
        result.set_exit_signal(outcome->exit_signal);
        if (outcome->timed_out)
          result.set_outcome(v1::STEP_TIMED_OUT);
        else if (outcome->cancelled)
          result.set_outcome(v1::STEP_CANCELLED);
        else
          result.set_outcome(outcome->exit_code == 0 ? v1::STEP_SUCCEEDED : v1::STEP_FAILED);
        return {};
      });
      auto rp = self->make_response_promise<v1::StepResult>();
      self->state.exec_replies.emplace(id, rp);
      return rp;
    },
    [=](release_atom) { self->state.shell_gate = ssh_executor_state::gate::released; },
    [=](ack_atom, uint64_t bytes) {
      self->state.output_credit->give_back(static_cast<size_t>(bytes));
    },
    [=](cancel_atom) {
      for (auto& [id, flag] : self->state.in_flight)
        flag->store(true);
    },
    [=](output_atom, v1::OutputChunk& chunk) {
      self->send(self->state.observer, output_atom::value, std::move(chunk));
    },
    [=](done_atom, uint64_t id, std::string& error, v1::StepResult& result) {
      auto& st = self->state;
      st.in_flight.erase(id);
      auto err = [&] {
        const auto code = error == "cancelled" ? runner_errc::cancelled
                          : error.rfind(download_too_large, 0) == 0 ? runner_errc::limit_exceeded
                                                                    : runner_errc::ssh_failed;
        return caf::make_error(code, error);
      };
      if (auto i = st.ok_replies.find(id); i != st.ok_replies.end()) {
        if (error.empty())
          i->second.deliver(ok_atom::value);
        else
          i->second.deliver(err());
        st.ok_replies.erase(i);
      } else if (auto t = st.text_replies.find(id); t != st.text_replies.end()) {
        if (error.empty())
          t->second.first.deliver(std::move(*t->second.second));
        else
          t->second.first.deliver(err());
        st.text_replies.erase(t);
      } else if (auto j = st.exec_replies.find(id); j != st.exec_replies.end()) {
        if (error.empty())
          j->second.deliver(std::move(result));
        else
          j->second.deliver(err());
        st.exec_replies.erase(j);
      }
    },
  };
}

}  // namespace solstice
