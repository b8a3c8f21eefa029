#include "runtime/vm/qmp.hpp"

#include <sys/socket.h>
#include <sys/uio.h>

#include <cstring>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <sstream>
#include <thread>
#include <utility>

namespace solstice {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// QEMU's lines are short; a line this long means the peer is not QMP.
constexpr size_t kMaxLineBytes = 16 * 1024 * 1024;

std::string excerpt(std::string_view text) {
  constexpr size_t kLimit = 200;
  if (text.size() <= kLimit) return std::string(text);
  return std::string(text.substr(0, kLimit)) + "...";
}

milliseconds remaining_until(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
  return std::max(left, milliseconds(0));
}

int poll_timeout(milliseconds timeout) {
  return static_cast<int>(std::clamp<long long>(timeout.count(), 0, INT_MAX));
}

std::string id_text(const nlohmann::json& id) {
  if (id.is_string()) return id.get<std::string>();
  if (id.is_null()) return {};
  return id.dump();
}

Result<QmpMessage> classify(nlohmann::json message, std::string_view line) {
  if (!message.is_object()) return fail("QMP message is not a JSON object: " + excerpt(line));
  QmpMessage result;
  if (message.contains("QMP")) {
    result.kind = QmpMessage::Kind::greeting;
    result.data = std::move(message["QMP"]);
  } else if (message.contains("event")) {
    result.kind = QmpMessage::Kind::event;
    if (!message["event"].is_string()) return fail("QMP event without a name: " + excerpt(line));
    result.event = message["event"].get<std::string>();
    result.data = message.contains("data") ? std::move(message["data"]) : nlohmann::json::object();
    if (auto stamp = message.find("timestamp"); stamp != message.end() && stamp->is_object()) {
      result.timestamp_us = stamp->value("seconds", int64_t{0}) * 1000000 +
                            stamp->value("microseconds", int64_t{0});
    }
  } else if (message.contains("return")) {
    result.kind = QmpMessage::Kind::reply;
    result.id = id_text(message.value("id", nlohmann::json()));
    result.data = std::move(message["return"]);
  } else if (message.contains("error")) {
    result.kind = QmpMessage::Kind::error;
    result.id = id_text(message.value("id", nlohmann::json()));
    result.data = std::move(message["error"]);
    std::string error_class = "GenericError", description;
    if (result.data.is_object()) {
      if (result.data.contains("class") && result.data["class"].is_string())
        error_class = result.data["class"].get<std::string>();
      if (result.data.contains("desc") && result.data["desc"].is_string())
        description = result.data["desc"].get<std::string>();
    }
    result.error_message = error_class + ": " + description;
  } else {
    return fail("unrecognised QMP message: " + excerpt(line));
  }
  return result;
}

}  // namespace

Result<std::vector<QmpMessage>> QmpCodec::feed(std::string_view bytes) {
  buffer_.append(bytes);
  std::vector<QmpMessage> messages;
  size_t line_start = 0;
  for (size_t newline; (newline = buffer_.find('\n', line_start)) != std::string::npos;
       line_start = newline + 1) {
    std::string_view line(buffer_.data() + line_start, newline - line_start);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t'))
      line.remove_suffix(1);
    if (line.empty()) continue;
    nlohmann::json parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded()) {
      std::string text = excerpt(line);
      buffer_.erase(0, newline + 1);
      return fail("malformed JSON from QMP: " + text);
    }
    auto message = classify(std::move(parsed), line);
    if (!message) {
      buffer_.erase(0, newline + 1);
      return tl::unexpected(message.error());
    }
    messages.push_back(std::move(*message));
  }
  buffer_.erase(0, line_start);
  if (buffer_.size() > kMaxLineBytes) {
    std::string text = excerpt(buffer_);
    buffer_.clear();
    return fail("QMP line longer than " + std::to_string(kMaxLineBytes) + " bytes: " + text);
  }
  return messages;
}

std::string QmpCodec::encode_command(const std::string& command, const nlohmann::json& arguments,
                                     const std::string& id) {
  nlohmann::json request{{"execute", command}};
  if (!arguments.is_null() && !(arguments.is_object() && arguments.empty()))
    request["arguments"] = arguments;
  if (!id.empty()) request["id"] = id;
  return request.dump() + "\n";
}

QmpClient::QmpClient(QmpClient&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      peer_closed_(other.peer_closed_),
      next_id_(other.next_id_),
      codec_(std::move(other.codec_)),
      events_(std::move(other.events_)),
      replies_(std::move(other.replies_)) {}

QmpClient& QmpClient::operator=(QmpClient&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    peer_closed_ = other.peer_closed_;
    next_id_ = other.next_id_;
    codec_ = std::move(other.codec_);
    events_ = std::move(other.events_);
    replies_ = std::move(other.replies_);
  }
  return *this;
}

QmpClient::~QmpClient() {
  if (fd_ >= 0) ::close(fd_);
}

Result<QmpClient> QmpClient::connect(const std::filesystem::path& socket_path,
                                     std::chrono::milliseconds timeout,
                                     const std::function<bool()>& give_up) {
  const std::string path = socket_path.string();
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof address.sun_path)
    return fail("QMP socket path " + path + " is empty or longer than " +
                std::to_string(sizeof address.sun_path - 1) + " bytes");
  std::copy(path.begin(), path.end(), address.sun_path);

  const auto deadline = Clock::now() + timeout;
  QmpClient client;
  int last_error = 0;
  for (;;) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return fail(errno_message("cannot create a socket for QMP " + path, errno));
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0) {
      client.fd_ = fd;
      break;
    }
    last_error = errno;
    ::close(fd);
    // Not there yet (ENOENT), not listening yet (ECONNREFUSED), backlog full (EAGAIN).
    if (last_error != ENOENT && last_error != ECONNREFUSED && last_error != EAGAIN)
      return fail(errno_message("cannot connect to QMP socket " + path, last_error));
    if (give_up && give_up())
      return fail("QMP socket " + path + ": QEMU is gone, gave up waiting for it");
    if (Clock::now() >= deadline) {
      if (last_error == ENOENT)
        return fail("QMP socket " + path + " did not appear within " +
                    std::to_string(timeout.count()) + " ms");
      return fail(errno_message("QMP socket " + path + " did not accept a connection within " +
                                    std::to_string(timeout.count()) + " ms",
                                last_error));
    }
    std::this_thread::sleep_for(std::min(milliseconds(10), remaining_until(deadline)));
  }

  // QEMU greets first, then expects qmp_capabilities before any other command.
  for (;;) {
    auto greeting = std::find_if(client.replies_.begin(), client.replies_.end(), [](const QmpMessage& m) {
      return m.kind == QmpMessage::Kind::greeting;
    });
    if (greeting != client.replies_.end()) {
      client.replies_.erase(greeting);
      break;
    }
    auto got = client.read_some(remaining_until(deadline));
    if (!got) return fail("QMP socket " + path + ": " + got.error().message + " before the greeting");
    if (!*got && Clock::now() >= deadline)
      return fail("QMP socket " + path + ": no greeting from QEMU within " +
                  std::to_string(timeout.count()) + " ms");
  }
  // Capabilities negotiation gets at least a second even if connecting used most of
  // the budget: QEMU answers it at once when alive.
  auto negotiated =
      client.execute("qmp_capabilities", nlohmann::json::object(),
                     std::max(remaining_until(deadline), milliseconds(1000)));
  if (!negotiated) return fail("QMP socket " + path + ": " + negotiated.error().message);
  return client;
}

Result<bool> QmpClient::read_some(std::chrono::milliseconds timeout) {
  if (fd_ < 0) return fail("QMP is not connected");
  pollfd readable{fd_, POLLIN, 0};
  int ready = ::poll(&readable, 1, poll_timeout(timeout));
  if (ready < 0) {
    if (errno == EINTR) return false;
    return fail(errno_message("poll on the QMP socket failed", errno));
  }
  if (ready == 0) return false;
  bool got_bytes = false;
  char chunk[65536];
  for (;;) {
    ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno != ECONNRESET) return fail(errno_message("reading the QMP socket failed", errno));
    }
    // ECONNRESET: QEMU exited while something we sent was still unread.
    if (n <= 0) {
      if (got_bytes) break;  // hand over what arrived; EOF shows up on the next read
      peer_closed_ = true;
      return fail("QEMU closed the QMP connection (has it exited?)");
    }
    got_bytes = true;
    auto messages = codec_.feed(std::string_view(chunk, static_cast<size_t>(n)));
    if (!messages) return tl::unexpected(messages.error());
    for (QmpMessage& message : *messages) {
      if (message.kind == QmpMessage::Kind::event)
        events_.push_back(std::move(message));
      else
        replies_.push_back(std::move(message));
    }
  }
  return true;
}

Result<nlohmann::json> QmpClient::execute(const std::string& command, const nlohmann::json& arguments,
                                          std::chrono::milliseconds timeout, int pass_fd) {
  if (fd_ < 0) return fail("QMP command " + command + ": not connected");
  const auto deadline = Clock::now() + timeout;
  const std::string id = "solstice-" + std::to_string(next_id_++);
  const std::string request = QmpCodec::encode_command(command, arguments, id);

  size_t sent = 0;
  if (pass_fd >= 0) {
    // The descriptor rides along with the command's first bytes (SCM_RIGHTS), as
    // QEMU's getfd expects.
    iovec data{const_cast<char*>(request.data()), request.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr message{};
    message.msg_iov = &data;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &pass_fd, sizeof(int));
    ssize_t n;
    do {
      n = ::sendmsg(fd_, &message, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
      return fail(errno_message("QMP command " + command + ": sending a descriptor failed", errno));
    sent = static_cast<size_t>(n);
  }
  while (sent < request.size()) {
    ssize_t n = ::send(fd_, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
      return fail(errno_message("QMP command " + command + ": sending failed (has QEMU exited?)", errno));
    pollfd writable{fd_, POLLOUT, 0};
    if (::poll(&writable, 1, poll_timeout(remaining_until(deadline))) == 0)
      return fail("QMP command " + command + ": could not send within " +
                  std::to_string(timeout.count()) + " ms");
  }

  for (;;) {
    // Replies to earlier commands that timed out are stale: drop them.
    while (!replies_.empty()) {
      QmpMessage reply = std::move(replies_.front());
      replies_.pop_front();
      if (reply.id != id) continue;
      if (reply.kind == QmpMessage::Kind::error)
        return fail("QMP command " + command + " failed: " + reply.error_message);
      return std::move(reply.data);
    }
    if (Clock::now() >= deadline)
      return fail("QMP command " + command + ": no reply within " + std::to_string(timeout.count()) +
                  " ms");
    auto got = read_some(remaining_until(deadline));
    if (!got) return fail("QMP command " + command + ": " + got.error().message);
  }
}

std::optional<QmpMessage> QmpClient::next_event(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  // Read the socket at least once, so a zero timeout polls instead of only
  // returning what earlier reads queued.
  bool read_once = false;
  for (;;) {
    if (!events_.empty()) {
      QmpMessage event = std::move(events_.front());
      events_.pop_front();
      return event;
    }
    if (read_once && Clock::now() >= deadline) return std::nullopt;
    read_once = true;
    auto got = read_some(remaining_until(deadline));
    if (!got) return std::nullopt;
    // Nobody waits for replies here; a stray one must not pile up.
    replies_.clear();
  }
}

Result<std::string> QmpClient::human_command(const std::string& command_line,
                                             std::chrono::milliseconds timeout) {
  auto reply = execute("human-monitor-command", {{"command-line", command_line}}, timeout);
  if (!reply) return tl::unexpected(reply.error());
  if (!reply->is_string())
    return fail("QMP human-monitor-command '" + command_line + "' returned a non-string: " +
                excerpt(reply->dump()));
  return reply->get<std::string>();
}

Result<uint16_t> parse_usernet_host_port(const std::string& info_usernet, uint16_t guest_port) {
  // QEMU 7.2 prints, per hub:
  //   Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  //   TCP[HOST_FORWARD]   8       127.0.0.1 33203       10.0.2.15    22     0     0
  // Columns are read from the right, so a blank FD column cannot shift them.
  std::istringstream lines(info_usernet);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::vector<std::string> columns;
    for (std::string word; words >> word;) columns.push_back(word);
    if (columns.size() < 7 || columns.front() != "TCP[HOST_FORWARD]") continue;
    const size_t n = columns.size();
    const std::string& host_port = columns[n - 5];
    const std::string& dest_port = columns[n - 3];
    if (dest_port != std::to_string(guest_port)) continue;
    try {
      size_t used = 0;
      unsigned long port = std::stoul(host_port, &used);
      if (used == host_port.size() && port > 0 && port <= 65535) return static_cast<uint16_t>(port);
    } catch (const std::exception&) {
    }
    return fail("info usernet: bad host port '" + host_port + "' in line: " + excerpt(line));
  }
  return fail("info usernet: no TCP host forward to guest port " + std::to_string(guest_port) +
              " in: " + excerpt(info_usernet));
}

}  // namespace solstice
