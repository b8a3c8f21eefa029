// Where does SSH throughput go? Uploads to and streams from one already running
// guest through the runner's own SshSession (runtime/ssh/), without the
// actors, then streams through plain blocking libssh2 and prints what it negotiated.
// Point it at a guest started by the runner (debug_on_failure gives its key) and at
// one started by bench/baseline-job.sh to compare the two.
//
//   ssh_probe PORT USER KEYFILE BYTES
//
// KEYFILE is an OpenSSH ed25519 private key (KEYFILE.pub next to it) authorized
// for USER on 127.0.0.1:PORT. BYTES are streamed from the guest's /dev/zero and
// uploaded to the guest's /tmp.
#include <libssh2.h>
#include <libssh2_sftp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/ssh/ssh_session.hpp"

namespace {

using Clock = std::chrono::steady_clock;

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void report(const char* what, size_t bytes, double seconds) {
  std::printf("%-46s %8.2f MiB/s  (%.2f s)\n", what, static_cast<double>(bytes) / 1048576.0 / seconds,
              seconds);
  std::fflush(stdout);
}

// A blocking libssh2 session, as a plain client would use it.
struct PlainSession {
  int fd = -1;
  LIBSSH2_SESSION* session = nullptr;

  bool open(uint16_t port, const std::string& user, const std::string& key, const std::string& pub) {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) return false;
    session = libssh2_session_init();
    libssh2_session_set_blocking(session, 1);
    if (libssh2_session_handshake(session, fd) != 0) return false;
    return libssh2_userauth_publickey_frommemory(session, user.data(), user.size(), pub.data(),
                                                 pub.size(), key.data(), key.size(), nullptr) == 0;
  }
  ~PlainSession() {
    if (session) {
      libssh2_session_disconnect(session, "done");
      libssh2_session_free(session);
    }
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: ssh_probe PORT USER KEYFILE BYTES\n");
    return 2;
  }
  const auto port = static_cast<uint16_t>(std::atoi(argv[1]));
  const std::string user = argv[2];
  const std::string key = read_text(argv[3]);
  const std::string pub = read_text(std::string(argv[3]) + ".pub");
  const size_t bytes = std::strtoull(argv[4], nullptr, 10);
  const std::string stream_command = "head -c " + std::to_string(bytes) + " /dev/zero";

  std::vector<char> payload(bytes, 'x');
  char local[] = "/tmp/ssh-probe-XXXXXX";
  int local_fd = ::mkstemp(local);
  if (local_fd < 0 || ::write(local_fd, payload.data(), payload.size()) != static_cast<ssize_t>(bytes)) {
    std::fprintf(stderr, "ssh_probe: cannot write %s\n", local);
    return 1;
  }
  ::close(local_fd);

  // 1. The runner's SshSession.
  solstice::SshTarget target;
  target.port = port;
  target.user = user;
  target.private_key = key;
  target.public_key = pub;
  auto session = solstice::SshSession::connect(target, std::chrono::seconds(30));
  if (!session) {
    std::fprintf(stderr, "ssh_probe: %s\n", session.error().message.c_str());
    ::unlink(local);
    return 1;
  }
  auto start = Clock::now();
  auto uploaded = session->upload_file(local, "/tmp/ssh-probe-1.bin", 0644);
  report(uploaded ? "SshSession::upload_file (runner's path)" : "SshSession::upload_file FAILED", bytes,
         seconds_since(start));

  size_t received = 0;
  start = Clock::now();
  auto outcome = session->exec(stream_command, [&](solstice::SshStream stream, std::string_view data) {
    if (stream == solstice::SshStream::out) received += data.size();
  });
  report("SshSession::exec stream (runner's path)", received, seconds_since(start));

  // 2. Plain blocking libssh2, large buffers.
  PlainSession plain;
  if (!plain.open(port, user, key, pub)) {
    std::fprintf(stderr, "ssh_probe: plain libssh2 session failed\n");
    ::unlink(local);
    return 1;
  }
  std::printf("negotiated: %s / %s, kex %s\n",
              libssh2_session_methods(plain.session, LIBSSH2_METHOD_CRYPT_SC),
              libssh2_session_methods(plain.session, LIBSSH2_METHOD_MAC_SC),
              libssh2_session_methods(plain.session, LIBSSH2_METHOD_KEX));
  std::vector<char> buffer(1 << 20);
  {
    auto* channel = libssh2_channel_open_session(plain.session);
    start = Clock::now();
    libssh2_channel_exec(channel, stream_command.c_str());
    size_t total = 0;
    ssize_t n;
    while ((n = libssh2_channel_read(channel, buffer.data(), buffer.size())) > 0) total += n;
    report("libssh2 blocking exec stream, 1 MiB reads", total, seconds_since(start));
    libssh2_channel_close(channel);
    libssh2_channel_free(channel);
  }
  ::unlink(local);
  return 0;
}
