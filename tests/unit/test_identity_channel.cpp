// The host side of the identity port (runtime/vm/identity_channel.hpp) against a
// unix socket that plays QEMU's chardev with the guest's agent behind it: the
// identity goes as one printf-escaped line; only the agent's one status line is read;
// a failure, a strange answer or silence is an error that says which.
#include <doctest/doctest.h>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "runtime/job/guest_commands.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/vm/identity_channel.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// Listens on `path`; the first connection is handed to `agent` on a thread.
struct FakePort {
  int listener = -1;
  std::thread thread;
  std::string received;    // what the agent read, up to the first newline
  bool saw_eof = false;    // the host side closed after the answer

  FakePort(const fs::path& path, std::function<void(int, FakePort&)> agent) {
    listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener, 1) == 0);
    thread = std::thread([this, agent] {
      int fd = ::accept(listener, nullptr, nullptr);
      if (fd < 0)
        return;
      agent(fd, *this);
      ::close(fd);
    });
  }
  ~FakePort() {
    ::shutdown(listener, SHUT_RDWR);
    if (thread.joinable())
      thread.join();
    ::close(listener);
  }

  // Reads one line (as the agent's `read` does).
  void read_line(int fd) {
    char c;
    while (::read(fd, &c, 1) == 1 && c != '\n')
      received += c;
  }
  void wait_for_eof(int fd) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 5000) == 1) {
      char c;
      saw_eof = ::read(fd, &c, 1) == 0;
    }
  }
};

void say(int fd, const std::string& text) {
  REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
}

}  // namespace

TEST_SUITE("identity_channel") {
  TEST_CASE("the identity goes as one printf-escaped line; the agent's ok ends it and the host side closes") {
    test::TempDir dir;
    const auto socket = dir.path / "identity.sock";
    FakePort port(socket, [](int fd, FakePort& self) {
      say(fd, std::string{identity_ready_line} + "\n");
      self.read_line(fd);
      say(fd, std::string{identity_ok_line} + "\n" + "anything after the answer is never read\n");
      self.wait_for_eof(fd);
    });
    auto channel = IdentityChannel::connect(socket, Clock::now() + 5s);
    REQUIRE_MESSAGE(channel.has_value(), (channel ? "" : channel.error().message));
    REQUIRE(await_identity_agent(*channel, Clock::now() + 5s));
    GuestIdentity identity;
    identity.authorized_key = "ssh-ed25519 AAAAJOB job";
    identity.host_key_private = "-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n-----END OPENSSH PRIVATE KEY-----\n";
    identity.hostname = "solstice-job";
    identity.instance_id = "solstice-job";
    identity.unix_now_us = 1796000000000000;
    identity.random_bytes = std::string(64, '\x07');
    const auto input = make_identity_input(identity);
    auto given = give_identity_over_channel(*channel, input, Clock::now() + 5s);
    CHECK_MESSAGE(given.has_value(), (given ? "" : given.error().message));
    CHECK_FALSE(channel->is_open());
    port.thread.join();
    CHECK(port.received == identity_line(input));
    CHECK(port.saw_eof);
  }

  TEST_CASE("what the agent read decodes to the identity input, newlines and all") {
    test::TempDir dir;
    const auto socket = dir.path / "identity.sock";
    std::string received;
    bool eof = false;
    {
      FakePort port(socket, [](int fd, FakePort& self) {
        self.read_line(fd);
        say(fd, std::string{identity_ok_line} + "\n");
        self.wait_for_eof(fd);
      });
      auto channel = IdentityChannel::connect(socket, Clock::now() + 5s);
      REQUIRE(channel);
      REQUIRE(give_identity_over_channel(*channel, "line one\nline two\nkey\n", Clock::now() + 5s));
      port.thread.join();
      received = port.received;
      eof = port.saw_eof;
    }
    CHECK(received == identity_line("line one\nline two\nkey\n"));
    CHECK(received.find('\n') == std::string::npos);
    // The agent's shell decodes it with its printf built-in.
    std::string decoded;
    auto* pipe = ::popen(("printf \"$(cat <<'EOF'\n" + received + "\nEOF\n)\"").c_str(), "r");
    REQUIRE(pipe != nullptr);
    char buf[256];
    for (size_t n; (n = fread(buf, 1, sizeof buf, pipe)) > 0;)
      decoded.append(buf, n);
    ::pclose(pipe);
    CHECK(decoded == "line one\nline two\nkey\n");
    CHECK(eof);
  }

  TEST_CASE("a failing agent, a strange answer, a closed port and silence are errors that say which") {
    test::TempDir dir;
    struct Case {
      const char* name;
      std::string answer;  // written after the identity line; "" = nothing
      bool close_at_once;
      const char* expected;
    };
    const Case cases[] = {
      {"failed", std::string{identity_failed_prefix} + "no dropbear or OpenSSH server\n", false,
       "the guest's identity agent failed: no dropbear or OpenSSH server"},
      {"strange", "hello\x01\n", false, "answered 'hello?'"},
      {"closed", "", true, "QEMU closed the identity port"},
      {"silent", "", false, "timed out while waiting for the guest's answer"},
      {"too long", std::string(5000, 'x'), false, "longer than 1024 bytes"},
    };
    for (const auto& c : cases) {
      CAPTURE(c.name);
      const auto socket = dir.path / (std::string("s-") + std::to_string(&c - cases) + ".sock");
      FakePort port(socket, [&c](int fd, FakePort& self) {
        self.read_line(fd);
        if (c.close_at_once)
          return;
        if (!c.answer.empty())
          say(fd, c.answer);
        self.wait_for_eof(fd);
      });
      auto channel = IdentityChannel::connect(socket, Clock::now() + 5s);
      REQUIRE(channel);
      const auto started = Clock::now();
      auto given = give_identity_over_channel(*channel, "identity\n", Clock::now() + 800ms);
      REQUIRE_FALSE(given.has_value());
      CHECK_MESSAGE(given.error().message.find(c.expected) != std::string::npos, given.error().message);
      CHECK(Clock::now() - started < 5s);
      CHECK_FALSE(channel->is_open());
    }
  }

  TEST_CASE("connect waits for QEMU's socket to appear, and gives up at the deadline naming it") {
    test::TempDir dir;
    const auto socket = dir.path / "late.sock";
    std::unique_ptr<FakePort> port;
    std::thread later([&] {
      std::this_thread::sleep_for(200ms);
      port = std::make_unique<FakePort>(socket, [](int, FakePort&) {});
    });
    auto channel = IdentityChannel::connect(socket, Clock::now() + 5s);
    later.join();
    CHECK_MESSAGE(channel.has_value(), (channel ? "" : channel.error().message));
    channel->close();
    port.reset();

    auto missing = IdentityChannel::connect(dir.path / "never.sock", Clock::now() + 200ms);
    REQUIRE_FALSE(missing.has_value());
    CHECK(missing.error().message.find("never.sock") != std::string::npos);
  }

  TEST_CASE("the template build's ready line must be exactly the agent's") {
    test::TempDir dir;
    const auto socket = dir.path / "identity.sock";
    FakePort port(socket, [](int fd, FakePort&) { say(fd, "something else\n"); });
    auto channel = IdentityChannel::connect(socket, Clock::now() + 5s);
    REQUIRE(channel);
    auto ready = await_identity_agent(*channel, Clock::now() + 5s);
    REQUIRE_FALSE(ready.has_value());
    CHECK(ready.error().message.find("something else") != std::string::npos);
  }
}
