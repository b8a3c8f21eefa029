// Running one command over an exec channel: input and output interleaved, the
// remote PID taken off stderr so a timed-out or cancelled command can be killed,
// the exit status or signal at the end.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "runtime/base/shell.hpp"
#include "runtime/ssh/ssh_connection.hpp"
#include "runtime/ssh/ssh_session.hpp"

namespace solstice {

using namespace ssh_internal;

namespace {

// A command as error messages show it: its first line, cut short. The runner's
// own wrappers (a step's script is written from stdin, then run) are long and
// say nothing to the user beyond which step failed.
std::string shown(const std::string& command) {
  constexpr size_t limit = 60;
  auto line = command.substr(0, command.find('\n'));
  return line.size() > limit || line.size() < command.size() ? line.substr(0, limit) + "…" : line;
}

// Output read buffer: bounds memory however large the stream is.
constexpr size_t kChunkSize = 64 * 1024;

// Linux signal numbers (the guest's numbering, not necessarily the host's).
int signal_number(std::string name) {
  if (name.rfind("SIG", 0) == 0) name.erase(0, 3);
  if (auto at = name.find('@'); at != std::string::npos) name.erase(at);
  static const std::array<std::pair<const char*, int>, 31> table{{
      {"HUP", 1},   {"INT", 2},     {"QUIT", 3},  {"ILL", 4},     {"TRAP", 5},   {"ABRT", 6},
      {"BUS", 7},   {"FPE", 8},     {"KILL", 9},  {"USR1", 10},   {"SEGV", 11},  {"USR2", 12},
      {"PIPE", 13}, {"ALRM", 14},   {"TERM", 15}, {"STKFLT", 16}, {"CHLD", 17},  {"CONT", 18},
      {"STOP", 19}, {"TSTP", 20},   {"TTIN", 21}, {"TTOU", 22},   {"URG", 23},   {"XCPU", 24},
      {"XFSZ", 25}, {"VTALRM", 26}, {"PROF", 27}, {"WINCH", 28},  {"IO", 29},    {"PWR", 30},
      {"SYS", 31},
  }};
  for (const auto& [known, number] : table)
    if (name == known) return number;
  return 0;
}

// The remote command is wrapped so that its PID reaches us before anything else,
// in-band at the start of stderr ("\x1e<pid>\x1e"), letting a timed-out or cancelled
// command be killed with its whole process group through a second channel. `exec`
// keeps that PID the command's own, so its exit status and signal are unchanged.
// Some servers (dropbear) leave the command in the connection's own process group:
// there the command first becomes a group leader through setsid(1), which then
// needs no fork (it only forks when the caller already leads a group).
std::string wrap_command(const std::string& command) {
  return "c=" + shell_quote(command) +
         "; printf '\\036%s\\036' \"$$\" >&2"
         "; read -r _ _ _ _ g _ </proc/$$/stat 2>/dev/null"
         "; if [ \"$g\" != \"$$\" ] && command -v setsid >/dev/null 2>&1; then"
         " exec setsid \"${SHELL:-/bin/sh}\" -c \"$c\"; fi"
         "; exec \"${SHELL:-/bin/sh}\" -c \"$c\"";
}

// Takes the PID prefix off the start of the stderr stream.
class RemotePidReader {
 public:
  // The part of `chunk` that is the command's own stderr (may be empty). The view
  // stays valid until the next call.
  std::string_view feed(std::string_view chunk) {
    if (done_) return chunk;
    pending_.append(chunk);
    if (pending_.empty()) return {};
    if (pending_[0] != '\x1e') return finish();
    auto end = pending_.find('\x1e', 1);
    if (end == std::string::npos) {
      if (pending_.size() > 32) return finish();  // not our prefix after all
      return {};
    }
    std::string digits = pending_.substr(1, end - 1);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
      return finish();
    pid_ = std::atol(digits.c_str());
    done_ = true;
    return std::string_view(pending_).substr(end + 1);
  }
  // At end of stream: whatever was held back.
  std::string_view flush() { return done_ ? std::string_view{} : finish(); }
  long pid() const { return pid_; }

 private:
  std::string_view finish() {
    done_ = true;
    return pending_;
  }
  std::string pending_;
  bool done_ = false;
  long pid_ = 0;
};

// One exec() call: its channel, the input still to be written, and the three
// parts of its life (start the command, move input and output until the output
// ends, close and read the exit status). A timeout or cancel at any point kills
// the remote command and ends the call with a stopped outcome.
class ExecCall {
 public:
  ExecCall(Connection& ssh, const std::string& command,
           const std::function<void(SshStream, std::string_view)>& on_output,
           const ExecOptions& options)
      : ssh_(ssh),
        command_(command),
        on_output_(on_output),
        options_(options),
        deadline_(options.timeout.count() > 0 ? Clock::now() + options.timeout
                                              : Clock::time_point::max()),
        cancelled_([this] { return options_.cancel && options_.cancel->load(); }),
        io_(ssh.driver(deadline_, &cancelled_)),
        input_(options.input) {}
  ExecCall(const ExecCall&) = delete;
  ExecCall& operator=(const ExecCall&) = delete;

  Result<ExecOutcome> run() {
    if (auto ended = start()) return std::move(*ended);
    if (auto ended = pump()) return std::move(*ended);
    return finish();
  }

 private:
  // Opens the channel and starts the wrapped command; with no input, its stdin
  // ends at once. Returns the call's outcome when it ended here.
  std::optional<Result<ExecOutcome>> start() {
    int rc = 0;
    channel_ = io_.open<LIBSSH2_CHANNEL>([&] { return libssh2_channel_open_session(ssh_.session); },
                                         rc);
    if (!channel_) {
      if (rc == kDeadlinePassed || rc == kGivenUp) return stopped_outcome(0);
      return failed(rc, "cannot open an SSH channel");
    }
    std::string wrapped = wrap_command(command_);
    rc = io_.run([&] { return libssh2_channel_exec(channel_, wrapped.c_str()); });
    if (rc == kDeadlinePassed || rc == kGivenUp) return stopped_outcome(0);
    if (rc != 0) return failed(rc, "cannot start the command");
    // Without input the command gets an empty stdin rather than one that never ends.
    if (input_.empty()) {
      rc = io_.run([&] { return libssh2_channel_send_eof(channel_); });
      if (rc == kDeadlinePassed || rc == kGivenUp) return stopped_outcome(0);
      if (rc != 0) return failed(rc, "cannot close the command's stdin");
      input_open_ = false;
    }
    return std::nullopt;
  }

  // Input and output are interleaved: a command may write more than the channel's
  // window holds before it reads all of its input. Returns when the output has
  // ended (nullopt) or the call has (its outcome).
  std::optional<Result<ExecOutcome>> pump() {
    std::vector<char> buffer(kChunkSize);
    for (;;) {
      if (cancelled_() || Clock::now() >= deadline_) return stopped_outcome(pid_reader_.pid());
      bool progressed = false;
      if (input_open_) {
        auto fed = feed_input();
        if (!fed) {
          ssh_.close_channel(channel_, Clock::now() + kCloseTimeout);
          return fail(fed.error().message);
        }
        progressed = *fed;
      }
      // Nothing else may be sent until a half-sent packet is finished: wait for the
      // socket to take more (wait_socket below polls for writing then).
      if (half_sent_) {
        if (!progressed)
          wait_socket(ssh_.fd, ssh_.session, std::min(deadline_, Clock::now() + kPollSlice));
        continue;
      }
      for (int stream_id : {0, SSH_EXTENDED_DATA_STDERR}) {
        ssize_t n = libssh2_channel_read_ex(channel_, stream_id, buffer.data(), buffer.size());
        if (n == LIBSSH2_ERROR_EAGAIN || n == 0) continue;
        if (n < 0) return failed(static_cast<int>(n), "reading the command's output");
        std::string_view bytes(buffer.data(), static_cast<size_t>(n));
        if (stream_id == 0)
          deliver(SshStream::out, bytes);
        else
          deliver(SshStream::err, pid_reader_.feed(bytes));
        progressed = true;
      }
      if (progressed) continue;
      if (libssh2_channel_eof(channel_)) break;
      wait_socket(ssh_.fd, ssh_.session, std::min(deadline_, Clock::now() + kPollSlice));
    }
    deliver(SshStream::err, pid_reader_.flush());
    return std::nullopt;
  }

  // The exit status arrives with (or just before) the server's close.
  Result<ExecOutcome> finish() {
    auto close_deadline = std::min(deadline_, Clock::now() + std::chrono::seconds(30));
    auto closing = ssh_.driver(close_deadline, &cancelled_);
    int rc = closing.run([&] { return libssh2_channel_close(channel_); });
    if (rc == 0) rc = closing.run([&] { return libssh2_channel_wait_closed(channel_); });
    if (rc == kGivenUp || (rc == kDeadlinePassed && close_deadline == deadline_))
      return stopped_outcome(pid_reader_.pid());
    if (rc != 0) return failed(rc, "waiting for the command's channel to close");

    ExecOutcome outcome;
    outcome.exit_code = libssh2_channel_get_exit_status(channel_);
    char* signal = nullptr;
    size_t signal_length = 0;
    libssh2_channel_get_exit_signal(channel_, &signal, &signal_length, nullptr, nullptr, nullptr,
                                    nullptr);
    if (signal) {
      outcome.exit_signal.assign(signal, signal_length);
      libssh2_free(ssh_.session, signal);
    }
    if (!outcome.exit_signal.empty()) {
      // libssh2 reports status 0 for a killed command; report it as a shell would.
      int number = signal_number(outcome.exit_signal);
      outcome.exit_code = number > 0 ? 128 + number : 255;
    }
    ssh_.driver(Clock::now() + kCloseTimeout).run([&] { return libssh2_channel_free(channel_); });
    return outcome;
  }

  void deliver(SshStream stream, std::string_view bytes) {
    if (!bytes.empty() && on_output_) on_output_(stream, bytes);
  }

  // Writes as much input as the channel's window takes now, then EOF once all is
  // written. Returns whether anything moved.
  Result<bool> feed_input() {
    auto blocked = [&] {
      half_sent_ =
          libssh2_session_block_directions(ssh_.session) & LIBSSH2_SESSION_BLOCK_OUTBOUND;
    };
    bool moved = false;
    for (;;) {
      if (input_.empty()) {
        int rc = libssh2_channel_send_eof(channel_);
        if (rc == LIBSSH2_ERROR_EAGAIN) {
          blocked();
          return moved;
        }
        half_sent_ = false;
        if (rc != 0 && !libssh2_channel_eof(channel_))
          return fail(io_.describe(rc, "cannot close the command's stdin on " + ssh_.peer +
                                           " (command: " + shown(command_) + ")"));
        input_open_ = false;
        return true;
      }
      ssize_t n = libssh2_channel_write(channel_, input_.data(), input_.size());
      if (n == LIBSSH2_ERROR_EAGAIN) {
        blocked();
        return moved;
      }
      half_sent_ = false;
      if (n == 0) return moved;  // the window is full
      if (n < 0) {
        // The command is gone (its channel closed): the rest of its input is moot.
        if (n == LIBSSH2_ERROR_CHANNEL_CLOSED || n == LIBSSH2_ERROR_CHANNEL_EOF_SENT ||
            libssh2_channel_eof(channel_)) {
          input_ = {};
          input_open_ = false;
          return true;
        }
        return fail(io_.describe(static_cast<int>(n), "writing the command's stdin on " +
                                                          ssh_.peer + " (command: " + shown(command_) +
                                                          ")"));
      }
      input_.remove_prefix(static_cast<size_t>(n));
      moved = true;
    }
  }

  // Before the channel is closed or another is opened (bounded wait).
  void finish_half_sent() {
    ssh_.driver(Clock::now() + kCloseTimeout).run([&]() -> int {
      if (half_sent_) (void)feed_input();
      return half_sent_ ? LIBSSH2_ERROR_EAGAIN : 0;
    });
  }

  ExecOutcome stopped_outcome(long remote_pid) {
    ExecOutcome outcome;
    outcome.exit_code = -1;
    outcome.cancelled = cancelled_();
    outcome.timed_out = !outcome.cancelled;
    finish_half_sent();
    ssh_.kill_remote(remote_pid);
    if (channel_) ssh_.close_channel(channel_, Clock::now() + kCloseTimeout);
    return outcome;
  }

  Result<ExecOutcome> failed(int rc, const std::string& what) {
    std::string message =
        io_.describe(rc, what + " on " + ssh_.peer + " (command: " + shown(command_) + ")");
    if (channel_) ssh_.close_channel(channel_, Clock::now() + kCloseTimeout);
    return fail(message);
  }

  Connection& ssh_;
  const std::string& command_;
  const std::function<void(SshStream, std::string_view)>& on_output_;
  const ExecOptions& options_;
  const Clock::time_point deadline_;
  const std::function<bool()> cancelled_;
  const Driver io_;
  std::string_view input_;
  bool input_open_ = true;  // EOF not sent yet
  // A channel write (or EOF) that returned EAGAIN with the socket full is half
  // sent: libssh2 (1.10) refuses every other packet, a window adjustment made by a
  // read included, until the same call has finished it.
  bool half_sent_ = false;
  LIBSSH2_CHANNEL* channel_ = nullptr;
  RemotePidReader pid_reader_;
};

}  // namespace

Result<ExecOutcome> SshSession::exec(
    const std::string& command, const std::function<void(SshStream, std::string_view)>& on_output,
    const ExecOptions& options) {
  if (!impl_ || !impl_->session) return fail("exec on a closed SSH session: " + command);
  ExecCall call(*impl_, command, on_output, options);
  return call.run();
}

}  // namespace solstice
