#pragma once
// QMP: a pure codec (bytes in, messages out) and a small blocking client built on
// it. The qmp_session actor runs the codec on its own I/O thread.
#include <chrono>
#include <functional>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/error.hpp"

namespace solstice {

struct QmpMessage {
  enum class Kind { greeting, reply, error, event };
  Kind kind = Kind::reply;
  std::string id;             // the request id a reply/error answers
  std::string event;          // event name ("SHUTDOWN", ...)
  nlohmann::json data;        // "return", "error" or event "data" object
  std::string error_message;  // for errors: "class: desc"
  int64_t timestamp_us = 0;   // for events: QEMU's timestamp, microseconds since the epoch
};

// Splits the byte stream into JSON messages (one per line as QEMU sends them).
class QmpCodec {
 public:
  // Feeds bytes; returns the complete messages they finish. Malformed JSON is an
  // error naming the offending text.
  Result<std::vector<QmpMessage>> feed(std::string_view bytes);
  static std::string encode_command(const std::string& command, const nlohmann::json& arguments,
                                    const std::string& id);

 private:
  std::string buffer_;
};

class QmpClient {
 public:
  QmpClient() = default;
  QmpClient(QmpClient&&) noexcept;
  QmpClient& operator=(QmpClient&&) noexcept;
  ~QmpClient();

  // Waits up to `timeout` for the socket to appear and accept, reads the greeting,
  // negotiates qmp_capabilities. A socket that never appears is an error naming it.
  // `give_up`, when set, is asked while waiting for the socket: true ends the wait
  // at once (e.g. QEMU is gone, so the socket never will appear).
  static Result<QmpClient> connect(const std::filesystem::path& socket,
                                   std::chrono::milliseconds timeout,
                                   const std::function<bool()>& give_up = {});

  // Sends a command and waits for its reply; events read meanwhile are queued.
  // `pass_fd` >= 0 is sent along (SCM_RIGHTS), for `getfd`.
  Result<nlohmann::json> execute(const std::string& command,
                                 const nlohmann::json& arguments = nlohmann::json::object(),
                                 std::chrono::milliseconds timeout = std::chrono::seconds(10),
                                 int pass_fd = -1);
  // Waits up to `timeout` for the next event (queued ones first).
  std::optional<QmpMessage> next_event(std::chrono::milliseconds timeout);
  // Human monitor passthrough (`info usernet` and the like).
  Result<std::string> human_command(const std::string& command_line,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(10));

  int fd() const { return fd_; }
  // QEMU closed the connection (a read met EOF or a reset).
  bool peer_closed() const { return peer_closed_; }

 private:
  int fd_ = -1;
  bool peer_closed_ = false;
  uint64_t next_id_ = 1;
  QmpCodec codec_;
  std::deque<QmpMessage> events_;
  std::deque<QmpMessage> replies_;  // replies and errors not yet claimed by execute()
  // Waits up to `timeout` for bytes; false if none came. EOF is an error.
  Result<bool> read_some(std::chrono::milliseconds timeout);
};

// The host port of the first TCP host-forward to guest port `guest_port` in the
// output of `info usernet`.
Result<uint16_t> parse_usernet_host_port(const std::string& info_usernet,
                                         uint16_t guest_port = 22);

}  // namespace solstice
