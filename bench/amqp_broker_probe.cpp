// What does a stream of job events cost the broker, without a VM? One client
// plays the node and the follower at once through the runner's own amqp::Client:
// it declares a follower's queue (as `submit --amqp` does, optionally with
// x-queue-version), consumes and acknowledges it, and publishes MESSAGES
// persistent, confirmed messages of BYTES each to the events exchange, one every
// INTERVAL_MS (a step's output in batches). bench/amqp_broker_cost.py runs it
// against its own broker and reads the broker's CPU around each run.
//
//   amqp_broker_probe URL PASSWORD_FILE stream QUEUE_VERSION MESSAGES BYTES INTERVAL_MS
//   amqp_broker_probe URL PASSWORD_FILE redeclare VERSION_FIRST VERSION_THEN
//
// `redeclare` declares one follower's queue twice, on two connections, with the
// two versions (0: no argument), and says what the broker answered the second time.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "runtime/amqp/amqp_client.hpp"

namespace {

using namespace solstice;
using namespace std::chrono_literals;

std::unique_ptr<amqp::Client> connect(const std::string& url, const std::string& password,
                                      const amqp::Names& names) {
  auto client = amqp::Client::connect(amqp::Endpoint{url, password, "", "", ""}, 30s);
  if (!client) {
    std::fprintf(stderr, "%s\n", client.error().message.c_str());
    std::exit(1);
  }
  if (auto declared = (*client)->declare(names); !declared) {
    std::fprintf(stderr, "%s\n", declared.error().message.c_str());
    std::exit(1);
  }
  return std::move(*client);
}

int stream(amqp::Client& client, const amqp::Names& names, int version, long messages,
           size_t bytes, long interval_ms) {
  const auto job = "probe-" + std::to_string(::getpid());
  const auto queue = "solstice.follow." + job;
  const auto key = amqp::job_routing_key(job);
  if (auto declared = client.declare_follow_queue(queue, {{names.events_exchange, key}}, 30min,
                                                  version);
      !declared) {
    std::fprintf(stderr, "%s\n", declared.error().message.c_str());
    return 1;
  }
  if (auto consuming = client.consume(queue, 16); !consuming) {
    std::fprintf(stderr, "%s\n", consuming.error().message.c_str());
    return 1;
  }
  amqp::Message message{names.events_exchange, key, std::string(bytes, 'y'), {}, job, true};
  message.content_type = "application/x-protobuf";
  const auto started = std::chrono::steady_clock::now();
  auto next_publish = started;
  long published = 0, consumed = 0;
  uint64_t confirmed = 0;
  while (consumed < messages || confirmed < static_cast<uint64_t>(messages)) {
    const auto now = std::chrono::steady_clock::now();
    if (published < messages && now >= next_publish) {
      if (auto seq = client.publish(message); !seq) {
        std::fprintf(stderr, "%s\n", seq.error().message.c_str());
        return 1;
      }
      ++published;
      next_publish += std::chrono::milliseconds(interval_ms);
      continue;
    }
    auto wait = published < messages ? std::chrono::duration_cast<std::chrono::milliseconds>(
                                         next_publish - now) + 1ms
                                     : 200ms;
    auto frame = client.next(wait);
    if (!frame) {
      std::fprintf(stderr, "%s\n", frame.error().message.c_str());
      return 1;
    }
    if (auto* delivery = std::get_if<amqp::Delivery>(&*frame)) {
      ++consumed;
      (void)client.ack(delivery->tag);
    } else if (auto* confirm = std::get_if<amqp::Confirm>(&*frame)) {
      confirmed = std::max(confirmed, confirm->tag);
    }
  }
  const auto elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started);
  (void)client.delete_queue(queue);
  std::printf("%.3f\n", elapsed.count());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: see the comment at the top of amqp_broker_probe.cpp\n");
    return 2;
  }
  const std::string url = argv[1], mode = argv[3];
  auto password = amqp::password_from(argv[2]);
  if (!password) {
    std::fprintf(stderr, "%s\n", password.error().message.c_str());
    return 2;
  }
  amqp::Names names;
  if (mode == "stream" && argc == 8)
    return stream(*connect(url, *password, names), names, std::atoi(argv[4]), std::atol(argv[5]),
                  static_cast<size_t>(std::atol(argv[6])), std::atol(argv[7]));
  if (mode == "redeclare" && argc == 6) {
    const auto queue = "solstice.follow.probe-redeclare-" + std::to_string(::getpid());
    const std::map<std::string, std::string> bindings{{names.events_exchange, "job.x"}};
    auto first = connect(url, *password, names)->declare_follow_queue(queue, bindings, 30min,
                                                                      std::atoi(argv[4]));
    auto client = connect(url, *password, names);
    auto then = client->declare_follow_queue(queue, bindings, 30min, std::atoi(argv[5]));
    std::printf("first: %s\nthen: %s\n", first ? "ok" : first.error().message.c_str(),
                then ? "ok" : then.error().message.c_str());
    if (then)
      (void)client->delete_queue(queue);
    return 0;
  }
  std::fprintf(stderr, "usage: see the comment at the top of amqp_broker_probe.cpp\n");
  return 2;
}
