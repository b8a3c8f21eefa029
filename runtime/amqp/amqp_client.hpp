#pragma once
// One blocking AMQP 0-9-1 connection (rabbitmq-c), owned by one thread: connect
// and log in, declare the runner's exchanges and queues, publish (with publisher
// confirms on the publishing channel), consume, and wait for the next frame that
// matters. rabbitmq-c blocks: callers run this on a thread of their own, never on
// an actor scheduler's thread.
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>

#include "runtime/base/error.hpp"

namespace solstice::amqp {

// Where the broker is and how to log in. The URL (amqp://user@host:port/vhost or
// amqps://...) never carries the password.
struct Endpoint {
  std::string url;
  std::string password;
  std::string ca_file, cert_file, key_file;  // amqps only
};

// The names the runner declares (README, "Runner nodes on RabbitMQ").
struct Names {
  std::string jobs_exchange = "solstice.jobs";           // direct, durable
  std::string jobs_queue = "solstice.jobs";               // durable, bound with its own name
  std::string dead_letter_queue = "solstice.jobs.dead";   // durable, via the default exchange
  std::string events_exchange = "solstice.events";        // topic, durable: key job.<id>
  std::string results_exchange = "solstice.results";      // topic, durable: key job.<id>
  std::string results_queue = "solstice.results";         // durable, bound to every result
};

// The routing key of one job's events and result.
std::string job_routing_key(const std::string& job_id);

// The password from SOLSTICE_AMQP_PASSWORD, or else the first line of `file`.
Result<std::string> password_from(const std::string& file);

// Checks the URL's syntax and that it carries no password.
Result<void> check_url(const std::string& url);

struct Delivery {
  uint64_t tag = 0;
  std::string content_type;
  std::string exchange;  // the exchange it was published to
  bool redelivered = false;
  std::string body;
  std::map<std::string, std::string> headers;  // string-valued headers only
  std::string correlation_id;
};

// The broker confirmed (ack) or refused (nack) publishes up to `tag` (or just
// `tag` when not `multiple`) on the publishing channel.
struct Confirm {
  uint64_t tag = 0;
  bool multiple = false;
  bool ack = true;
};

// The broker stopped (blocked) or resumed (unblocked) reading what this
// connection publishes (a resource alarm: memory or disk).
struct Blocked {
  bool blocked = true;
};

struct Timeout {};

using Frame = std::variant<Delivery, Confirm, Blocked, Timeout>;

struct Message {
  std::string exchange, routing_key, body;
  std::map<std::string, std::string> headers;
  std::string correlation_id;
  bool persistent = true;
  std::string content_type = "application/json";
};

class Client {
 public:
  // Connects, logs in and opens the consuming channel (1) and the publishing
  // channel (2, in confirm mode). No heartbeats: a peer that dies closes its TCP
  // connection, which the broker sees at once. The client tells the broker it
  // understands connection.blocked (a Blocked frame from next()).
  static Result<std::unique_ptr<Client>> connect(const Endpoint& endpoint,
                                                 std::chrono::seconds timeout);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Declares (or checks) every exchange and queue of `names` with their bindings.
  Result<void> declare(const Names& names);
  // A server-named, exclusive, auto-delete queue bound to `exchange` with each of
  // the keys; returns its name.
  Result<std::string> declare_private_queue(
    const std::map<std::string, std::string>& exchange_to_key);
  // A durable queue of this name bound to `exchange` with each key, that the
  // broker deletes after `unused_for` without a consumer (a follower's queue
  // that outlives a broker restart). Declaring it again is harmless.
  // `queue_version` (x-queue-version, RabbitMQ 3.10+; 0: not given, the
  // broker's default) picks the classic queue's storage format.
  Result<void> declare_follow_queue(const std::string& name,
                                    const std::map<std::string, std::string>& exchange_to_key,
                                    std::chrono::milliseconds unused_for, int queue_version = 0);
  Result<void> delete_queue(const std::string& name);
  // Starts consuming `queue` on channel 1, at most `prefetch` unacknowledged
  // (0: as set_channel_prefetch says, or no limit).
  Result<void> consume(const std::string& queue, uint16_t prefetch, bool no_ack = false);
  // At most `count` (> 0) deliveries unacknowledged on channel 1 in all, its
  // consumers' present and future: RabbitMQ's basic.qos with global set, which,
  // unlike a consumer's own prefetch, it applies at once when it changes.
  Result<void> set_channel_prefetch(uint16_t count);

  // Publishes on channel 2; returns its confirm sequence number (from 1).
  Result<uint64_t> publish(const Message& message);
  // Publishes and waits for the broker's confirm of that message. Only for a
  // client that is not consuming (deliveries are not expected meanwhile).
  Result<void> publish_confirmed(const Message& message, std::chrono::milliseconds timeout);

  // The next delivery or confirm, waiting at most `wait`; a Timeout as soon as
  // `wake_fd` (if given) is readable, so a caller with work of its own to wait
  // for (events to publish) sleeps on both instead of looking on a timer.
  Result<Frame> next(std::chrono::milliseconds wait, int wake_fd = -1);

  Result<void> ack(uint64_t tag);
  Result<void> reject(uint64_t tag, bool requeue);

  // Queue depth and consumers (a passive declare).
  Result<std::pair<uint32_t, uint32_t>> queue_counts(const std::string& queue);

 private:
  struct State;
  explicit Client(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
  uint64_t next_publish_seq_ = 1;
};

}  // namespace solstice::amqp
