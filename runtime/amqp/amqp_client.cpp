#include "runtime/amqp/amqp_client.hpp"

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <poll.h>
#include <sys/time.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

namespace solstice::amqp {

namespace {

constexpr amqp_channel_t consume_channel = 1;
constexpr amqp_channel_t publish_channel = 2;

std::string to_string(amqp_bytes_t bytes) {
  return bytes.len ? std::string(static_cast<const char*>(bytes.bytes), bytes.len) : std::string{};
}

amqp_bytes_t bytes_of(const std::string& s) {
  return amqp_bytes_t{s.size(), const_cast<char*>(s.data())};
}

// Why an RPC failed, in words (the broker's own reply text when it closed us).
std::string reply_text(const amqp_rpc_reply_t& reply) {
  switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      return "ok";
    case AMQP_RESPONSE_NONE:
      return "no reply from the broker";
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      return amqp_error_string2(reply.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        auto* close = static_cast<amqp_connection_close_t*>(reply.reply.decoded);
        return "the broker closed the connection: " + to_string(close->reply_text);
      }
      if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        auto* close = static_cast<amqp_channel_close_t*>(reply.reply.decoded);
        return "the broker closed the channel: " + to_string(close->reply_text);
      }
      return "the broker answered with an unexpected method";
  }
  return "unknown AMQP error";
}

// String headers as an AMQP table; `storage` keeps the entries alive.
amqp_table_t table_of(const std::map<std::string, std::string>& headers,
                      std::vector<amqp_table_entry_t>& storage) {
  storage.clear();
  for (const auto& [key, value] : headers) {
    amqp_table_entry_t entry{};
    entry.key = bytes_of(key);
    entry.value.kind = AMQP_FIELD_KIND_UTF8;
    entry.value.value.bytes = bytes_of(value);
    storage.push_back(entry);
  }
  return amqp_table_t{static_cast<int>(storage.size()), storage.data()};
}

std::map<std::string, std::string> headers_of(const amqp_basic_properties_t& props) {
  std::map<std::string, std::string> out;
  if (!(props._flags & AMQP_BASIC_HEADERS_FLAG))
    return out;
  for (int i = 0; i < props.headers.num_entries; ++i) {
    const auto& entry = props.headers.entries[i];
    if (entry.value.kind == AMQP_FIELD_KIND_UTF8 || entry.value.kind == AMQP_FIELD_KIND_BYTES)
      out[to_string(entry.key)] = to_string(entry.value.value.bytes);
  }
  return out;
}

timeval timeval_of(std::chrono::milliseconds ms) {
  return timeval{static_cast<time_t>(ms.count() / 1000),
                 static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

}  // namespace

struct Client::State {
  amqp_connection_state_t conn = nullptr;
  bool logged_in = false;

  ~State() {
    if (!conn)
      return;
    if (logged_in) {
      amqp_channel_close(conn, publish_channel, AMQP_REPLY_SUCCESS);
      amqp_channel_close(conn, consume_channel, AMQP_REPLY_SUCCESS);
      amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    }
    amqp_destroy_connection(conn);
  }

  Result<void> check(const char* what) {
    auto reply = amqp_get_rpc_reply(conn);
    if (reply.reply_type == AMQP_RESPONSE_NORMAL)
      return {};
    return fail(std::string{what} + ": " + reply_text(reply));
  }
};

std::string job_routing_key(const std::string& job_id) { return "job." + job_id; }

Result<std::string> password_from(const std::string& file) {
  if (const char* env = std::getenv("SOLSTICE_AMQP_PASSWORD"); env && file.empty())
    return std::string{env};
  if (file.empty())
    return fail("no AMQP password: set SOLSTICE_AMQP_PASSWORD or give --amqp-password-file");
  std::ifstream in{file};
  std::string line;
  if (!in || !std::getline(in, line))
    return fail("--amqp-password-file " + file + ": cannot read a password from it");
  return line;
}

Result<void> check_url(const std::string& url) {
  std::vector<char> text(url.begin(), url.end());
  text.push_back('\0');
  amqp_connection_info info{};
  if (amqp_parse_url(text.data(), &info) != AMQP_STATUS_OK)
    return fail("--amqp " + url + ": not an AMQP URL (amqp://USER@HOST:PORT/VHOST or amqps://...)");
  // rabbitmq-c fills in "guest" when the URL has no password; a ':' in the
  // user-info part is the only sign that one was given.
  auto at = url.find('@');
  auto scheme_end = url.find("://");
  if (at != std::string::npos && scheme_end != std::string::npos &&
      url.substr(scheme_end + 3, at - scheme_end - 3).find(':') != std::string::npos)
    return fail("--amqp " + url.substr(0, scheme_end + 3) +
                "...: the URL must not carry a password (use SOLSTICE_AMQP_PASSWORD or "
                "--amqp-password-file)");
  return {};
}

Client::Client(std::unique_ptr<State> state) : state_(std::move(state)) {}
Client::~Client() = default;

Result<std::unique_ptr<Client>> Client::connect(const Endpoint& endpoint,
                                                std::chrono::seconds timeout) {
  if (auto ok = check_url(endpoint.url); !ok)
    return tl::unexpected(ok.error());
  std::vector<char> text(endpoint.url.begin(), endpoint.url.end());
  text.push_back('\0');
  amqp_connection_info info{};
  amqp_parse_url(text.data(), &info);
  auto where = std::string{info.host} + ":" + std::to_string(info.port);

  auto state = std::make_unique<State>();
  state->conn = amqp_new_connection();
  amqp_socket_t* socket = nullptr;
  if (info.ssl) {
    socket = amqp_ssl_socket_new(state->conn);
    if (socket && !endpoint.ca_file.empty() &&
        amqp_ssl_socket_set_cacert(socket, endpoint.ca_file.c_str()) != AMQP_STATUS_OK)
      return fail("--amqp-ca " + endpoint.ca_file + ": cannot be used as a CA certificate");
    if (socket && !endpoint.cert_file.empty() &&
        amqp_ssl_socket_set_key(socket, endpoint.cert_file.c_str(), endpoint.key_file.c_str()) !=
          AMQP_STATUS_OK)
      return fail("--amqp-cert/--amqp-key " + endpoint.cert_file + ", " + endpoint.key_file +
                  ": not a usable certificate and key");
  } else {
    socket = amqp_tcp_socket_new(state->conn);
  }
  if (!socket)
    return fail("cannot make a socket for the AMQP connection");
  auto tv = timeval_of(std::chrono::duration_cast<std::chrono::milliseconds>(timeout));
  if (int rc = amqp_socket_open_noblock(socket, info.host, info.port, &tv); rc != AMQP_STATUS_OK)
    return fail("cannot connect to the AMQP broker at " + where + ": " + amqp_error_string2(rc));
  // Without this capability the broker never says it blocked us.
  amqp_table_entry_t capability{};
  capability.key = amqp_cstring_bytes("connection.blocked");
  capability.value.kind = AMQP_FIELD_KIND_BOOLEAN;
  capability.value.value.boolean = 1;
  amqp_table_entry_t property{};
  property.key = amqp_cstring_bytes("capabilities");
  property.value.kind = AMQP_FIELD_KIND_TABLE;
  property.value.value.table = amqp_table_t{1, &capability};
  amqp_table_t properties{1, &property};
  auto login = amqp_login_with_properties(state->conn, info.vhost, 0, 131072, 0, &properties,
                                          AMQP_SASL_METHOD_PLAIN, info.user,
                                          endpoint.password.c_str());
  if (login.reply_type != AMQP_RESPONSE_NORMAL)
    return fail("cannot log in to the AMQP broker at " + where + " as " + info.user + ": " +
                reply_text(login));
  state->logged_in = true;
  for (auto channel : {consume_channel, publish_channel}) {
    amqp_channel_open(state->conn, channel);
    if (auto ok = state->check("cannot open an AMQP channel"); !ok)
      return tl::unexpected(ok.error());
  }
  amqp_confirm_select(state->conn, publish_channel);
  if (auto ok = state->check("cannot turn on publisher confirms"); !ok)
    return tl::unexpected(ok.error());
  return std::unique_ptr<Client>(new Client(std::move(state)));
}

Result<void> Client::declare(const Names& n) {
  auto* conn = state_->conn;
  const auto ch = publish_channel;
  auto exchange = [&](const std::string& name, const char* type) -> Result<void> {
    amqp_exchange_declare(conn, ch, bytes_of(name), amqp_cstring_bytes(type), 0, 1, 0, 0,
                          amqp_empty_table);
    return state_->check(("cannot declare exchange " + name).c_str());
  };
  auto queue = [&](const std::string& name, amqp_table_t args) -> Result<void> {
    amqp_queue_declare(conn, ch, bytes_of(name), 0, 1, 0, 0, args);
    return state_->check(("cannot declare queue " + name).c_str());
  };
  auto bind = [&](const std::string& q, const std::string& x, const std::string& key) {
    amqp_queue_bind(conn, ch, bytes_of(q), bytes_of(x), bytes_of(key), amqp_empty_table);
    return state_->check(("cannot bind queue " + q + " to " + x).c_str());
  };
  // A job the broker itself dead-letters (a reject without requeue) goes to the
  // dead-letter queue too, through the default exchange.
  std::vector<amqp_table_entry_t> storage;
  auto dead_letter_args = table_of(
    {{"x-dead-letter-exchange", ""}, {"x-dead-letter-routing-key", n.dead_letter_queue}}, storage);
  for (auto step : {exchange(n.jobs_exchange, "direct"), exchange(n.events_exchange, "topic"),
                    exchange(n.results_exchange, "topic"),
                    queue(n.dead_letter_queue, amqp_empty_table),
                    queue(n.jobs_queue, dead_letter_args),
                    bind(n.jobs_queue, n.jobs_exchange, n.jobs_queue)})
    if (!step)
      return step;
  if (!n.results_queue.empty()) {
    if (auto ok = queue(n.results_queue, amqp_empty_table); !ok)
      return ok;
    return bind(n.results_queue, n.results_exchange, "#");
  }
  return {};
}

Result<std::string> Client::declare_private_queue(
  const std::map<std::string, std::string>& exchange_to_key) {
  auto* ok = amqp_queue_declare(state_->conn, consume_channel, amqp_empty_bytes, 0, 0, 1, 1,
                                amqp_empty_table);
  if (auto checked = state_->check("cannot declare a private queue"); !checked)
    return tl::unexpected(checked.error());
  auto name = to_string(ok->queue);
  for (const auto& [exchange, key] : exchange_to_key) {
    amqp_queue_bind(state_->conn, consume_channel, bytes_of(name), bytes_of(exchange),
                    bytes_of(key), amqp_empty_table);
    if (auto checked = state_->check(("cannot bind a private queue to " + exchange).c_str());
        !checked)
      return tl::unexpected(checked.error());
  }
  return name;
}

Result<void> Client::declare_follow_queue(
  const std::string& name, const std::map<std::string, std::string>& exchange_to_key,
  std::chrono::milliseconds unused_for, int queue_version) {
  amqp_table_entry_t args[2]{};
  args[0].key = amqp_cstring_bytes("x-expires");
  args[0].value.kind = AMQP_FIELD_KIND_I64;
  args[0].value.value.i64 = unused_for.count();
  args[1].key = amqp_cstring_bytes("x-queue-version");
  args[1].value.kind = AMQP_FIELD_KIND_I64;
  args[1].value.value.i64 = queue_version;
  amqp_queue_declare(state_->conn, consume_channel, bytes_of(name), 0, 1, 0, 0,
                     amqp_table_t{queue_version ? 2 : 1, args});
  if (auto checked = state_->check(("cannot declare queue " + name).c_str()); !checked)
    return checked;
  for (const auto& [exchange, key] : exchange_to_key) {
    amqp_queue_bind(state_->conn, consume_channel, bytes_of(name), bytes_of(exchange),
                    bytes_of(key), amqp_empty_table);
    if (auto checked = state_->check(("cannot bind queue " + name + " to " + exchange).c_str());
        !checked)
      return checked;
  }
  return {};
}

Result<void> Client::delete_queue(const std::string& name) {
  amqp_queue_delete(state_->conn, consume_channel, bytes_of(name), 0, 0);
  return state_->check(("cannot delete queue " + name).c_str());
}

Result<void> Client::consume(const std::string& queue, uint16_t prefetch, bool no_ack) {
  if (prefetch) {
    amqp_basic_qos(state_->conn, consume_channel, 0, prefetch, 0);
    if (auto ok = state_->check("cannot set the prefetch count"); !ok)
      return ok;
  }
  amqp_basic_consume(state_->conn, consume_channel, bytes_of(queue), amqp_empty_bytes, 0,
                     no_ack ? 1 : 0, 0, amqp_empty_table);
  return state_->check(("cannot consume queue " + queue).c_str());
}

Result<void> Client::set_channel_prefetch(uint16_t count) {
  amqp_basic_qos(state_->conn, consume_channel, 0, count, 1);
  return state_->check("cannot set the channel's prefetch count");
}

Result<uint64_t> Client::publish(const Message& m) {
  amqp_basic_properties_t props{};
  props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
  props.content_type = bytes_of(m.content_type);
  props.delivery_mode = m.persistent ? AMQP_DELIVERY_PERSISTENT : AMQP_DELIVERY_NONPERSISTENT;
  std::vector<amqp_table_entry_t> storage;
  if (!m.headers.empty()) {
    props._flags |= AMQP_BASIC_HEADERS_FLAG;
    props.headers = table_of(m.headers, storage);
  }
  if (!m.correlation_id.empty()) {
    props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
    props.correlation_id = bytes_of(m.correlation_id);
  }
  int rc = amqp_basic_publish(state_->conn, publish_channel, bytes_of(m.exchange),
                              bytes_of(m.routing_key), 0, 0, &props, bytes_of(m.body));
  if (rc != AMQP_STATUS_OK)
    return fail("cannot publish to " + (m.exchange.empty() ? "the default exchange" : m.exchange) +
                ": " + amqp_error_string2(rc));
  return next_publish_seq_++;
}

Result<void> Client::publish_confirmed(const Message& message, std::chrono::milliseconds timeout) {
  auto seq = publish(message);
  if (!seq)
    return tl::unexpected(seq.error());
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    auto frame = next(std::chrono::milliseconds(200));
    if (!frame)
      return tl::unexpected(frame.error());
    auto* confirm = std::get_if<Confirm>(&*frame);
    if (!confirm || confirm->tag < *seq || (!confirm->multiple && confirm->tag != *seq))
      continue;
    if (!confirm->ack)
      return fail("the broker refused the message (nack)");
    return {};
  }
  return fail("the broker did not confirm the message in time");
}

Result<Frame> Client::next(std::chrono::milliseconds wait, int wake_fd) {
  auto* conn = state_->conn;
  amqp_maybe_release_buffers(conn);
  if (wake_fd >= 0 && !amqp_frames_enqueued(conn) && !amqp_data_in_buffer(conn)) {
    // Sleep until the broker sends something or the caller is woken; then only
    // read what is there. Reading (not just polling) every time also finds a
    // frame that TLS holds already decrypted, which poll(2) cannot see.
    pollfd fds[2] = {{amqp_get_sockfd(conn), POLLIN, 0}, {wake_fd, POLLIN, 0}};
    (void)::poll(fds, 2, static_cast<int>(wait.count()));
    wait = std::chrono::milliseconds(0);
  }
  amqp_frame_t frame{};
  auto tv = timeval_of(wait);
  int rc = amqp_simple_wait_frame_noblock(conn, &frame, &tv);
  if (rc == AMQP_STATUS_TIMEOUT)
    return Timeout{};
  if (rc != AMQP_STATUS_OK)
    return fail(std::string{"the AMQP connection failed: "} + amqp_error_string2(rc));
  if (frame.frame_type != AMQP_FRAME_METHOD)
    return Timeout{};  // heartbeats and stray content frames carry nothing for us
  switch (frame.payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD: {
      auto* deliver = static_cast<amqp_basic_deliver_t*>(frame.payload.method.decoded);
      Delivery d;
      d.tag = deliver->delivery_tag;
      d.redelivered = deliver->redelivered;
      d.exchange = to_string(deliver->exchange);
      amqp_message_t message{};
      auto reply = amqp_read_message(conn, frame.channel, &message, 0);
      if (reply.reply_type != AMQP_RESPONSE_NORMAL)
        return fail("cannot read a delivered message: " + reply_text(reply));
      d.body = to_string(message.body);
      d.headers = headers_of(message.properties);
      if (message.properties._flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
        d.content_type = to_string(message.properties.content_type);
      if (message.properties._flags & AMQP_BASIC_CORRELATION_ID_FLAG)
        d.correlation_id = to_string(message.properties.correlation_id);
      amqp_destroy_message(&message);
      return d;
    }
    case AMQP_BASIC_ACK_METHOD: {
      auto* ack = static_cast<amqp_basic_ack_t*>(frame.payload.method.decoded);
      return Confirm{ack->delivery_tag, static_cast<bool>(ack->multiple), true};
    }
    case AMQP_BASIC_NACK_METHOD: {
      auto* nack = static_cast<amqp_basic_nack_t*>(frame.payload.method.decoded);
      return Confirm{nack->delivery_tag, static_cast<bool>(nack->multiple), false};
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
      auto* close = static_cast<amqp_connection_close_t*>(frame.payload.method.decoded);
      return fail("the broker closed the connection: " + to_string(close->reply_text));
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
      auto* close = static_cast<amqp_channel_close_t*>(frame.payload.method.decoded);
      return fail("the broker closed a channel: " + to_string(close->reply_text));
    }
    case AMQP_CONNECTION_BLOCKED_METHOD:
      return Blocked{true};
    case AMQP_CONNECTION_UNBLOCKED_METHOD:
      return Blocked{false};
    default:
      return Timeout{};
  }
}

Result<void> Client::ack(uint64_t tag) {
  if (int rc = amqp_basic_ack(state_->conn, consume_channel, tag, 0); rc != AMQP_STATUS_OK)
    return fail(std::string{"cannot acknowledge a job: "} + amqp_error_string2(rc));
  return {};
}

Result<void> Client::reject(uint64_t tag, bool requeue) {
  if (int rc = amqp_basic_reject(state_->conn, consume_channel, tag, requeue ? 1 : 0);
      rc != AMQP_STATUS_OK)
    return fail(std::string{"cannot reject a job: "} + amqp_error_string2(rc));
  return {};
}

Result<std::pair<uint32_t, uint32_t>> Client::queue_counts(const std::string& queue) {
  auto* ok =
    amqp_queue_declare(state_->conn, publish_channel, bytes_of(queue), 1, 0, 0, 0, amqp_empty_table);
  if (auto checked = state_->check(("no queue " + queue).c_str()); !checked)
    return tl::unexpected(checked.error());
  return std::pair{ok->message_count, ok->consumer_count};
}

}  // namespace solstice::amqp
