// Longer than most files: every SshSession operation against the real guest,
// each case short and independent, sharing one booted guest.
// SshSession against the real test guest (dropbear + sftp-server) under QEMU, and
// against local sockets that never speak SSH.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <random>
#include <thread>

#include "runtime/job/guest_commands.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "tests/integration/guest_fixture.hpp"

using namespace solstice;
using namespace solstice::testing;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

// One guest for the whole group: each TCG boot costs seconds.
struct SharedGuest {
  std::unique_ptr<Guest> guest;
  std::string error;
};

SharedGuest& shared_guest() {
  static SharedGuest shared = [] {
    SharedGuest result;
    auto booted = Guest::boot();
    if (!booted) {
      result.error = booted.error().message;
      return result;
    }
    auto ready = (*booted)->wait_for_ssh();
    if (!ready) {
      result.error = ready.error().message;
      return result;
    }
    result.guest = std::move(*booted);
    return result;
  }();
  return shared;
}

Guest& guest() {
  SharedGuest& shared = shared_guest();
  REQUIRE_MESSAGE(shared.guest != nullptr, shared.error);
  return *shared.guest;
}

SshSession session() {
  auto connected = SshSession::connect(guest().ssh_target(), 30s);
  REQUIRE_MESSAGE(connected.has_value(), why(connected));
  return std::move(*connected);
}

struct Captured {
  std::string out, err;
  size_t largest_chunk = 0;
  size_t chunks = 0;
};

ExecOutcome run(SshSession& ssh, const std::string& command, Captured& captured,
                const ExecOptions& options = {}) {
  auto outcome = ssh.exec(
      command,
      [&](SshStream stream, std::string_view bytes) {
        (stream == SshStream::out ? captured.out : captured.err).append(bytes);
        captured.largest_chunk = std::max(captured.largest_chunk, bytes.size());
        ++captured.chunks;
      },
      options);
  REQUIRE_MESSAGE(outcome.has_value(), why(outcome));
  return *outcome;
}

std::string sha256_hex(std::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned length = 0;
  EVP_Digest(data.data(), data.size(), digest, &length, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string text;
  for (unsigned i = 0; i < length; ++i) {
    text += hex[digest[i] >> 4];
    text += hex[digest[i] & 15];
  }
  return text;
}

std::string random_bytes(size_t count) {
  std::mt19937_64 generator{std::random_device{}()};
  std::string bytes(count, '\0');
  for (char& c : bytes) c = static_cast<char>(generator() & 0xff);
  return bytes;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// How many processes in the guest run exactly `command_line`.
int count_remote_processes(SshSession& ssh, const std::string& command_line) {
  Captured captured;
  auto outcome = run(ssh,
                     "for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline 2>/dev/null; echo; done"
                     " | grep -c -x '" + command_line + " ' || true",
                     captured);
  REQUIRE(outcome.exit_code == 0);
  return std::stoi(captured.out);
}

// A TCP listener on 127.0.0.1 that accepts at the kernel level but never speaks.
struct SilentListener {
  int fd = -1;
  uint16_t port = 0;
  SilentListener() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    REQUIRE(::listen(fd, 16) == 0);
    socklen_t length = sizeof address;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
    port = ntohs(address.sin_port);
  }
  ~SilentListener() { ::close(fd); }
};

// A port on 127.0.0.1 where nothing listens (bound, then released).
uint16_t closed_port() {
  SilentListener listener;
  return listener.port;
}

SshTarget unreachable_target(uint16_t port) {
  auto key = generate_ed25519("unused");
  REQUIRE(key.has_value());
  SshTarget target;
  target.port = port;
  target.user = "nobody";
  target.private_key = key->private_openssh;
  target.public_key = key->public_line;
  return target;
}

}  // namespace

TEST_SUITE("ssh_session") {

TEST_CASE("wait_until_ready authenticates and sees the host key we generated") {
  Guest& vm = guest();
  auto ready = SshSession::wait_until_ready(vm.ssh_target(), Clock::now() + 30s, 50ms,
                                            [] { return false; });
  REQUIRE_MESSAGE(ready.has_value(), why(ready));
  CHECK(ready->host_key() == vm.host_key().public_blob);
  CHECK(fingerprint_sha256(ready->host_key()) == fingerprint_sha256(vm.host_key().public_blob));
}

TEST_CASE("a user key the guest does not know fails authentication clearly") {
  SshTarget target = guest().ssh_target();
  auto stranger = generate_ed25519("stranger");
  REQUIRE(stranger.has_value());
  target.private_key = stranger->private_openssh;
  target.public_key = stranger->public_line;

  auto attempt = SshSession::connect(target, 30s);
  REQUIRE_FALSE(attempt.has_value());
  CHECK(attempt.error().message.find("authentication as '" + target.user + "'") !=
        std::string::npos);
  CHECK(attempt.error().message.find("failed") != std::string::npos);

  // Readiness keeps trying (keys may arrive late on real images) and then says why.
  auto waited = SshSession::wait_until_ready(target, Clock::now() + 2s, 50ms, [] { return false; });
  REQUIRE_FALSE(waited.has_value());
  CHECK_MESSAGE(waited.error().message.find("not ready by the deadline") != std::string::npos,
                waited.error().message);
  CHECK_MESSAGE(waited.error().message.find("authentication") != std::string::npos,
                waited.error().message);
}

TEST_CASE("an unexpected host key is refused with both fingerprints") {
  SshTarget target = guest().ssh_target();
  auto other = generate_ed25519("other-host");
  REQUIRE(other.has_value());
  target.expected_host_key = other->public_blob;

  auto attempt = SshSession::connect(target, 30s);
  REQUIRE_FALSE(attempt.has_value());
  const std::string& message = attempt.error().message;
  CHECK(message.find("host key mismatch") != std::string::npos);
  CHECK(message.find("expected " + fingerprint_sha256(other->public_blob)) != std::string::npos);
  CHECK(message.find("got " + fingerprint_sha256(guest().host_key().public_blob)) !=
        std::string::npos);
}

TEST_CASE("exec streams output and reports exit codes") {
  SshSession ssh = session();

  SUBCASE("uname -a") {
    Captured captured;
    auto outcome = run(ssh, "uname -a", captured);
    CHECK(outcome.exit_code == 0);
    CHECK(outcome.exit_signal.empty());
    CHECK(captured.out.find("Linux") != std::string::npos);
    CHECK(captured.err.empty());
  }
  SUBCASE("exit 7") {
    Captured captured;
    auto outcome = run(ssh, "exit 7", captured);
    CHECK(outcome.exit_code == 7);
    CHECK(outcome.exit_signal.empty());
    CHECK_FALSE(outcome.timed_out);
  }
  SUBCASE("stdout and stderr stay apart, nothing added") {
    Captured captured;
    auto outcome = run(ssh, "echo to-out; echo to-err >&2; echo more-out", captured);
    CHECK(outcome.exit_code == 0);
    CHECK(captured.out == "to-out\nmore-out\n");
    CHECK(captured.err == "to-err\n");
  }
  SUBCASE("quotes and shell syntax in the command survive the wrapping") {
    Captured captured;
    auto outcome = run(ssh, "x='it'\"'\"'s'; echo \"$x\" | tr a-z A-Z", captured);
    CHECK(outcome.exit_code == 0);
    CHECK(captured.out == "IT'S\n");
  }
  SUBCASE("stdin is empty, so a command reading it does not hang") {
    Captured captured;
    ExecOptions options;
    options.timeout = 20s;
    auto outcome = run(ssh, "cat; echo after-cat", captured, options);
    CHECK_FALSE(outcome.timed_out);
    CHECK(captured.out == "after-cat\n");
  }
  SUBCASE("a command killed by a signal reports the signal, not exit 0") {
    Captured captured;
    auto outcome = run(ssh, "kill -KILL $$", captured);
    CHECK(outcome.exit_signal == "KILL");
    CHECK(outcome.exit_code == 137);
  }
  SUBCASE("SIGTERM maps to 143") {
    Captured captured;
    auto outcome = run(ssh, "kill -TERM $$", captured);
    CHECK(outcome.exit_signal == "TERM");
    CHECK(outcome.exit_code == 143);
  }
}

TEST_CASE("8 MiB of output arrives complete and in order, in bounded chunks") {
  SshSession ssh = session();
  Captured captured;
  ExecOptions options;
  options.timeout = 120s;
  auto outcome = run(ssh,
                     "head -c 8388608 /dev/urandom >/tmp/big.bin && sha256sum /tmp/big.bin >&2 &&"
                     " cat /tmp/big.bin && rm /tmp/big.bin",
                     captured, options);
  REQUIRE(outcome.exit_code == 0);
  CHECK(captured.out.size() == 8u * 1024 * 1024);
  REQUIRE(captured.err.size() >= 64);
  CHECK(captured.err.substr(0, 64) == sha256_hex(captured.out));
  CHECK(captured.largest_chunk <= 64u * 1024);
  CHECK(captured.chunks > 100);
}

TEST_CASE("binary output and invalid UTF-8 arrive byte for byte") {
  SshSession ssh = session();
  Captured captured;
  auto outcome = run(ssh, "printf '\\377\\376\\000\\001\\200abc\\303\\050'; printf '\\000\\377' >&2",
                     captured);
  CHECK(outcome.exit_code == 0);
  CHECK(captured.out == std::string("\xff\xfe\x00\x01\x80" "abc\xc3\x28", 10));
  CHECK(captured.err == std::string("\x00\xff", 2));
}

TEST_CASE("a timeout stops the command quickly and kills it in the guest") {
  SshSession ssh = session();
  Captured captured;
  ExecOptions options;
  options.timeout = 1s;
  auto started = Clock::now();
  auto outcome = run(ssh, "sleep 43 & sleep 41", captured, options);
  auto elapsed = Clock::now() - started;
  CHECK(outcome.timed_out);
  CHECK_FALSE(outcome.cancelled);
  CHECK(elapsed >= 1s);
  CHECK(elapsed < 6s);
  // Both the command and its background child are gone; the session still works.
  CHECK(count_remote_processes(ssh, "sleep 41") == 0);
  CHECK(count_remote_processes(ssh, "sleep 43") == 0);
}

TEST_CASE("the cancel flag stops a running command") {
  SshSession ssh = session();
  std::atomic<bool> cancel{false};
  std::thread canceller([&] {
    std::this_thread::sleep_for(500ms);
    cancel = true;
  });
  Captured captured;
  ExecOptions options;
  options.cancel = &cancel;
  auto started = Clock::now();
  auto outcome = run(ssh, "echo started; sleep 42", captured, options);
  auto elapsed = Clock::now() - started;
  canceller.join();
  CHECK(outcome.cancelled);
  CHECK_FALSE(outcome.timed_out);
  CHECK(captured.out == "started\n");
  CHECK(elapsed < 5s);
  CHECK(count_remote_processes(ssh, "sleep 42") == 0);
}

TEST_CASE("exec writes its input to the command's stdin, then EOF") {
  SshSession ssh = session();
  ExecOptions options;
  options.timeout = 180s;

  SUBCASE("a few bytes, no final newline") {
    Captured captured;
    std::string input = "first line\nsecond \x01\xff line";
    options.input = input;
    auto outcome = run(ssh, "cat; echo '<eof>'", captured, options);
    CHECK(outcome.exit_code == 0);
    CHECK(captured.out == input + "<eof>\n");
    CHECK(captured.err.empty());
  }
  SUBCASE("more than 4 MiB of random bytes arrive whole, checked in the guest") {
    std::string input = random_bytes(4 * 1024 * 1024 + 12345);
    options.input = input;
    Captured captured;
    auto outcome = run(ssh,
                       "cat >/tmp/stdin.bin && sha256sum /tmp/stdin.bin && wc -c </tmp/stdin.bin"
                       " && rm /tmp/stdin.bin",
                       captured, options);
    REQUIRE_MESSAGE(outcome.exit_code == 0, captured.err);
    REQUIRE(captured.out.size() > 64);
    CHECK(captured.out.substr(0, 64) == sha256_hex(input));
    CHECK(captured.out.find("\n" + std::to_string(input.size()) + "\n") != std::string::npos);
  }
  SUBCASE("a command that echoes its input while it is still being written does not deadlock") {
    // Both directions' windows fill: output must be read while input is written.
    std::string input = random_bytes(5 * 1024 * 1024);
    options.input = input;
    Captured captured;
    auto outcome = run(ssh, "cat", captured, options);
    CHECK(outcome.exit_code == 0);
    CHECK_FALSE(outcome.timed_out);
    CHECK(captured.out.size() == input.size());
    CHECK(captured.out == input);
  }
  SUBCASE("a command that exits without reading its input") {
    std::string input = random_bytes(2 * 1024 * 1024);
    options.input = input;
    Captured captured;
    auto outcome = run(ssh, "echo done; exit 3", captured, options);
    CHECK(outcome.exit_code == 3);
    CHECK_FALSE(outcome.timed_out);
    CHECK(captured.out == "done\n");
  }
  SUBCASE("a timeout while the input is still being written stops the command") {
    std::string input = random_bytes(4 * 1024 * 1024);
    options.input = input;
    options.timeout = 2s;
    Captured captured;
    auto started = Clock::now();
    auto outcome = run(ssh, "sleep 44", captured, options);
    CHECK(outcome.timed_out);
    CHECK(Clock::now() - started < 12s);
    // The connection is still usable, and the command is gone.
    CHECK(count_remote_processes(ssh, "sleep 44") == 0);
  }
}

TEST_CASE("the runner's set-up and step commands work in the guest's shell") {
  SshSession ssh = session();
  ExecOptions options;
  options.timeout = 60s;
  std::string env = make_env_file({{"GREETING", "hello from env"}}, {{"TOKEN", "it's secret"}});
  options.input = env;
  Captured setup;
  auto outcome = run(ssh, setup_command({"/tmp/solstice-upload-dir"}), setup, options);
  REQUIRE_MESSAGE(outcome.exit_code == 0, setup.err);
  Captured check;
  run(ssh,
      "stat -c %a " + env_file_path() + " " + std::string(guest_job_dir) +
        "; test -d /tmp/solstice-upload-dir && echo dir-made; sha256sum " + env_file_path(),
      check);
  CHECK(check.out.rfind("600\n700\ndir-made\n" + sha256_hex(env), 0) == 0);

  // One exec writes the script from stdin and runs it: env sourced, in $HOME,
  // and the step's own stdin is /dev/null, not its script.
  std::string script = make_step_script(
    "echo \"$GREETING|$TOKEN\"\n"
    "test \"$(pwd)\" = \"$HOME\" && echo in-home\n"
    "readlink /proc/$$/fd/0\n"
    "exit 5");
  options.input = script;
  Captured step;
  outcome = run(ssh, step_command(0), step, options);
  CHECK(outcome.exit_code == 5);
  CHECK(step.out == "hello from env|it's secret\nin-home\n/dev/null\n");
  CHECK(step.err.empty());
  Captured mode;
  run(ssh, "stat -c %a " + step_script_path(0), mode);
  CHECK(mode.out == "755\n");

  std::string killer = make_step_script("echo before; kill -TERM $$; echo after");
  options.input = killer;
  Captured killed;
  outcome = run(ssh, step_command(1), killed, options);
  CHECK(outcome.exit_signal == "TERM");
  CHECK(outcome.exit_code == 143);
  CHECK(killed.out == "before\n");
}

TEST_CASE("an uploaded script keeps its mode despite the umask and runs") {
  SshSession ssh = session();
  auto uploaded = ssh.upload("#!/bin/sh\necho \"script ran with $1\"\nexit 3\n", "/tmp/step.sh", 0777);
  REQUIRE_MESSAGE(uploaded.has_value(), why(uploaded));
  Captured mode;
  run(ssh, "stat -c %a /tmp/step.sh", mode);
  CHECK(mode.out == "777\n");  // the guest's umask 022 alone would leave 755

  uploaded = ssh.upload("#!/bin/sh\necho \"script ran with $1\"\nexit 3\n", "/tmp/step.sh", 0755);
  REQUIRE(uploaded.has_value());
  Captured captured;
  auto outcome = run(ssh, "/tmp/step.sh argument", captured);
  CHECK(outcome.exit_code == 3);
  CHECK(captured.out == "script ran with argument\n");
  Captured mode_after;
  run(ssh, "stat -c %a /tmp/step.sh", mode_after);
  CHECK(mode_after.out == "755\n");
}

TEST_CASE("upload and download round-trip 1 MiB of random bytes") {
  SshSession ssh = session();
  auto work = TempDir::make();
  REQUIRE(work.has_value());
  std::string payload = random_bytes(1024 * 1024);

  SUBCASE("from memory") {
    auto uploaded = ssh.upload(payload, "/tmp/payload.bin", 0600);
    REQUIRE_MESSAGE(uploaded.has_value(), why(uploaded));
  }
  SUBCASE("from a file") {
    auto local = work->path() / "payload.bin";
    std::ofstream(local, std::ios::binary) << payload;
    auto uploaded = ssh.upload_file(local, "/tmp/payload.bin", 0600);
    REQUIRE_MESSAGE(uploaded.has_value(), why(uploaded));
  }
  Captured remote_sum;
  run(ssh, "sha256sum /tmp/payload.bin", remote_sum);
  CHECK(remote_sum.out.substr(0, 64) == sha256_hex(payload));

  auto copy = work->path() / "copy.bin";
  auto downloaded = ssh.download("/tmp/payload.bin", copy);
  REQUIRE_MESSAGE(downloaded.has_value(), why(downloaded));
  std::string back = read_file(copy);
  CHECK(back.size() == payload.size());
  CHECK(back == payload);
  // Only the finished file is left behind, no temporary.
  CHECK(std::distance(std::filesystem::directory_iterator(work->path()),
                      std::filesystem::directory_iterator()) ==
        (std::filesystem::exists(work->path() / "payload.bin") ? 2 : 1));

  // max_bytes: exactly the size is fine; one byte less keeps nothing at all.
  auto exact = ssh.download("/tmp/payload.bin", work->path() / "exact.bin", payload.size());
  REQUIRE_MESSAGE(exact.has_value(), why(exact));
  CHECK(std::filesystem::file_size(work->path() / "exact.bin") == payload.size());
  auto over = ssh.download("/tmp/payload.bin", work->path() / "over.bin", payload.size() - 1);
  REQUIRE_FALSE(over.has_value());
  CHECK(over.error().message.rfind(std::string(download_too_large), 0) == 0);
  CHECK_FALSE(std::filesystem::exists(work->path() / "over.bin"));
  for (const auto& entry : std::filesystem::directory_iterator(work->path()))
    CHECK(entry.path().filename().string().find("partial") == std::string::npos);
}

TEST_CASE("download and upload errors name the file") {
  SshSession ssh = session();
  auto work = TempDir::make();
  REQUIRE(work.has_value());
  auto missing = ssh.download("/tmp/no-such-file.txt", work->path() / "x");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().message.find("/tmp/no-such-file.txt") != std::string::npos);
  CHECK(missing.error().message.find("no such file") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(work->path() / "x"));
  CHECK(std::filesystem::is_empty(work->path()));

  auto no_dir = ssh.upload("x", "/no-such-dir/file", 0644);
  REQUIRE_FALSE(no_dir.has_value());
  CHECK(no_dir.error().message.find("/no-such-dir/file") != std::string::npos);

  auto no_local = ssh.upload_file(work->path() / "absent", "/tmp/x", 0644);
  REQUIRE_FALSE(no_local.has_value());
  CHECK(no_local.error().message.find("absent") != std::string::npos);
}

TEST_CASE("a session outlives many execs and SFTP use in between") {
  SshSession ssh = session();
  for (int i = 0; i < 5; ++i) {
    Captured captured;
    auto outcome = run(ssh, "echo " + std::to_string(i), captured);
    CHECK(outcome.exit_code == 0);
    CHECK(captured.out == std::to_string(i) + "\n");
    REQUIRE(ssh.upload(std::to_string(i), "/tmp/n", 0644).has_value());
  }
}

}  // TEST_SUITE

TEST_SUITE("ssh_session without a guest") {

TEST_CASE("a listener that never speaks: clear error at the deadline") {
  SilentListener silent;
  auto started = Clock::now();
  auto attempt = SshSession::wait_until_ready(unreachable_target(silent.port),
                                              Clock::now() + 2s, 50ms, [] { return false; });
  auto elapsed = Clock::now() - started;
  REQUIRE_FALSE(attempt.has_value());
  CHECK(attempt.error().message.find("not ready by the deadline") != std::string::npos);
  CHECK(attempt.error().message.find("handshake") != std::string::npos);
  CHECK(attempt.error().message.find(std::to_string(silent.port)) != std::string::npos);
  CHECK(elapsed >= 2s);
  CHECK(elapsed < 4s);
}

// The connections a SilentListener's backlog holds (each attempt leaves one):
// accepted until accept would block.
int connections_made(SilentListener& listener) {
  ::fcntl(listener.fd, F_SETFL, ::fcntl(listener.fd, F_GETFL) | O_NONBLOCK);
  int count = 0;
  for (int fd; (fd = ::accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC)) >= 0; ++count)
    ::close(fd);
  return count;
}

TEST_CASE("a server known to listen is given the whole attempt to speak, not dropped as a "
          "silent forward") {
  // A restored clone's sshd re-executes for every connection, slowly on a busy
  // host: a dropped attempt only starts another. Without server_listening, the
  // silent-forward rule drops a connection after 500 ms and opens the next.
  SilentListener patient, hasty;
  auto waited = SshSession::wait_until_ready(unreachable_target(patient.port),
                                             Clock::now() + 2500ms, 50ms, [] { return false; },
                                             true);
  REQUIRE_FALSE(waited.has_value());
  auto hurried = SshSession::wait_until_ready(unreachable_target(hasty.port),
                                              Clock::now() + 2500ms, 50ms, [] { return false; });
  REQUIRE_FALSE(hurried.has_value());
  CHECK(connections_made(patient) == 1);
  CHECK(connections_made(hasty) >= 3);
}

TEST_CASE("give_up() stops waiting at once") {
  SilentListener silent;
  std::atomic<bool> qemu_exited{false};
  std::thread exiter([&] {
    std::this_thread::sleep_for(300ms);
    qemu_exited = true;
  });
  auto started = Clock::now();
  auto attempt = SshSession::wait_until_ready(unreachable_target(silent.port),
                                              Clock::now() + 30s, 50ms,
                                              [&] { return qemu_exited.load(); });
  auto elapsed = Clock::now() - started;
  exiter.join();
  REQUIRE_FALSE(attempt.has_value());
  CHECK(attempt.error().message.find("gave up") != std::string::npos);
  CHECK(elapsed < 1500ms);
}

TEST_CASE("nothing listening: retried until the deadline, then the refusal is named") {
  uint16_t port = closed_port();
  auto started = Clock::now();
  auto attempt = SshSession::wait_until_ready(unreachable_target(port), Clock::now() + 1s, 20ms,
                                              [] { return false; });
  auto elapsed = Clock::now() - started;
  REQUIRE_FALSE(attempt.has_value());
  CHECK(attempt.error().message.find("refused") != std::string::npos);
  CHECK(elapsed >= 1s);
  CHECK(elapsed < 3s);
  // Polled fast: many attempts, not one every few seconds.
  CHECK(attempt.error().message.find("(1 attempt") == std::string::npos);
}

TEST_CASE("a single connect to a silent listener respects its timeout") {
  SilentListener silent;
  auto started = Clock::now();
  auto attempt = SshSession::connect(unreachable_target(silent.port), 500ms);
  REQUIRE_FALSE(attempt.has_value());
  CHECK(Clock::now() - started < 1500ms);
  CHECK(attempt.error().message.find("handshake") != std::string::npos);
}

}  // TEST_SUITE
