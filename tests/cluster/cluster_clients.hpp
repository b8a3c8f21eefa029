#pragma once
// In-process CAF peers of a coordinator for the cluster tests: the actor system
// of a plain or TLS client (with a certificate of the test's cluster CA), actors
// ended also when a REQUIRE fails, and a sink that collects a job's events.
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/send.hpp>

#include "actors/actors.hpp"
#include "actors/host/cluster_cli.hpp"
#include "actors/runner_types.hpp"

namespace solstice::cluster_testing {

// A client's actor system: the runner's types and protocol version; with `who`,
// TLS with dir/<who>.pem, dir/<who>.key and dir/cluster-ca.pem.
struct ClientConfig : caf::actor_system_config {
  ClientConfig() {
    add_runner_types(*this);
    load<caf::io::middleman>();
    set("middleman.app-identifiers", std::vector<std::string>{cluster_protocol});
  }
  ClientConfig(const std::filesystem::path& dir, const std::string& who) : ClientConfig() {
    load<caf::openssl::manager>();
    openssl_certificate = (dir / (who + ".pem")).string();
    openssl_key = (dir / (who + ".key")).string();
    openssl_cafile = (dir / "cluster-ca.pem").string();
    set("middleman.heartbeat-interval", caf::timespan{std::chrono::seconds(1)});
  }
};

// Ends the actors it holds when it goes out of scope, also when a REQUIRE
// fails: an actor system waits for its actors before it can be destroyed.
struct EndActors {
  std::vector<caf::actor> actors;
  template <class Handle>
  Handle operator()(Handle handle) {
    actors.push_back(caf::actor_cast<caf::actor>(handle));
    return handle;
  }
  ~EndActors() {
    for (auto& actor : actors)
      caf::anon_send_exit(actor, caf::exit_reason::kill);
  }
};

// What a sink received.
struct Received {
  std::mutex mutex;
  std::vector<v1::JobEvent> events;
  bool has(const std::function<bool(const v1::JobEvent&)>& match) {
    std::lock_guard<std::mutex> lock{mutex};
    for (const auto& event : events)
      if (match(event))
        return true;
    return false;
  }
  bool wait_for(const std::function<bool(const v1::JobEvent&)>& match,
                std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!has(match) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return has(match);
  }
  bool has_result() { return has([](const v1::JobEvent& e) { return e.has_result(); }); }
  std::optional<v1::JobResult> result() {
    std::lock_guard<std::mutex> lock{mutex};
    for (const auto& event : events)
      if (event.has_result())
        return event.result();
    return std::nullopt;
  }
};

// Collects every event it gets into `received` (acknowledging each at once).
inline event_sink_actor::behavior_type collector(event_sink_actor::pointer,
                                                 std::shared_ptr<Received> received) {
  return {
    [received](event_atom, v1::JobEvent& event) {
      std::lock_guard<std::mutex> lock{received->mutex};
      received->events.push_back(std::move(event));
    },
  };
}

}  // namespace solstice::cluster_testing
