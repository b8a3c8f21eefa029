#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "runtime/base/child_process.hpp"
#include "runtime/vm/qmp.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// What QEMU 7.2 sends (captured from qemu-system-x86_64 -machine none).
const std::string kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}})"
    "\r\n";
const std::string kUsernet =
    "Hub -1 (n0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]   8       127.0.0.1 33203       10.0.2.15    22     0     0\r\n";

struct TempDir : solstice::test::TempDir {
  TempDir() : solstice::test::TempDir("solstice-qmp-") {}
};

// A QEMU with no guest, just a user-mode netdev and a QMP socket.
struct BareQemu {
  TempDir dir;
  fs::path socket = dir.path / "qmp.sock";
  ChildProcess process;

  BareQemu() {
    auto spawned = ChildProcess::spawn(
        {"qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-netdev",
         "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22", "-qmp", "unix:" + socket.string() + ",server=on,wait=off"});
    REQUIRE_MESSAGE(spawned.has_value(), (spawned ? "" : spawned.error().message));
    process = std::move(*spawned);
  }

  // Connected once the machine runs, with no event pending: QEMU starts it after
  // the QMP socket is up, so a quick client may or may not see its RESUME. Once
  // query-status says "running", that RESUME (sent before the reply) is queued.
  QmpClient connect() {
    auto client = QmpClient::connect(socket, 10s);
    REQUIRE_MESSAGE(client.has_value(), (client ? "" : client.error().message));
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    for (;;) {
      auto status = client->execute("query-status");
      REQUIRE_MESSAGE(status.has_value(), (status ? "" : status.error().message));
      if ((*status)["status"] == "running")
        break;
      REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline, "QEMU did not start running: " << status->dump());
      std::this_thread::sleep_for(20ms);
    }
    while (client->next_event(0ms)) {
    }
    return std::move(*client);
  }
};

// True if a TCP connect to address:port succeeds within a second.
bool tcp_connects(const std::string& address, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  timeval limit{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
  sockaddr_in target{};
  target.sin_family = AF_INET;
  target.sin_port = htons(port);
  ::inet_pton(AF_INET, address.c_str(), &target.sin_addr);
  bool connected = ::connect(fd, reinterpret_cast<sockaddr*>(&target), sizeof target) == 0;
  ::close(fd);
  return connected;
}

// The first IPv4 address of this machine that is not loopback, or "".
std::string non_loopback_ipv4() {
  ifaddrs* interfaces = nullptr;
  if (::getifaddrs(&interfaces) != 0) return "";
  std::string found;
  for (ifaddrs* entry = interfaces; entry && found.empty(); entry = entry->ifa_next) {
    if (!entry->ifa_addr || entry->ifa_addr->sa_family != AF_INET) continue;
    auto* address = reinterpret_cast<sockaddr_in*>(entry->ifa_addr);
    if ((ntohl(address->sin_addr.s_addr) >> 24) == 127) continue;
    char text[INET_ADDRSTRLEN];
    ::inet_ntop(AF_INET, &address->sin_addr, text, sizeof text);
    found = text;
  }
  ::freeifaddrs(interfaces);
  return found;
}

}  // namespace

TEST_SUITE("qmp_codec") {
  TEST_CASE("greeting, reply, error and event are recognised") {
    QmpCodec codec;
    auto messages = codec.feed(
        kGreeting + R"({"return": {}, "id": "solstice-1"})" "\r\n" +
        R"({"id": "solstice-2", "error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}})" "\r\n" +
        R"({"timestamp": {"seconds": 1700000000, "microseconds": 250}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})" "\r\n" +
        R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"})" "\r\n");
    REQUIRE(messages.has_value());
    REQUIRE(messages->size() == 5);
    const auto& m = *messages;
    CHECK(m[0].kind == QmpMessage::Kind::greeting);
    CHECK(m[0].data["version"]["qemu"]["major"] == 7);
    CHECK(m[1].kind == QmpMessage::Kind::reply);
    CHECK(m[1].id == "solstice-1");
    CHECK(m[1].data == nlohmann::json::object());
    CHECK(m[2].kind == QmpMessage::Kind::error);
    CHECK(m[2].id == "solstice-2");
    CHECK(m[2].error_message == "CommandNotFound: The command bogus has not been found");
    CHECK(m[2].data["class"] == "CommandNotFound");
    CHECK(m[3].kind == QmpMessage::Kind::event);
    CHECK(m[3].event == "SHUTDOWN");
    CHECK(m[3].data["reason"] == "host-qmp-quit");
    CHECK(m[3].timestamp_us == 1700000000LL * 1000000 + 250);
    CHECK(m[4].event == "STOP");
    CHECK(m[4].data == nlohmann::json::object());
  }

  TEST_CASE("messages split across chunks, even byte by byte, come out whole") {
    const std::string stream = kGreeting + R"({"return": {"status": "running"}, "id": "a"})" "\n" +
                               R"({"event": "RESUME", "timestamp": {"seconds": 0, "microseconds": 0}})" "\n";
    for (size_t chunk_size : {size_t{1}, size_t{3}, size_t{17}, stream.size()}) {
      CAPTURE(chunk_size);
      QmpCodec codec;
      std::vector<QmpMessage> all;
      for (size_t at = 0; at < stream.size(); at += chunk_size) {
        auto messages = codec.feed(std::string_view(stream).substr(at, chunk_size));
        REQUIRE(messages.has_value());
        all.insert(all.end(), messages->begin(), messages->end());
      }
      REQUIRE(all.size() == 3);
      CHECK(all[0].kind == QmpMessage::Kind::greeting);
      CHECK(all[1].data["status"] == "running");
      CHECK(all[1].id == "a");
      CHECK(all[2].event == "RESUME");
    }
  }

  TEST_CASE("a partial line waits for its newline") {
    QmpCodec codec;
    auto first = codec.feed(R"({"return": {}, "id")");
    REQUIRE(first.has_value());
    CHECK(first->empty());
    auto second = codec.feed(R"(: "x"})" "\r\n" R"({"return": 5, "id": 7})");
    REQUIRE(second.has_value());
    REQUIRE(second->size() == 1);
    CHECK(second->at(0).id == "x");
    auto third = codec.feed("\n");
    REQUIRE(third.has_value());
    REQUIRE(third->size() == 1);
    CHECK(third->at(0).id == "7");  // numeric ids are kept as their JSON text
    CHECK(third->at(0).data == 5);
  }

  TEST_CASE("malformed JSON is an error that quotes it") {
    QmpCodec codec;
    auto bad = codec.feed("{\"return\": {}, oops}\n");
    REQUIRE_FALSE(bad.has_value());
    CHECK(bad.error().message.find("{\"return\": {}, oops}") != std::string::npos);
    // The codec goes on with the next line.
    auto good = codec.feed("{\"return\": 1, \"id\": \"z\"}\n");
    REQUIRE(good.has_value());
    CHECK(good->size() == 1);

    auto unknown = QmpCodec().feed("{\"something\": 1}\n");
    REQUIRE_FALSE(unknown.has_value());
    CHECK(unknown.error().message.find("something") != std::string::npos);
    auto not_object = QmpCodec().feed("[1, 2]\n");
    REQUIRE_FALSE(not_object.has_value());
    CHECK(not_object.error().message.find("[1, 2]") != std::string::npos);
  }

  TEST_CASE("commands are encoded as one JSON line") {
    std::string plain = QmpCodec::encode_command("query-status", nlohmann::json::object(), "solstice-4");
    REQUIRE(plain.back() == '\n');
    CHECK(plain.find('\n') == plain.size() - 1);
    auto parsed = nlohmann::json::parse(plain);
    CHECK(parsed == nlohmann::json{{"execute", "query-status"}, {"id", "solstice-4"}});
    auto with_arguments = nlohmann::json::parse(QmpCodec::encode_command(
        "human-monitor-command", {{"command-line", "info usernet\n\"x\""}}, "solstice-5"));
    CHECK(with_arguments["arguments"]["command-line"] == "info usernet\n\"x\"");
  }

  TEST_CASE("info usernet: the host port forwarded to the guest port") {
    auto port = parse_usernet_host_port(kUsernet);
    REQUIRE(port.has_value());
    CHECK(*port == 33203);

    const std::string two_forwards =
        "Hub -1 (net0):\r\n"
        "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
        "  TCP[ESTABLISHED]   12       127.0.0.1 40000       10.0.2.15    22     0     0\r\n"
        "  TCP[HOST_FORWARD]  16       127.0.0.1 41235       10.0.2.15    80     0     0\r\n"
        "  TCP[HOST_FORWARD]  17       127.0.0.1 41236       10.0.2.15    22     0     0\r\n"
        "  UDP[236 sec]       18       10.0.2.15 68        10.0.2.2     67     0     0\r\n";
    CHECK(parse_usernet_host_port(two_forwards).value() == 41236);
    CHECK(parse_usernet_host_port(two_forwards, 80).value() == 41235);
    auto missing = parse_usernet_host_port(two_forwards, 443);
    REQUIRE_FALSE(missing.has_value());
    CHECK(missing.error().message.find("443") != std::string::npos);
    CHECK_FALSE(parse_usernet_host_port("").has_value());
  }
}

TEST_SUITE("qmp_client") {
  TEST_CASE("connects, negotiates capabilities and runs commands") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    auto status = qmp.execute("query-status");
    REQUIRE_MESSAGE(status.has_value(), (status ? "" : status.error().message));
    CHECK((*status)["status"] == "running");
    // Capabilities were negotiated: QEMU only lists commands after qmp_capabilities.
    auto commands = qmp.execute("query-commands");
    REQUIRE(commands.has_value());
    CHECK(commands->size() > 10);
  }

  TEST_CASE("an unknown command is an error value with QEMU's class and description") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    auto reply = qmp.execute("solstice-bogus-command");
    REQUIRE_FALSE(reply.has_value());
    CHECK(reply.error().message.find("CommandNotFound") != std::string::npos);
    CHECK(reply.error().message.find("solstice-bogus-command") != std::string::npos);
    // The session is still usable.
    CHECK(qmp.execute("query-status").has_value());
  }

  TEST_CASE("info usernet gives a port listening on 127.0.0.1 only") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    auto usernet = qmp.human_command("info usernet");
    REQUIRE_MESSAGE(usernet.has_value(), (usernet ? "" : usernet.error().message));
    auto port = parse_usernet_host_port(*usernet);
    REQUIRE_MESSAGE(port.has_value(), (port ? "" : port.error().message));
    CHECK(tcp_connects("127.0.0.1", *port));
    CHECK_FALSE(tcp_connects("127.0.0.2", *port));
    const std::string external = non_loopback_ipv4();
    if (!external.empty()) {
      CAPTURE(external);
      CHECK_FALSE(tcp_connects(external, *port));
    } else {
      MESSAGE("no non-loopback IPv4 address on this machine; checked 127.0.0.2 only");
    }
  }

  TEST_CASE("stop produces a STOP event; events are queued while a command waits") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    CHECK_FALSE(qmp.next_event(100ms).has_value());
    REQUIRE(qmp.execute("stop").has_value());
    // STOP arrived before stop's reply and was queued meanwhile.
    auto status = qmp.execute("query-status");
    REQUIRE(status.has_value());
    CHECK((*status)["status"] == "paused");
    auto event = qmp.next_event(5s);
    REQUIRE(event.has_value());
    CHECK(event->kind == QmpMessage::Kind::event);
    CHECK(event->event == "STOP");
    CHECK(event->timestamp_us > 0);
    REQUIRE(qmp.execute("cont").has_value());
    auto resumed = qmp.next_event(5s);
    REQUIRE(resumed.has_value());
    CHECK(resumed->event == "RESUME");
  }

  TEST_CASE("quit ends QEMU and the process reports its exit") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    REQUIRE(qmp.execute("quit").has_value());
    auto exit = qemu.process.wait_for(10s);
    REQUIRE(exit.has_value());
    CHECK(exit->describe() == "exit code 0");
    auto shutdown = qmp.next_event(1s);
    REQUIRE(shutdown.has_value());
    CHECK(shutdown->event == "SHUTDOWN");
    auto after = qmp.execute("query-status", nlohmann::json::object(), 2s);
    REQUIRE_FALSE(after.has_value());
    CHECK(after.error().message.find("query-status") != std::string::npos);
  }

  TEST_CASE("a socket that never appears is a clear error within the timeout") {
    TempDir dir;
    const fs::path socket = dir.path / "never.sock";
    const auto started = std::chrono::steady_clock::now();
    auto client = QmpClient::connect(socket, 300ms);
    const auto took = std::chrono::steady_clock::now() - started;
    REQUIRE_FALSE(client.has_value());
    CHECK(client.error().message == "QMP socket " + socket.string() + " did not appear within 300 ms");
    CHECK(took >= 300ms);
    CHECK(took < 2s);
  }

  TEST_CASE("connect waits for a socket that appears late") {
    TempDir dir;
    const fs::path socket = dir.path / "late.sock";
    auto spawned = ChildProcess::spawn(
        {"sh", "-c", "sleep 0.5; exec qemu-system-x86_64 -machine none -nodefaults -display none -qmp unix:" +
                         socket.string() + ",server=on,wait=off"});
    REQUIRE(spawned.has_value());
    auto client = QmpClient::connect(socket, 10s);
    REQUIRE_MESSAGE(client.has_value(), (client ? "" : client.error().message));
    CHECK(client->execute("query-status").has_value());
  }

  TEST_CASE("a QEMU that stops answering times out; a stale reply is not mistaken for a new one") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    qemu.process.kill(SIGSTOP);
    const auto started = std::chrono::steady_clock::now();
    auto reply = qmp.execute("query-status", nlohmann::json::object(), 300ms);
    CHECK(std::chrono::steady_clock::now() - started < 2s);
    REQUIRE_FALSE(reply.has_value());
    CHECK(reply.error().message.find("no reply within 300 ms") != std::string::npos);
    qemu.process.kill(SIGCONT);
    // The late reply to query-status must not be taken as the reply to query-name.
    auto name = qmp.execute("query-name");
    REQUIRE(name.has_value());
    CHECK(name->is_object());
    CHECK_FALSE(name->contains("status"));
  }

  TEST_CASE("a QEMU killed while a command waits gives an error, not a hang") {
    BareQemu qemu;
    QmpClient qmp = qemu.connect();
    qemu.process.kill(SIGSTOP);  // the command below gets no answer...
    std::thread killer([&] {
      std::this_thread::sleep_for(200ms);
      qemu.process.kill(SIGKILL);  // ...until QEMU dies
    });
    const auto started = std::chrono::steady_clock::now();
    auto reply = qmp.execute("query-status", nlohmann::json::object(), 20s);
    const auto took = std::chrono::steady_clock::now() - started;
    killer.join();
    REQUIRE_FALSE(reply.has_value());
    CHECK_MESSAGE(reply.error().message.find("closed") != std::string::npos, reply.error().message);
    CHECK(took < 5s);
    auto exit = qemu.process.wait_for(5s);
    REQUIRE(exit.has_value());
    CHECK(exit->signal == SIGKILL);
    CHECK_FALSE(qmp.next_event(100ms).has_value());
  }
}
