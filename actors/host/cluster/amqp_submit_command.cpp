// `solstice-runner submit --amqp URL job.json`: publishes the job to the jobs
// queue (persistent, confirmed by the broker), then follows its events and its
// result on the bus and shows them like `run` does; `--detach` only publishes.
// The job's events come through a durable queue of its own, so a broker restart
// loses none of them: the submitter reconnects and goes on where it was.
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
#include "runtime/amqp/job_follower.hpp"
#include "actors/sinks/terminal_printer.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

// A follower's queue outlives its connection (a broker restart): the broker
// drops it only after this long without a consumer.
constexpr auto follow_queue_unused_for = std::chrono::milliseconds(30min);

std::string follow_queue_name(const std::string& job_id) { return "solstice.follow." + job_id; }

// Connects and declares the runner's names and the job's own durable queue,
// bound to its events and result (before the job is published, so nothing of
// it can be missed; again after a reconnect, which finds the queue as it was).
Result<std::unique_ptr<amqp::Client>> connect_follower(const amqp::Endpoint& endpoint,
                                                       const amqp::Names& names,
                                                       const std::string& job_id) {
  auto client = amqp::Client::connect(endpoint, 30s);
  if (!client)
    return client;
  const auto key = amqp::job_routing_key(job_id);
  if (auto declared = (*client)->declare(names); !declared)
    return tl::unexpected(declared.error());
  if (auto queue = (*client)->declare_follow_queue(
        follow_queue_name(job_id), {{names.events_exchange, key}, {names.results_exchange, key}},
        follow_queue_unused_for);
      !queue)
    return tl::unexpected(queue.error());
  return client;
}

enum class Following { printer_done, connection_lost, signalled };

// How many messages of its queue the broker gives the follower before they are
// acknowledged: with events in batches of up to 512 KiB, one every 100 ms while
// output floods (amqp_node_jobs.cpp), enough to stream, and a bound on what
// waits in this process (4 MiB).
constexpr uint16_t follow_prefetch = 8;

// Hands one message's events to the printer and waits until it has written
// them (its reply to the last one), looking at signals meanwhile. So a
// submitter whose stdout is not read stops taking messages: the job's events
// wait in its queue on the broker, not in this process. False: signalled.
bool hand_to_printer(caf::scoped_actor& self, const event_sink_actor& printer,
                     std::vector<v1::JobEvent> events, BlockedSignals& signals) {
  if (events.empty())
    return true;
  for (size_t i = 0; i + 1 < events.size(); ++i)
    self->send(printer, event_atom::value, std::move(events[i]));
  auto ask = std::move(events.back());
  for (;;) {
    bool written = false;
    self->request(printer, std::chrono::milliseconds(500), event_atom::value, ask)
      .receive([&] { written = true; },
               // A printer that is gone (it quit after the result) holds nothing.
               [&](caf::error& err) { written = err != caf::sec::request_timeout; });
    if (written)
      return true;
    if (signals.next_signal(0ms))
      return false;
    // A repeat (no payload): answered once everything before it is written.
    ask = v1::JobEvent{};
  }
}

// Feeds the job's events and result from its queue to the printer (one run,
// each event once: amqp::JobFollower) until the printer is done or the
// connection fails. Each message is acknowledged once the printer has written
// its events, so a broker restart keeps what the follower has not shown yet.
Following follow_job(amqp::Client& client, amqp::JobFollower& follower, caf::scoped_actor& self,
                     const event_sink_actor& printer, BlockedSignals& signals,
                     std::string& why) {
  for (;;) {
    auto frame = client.next(200ms);
    if (!frame) {
      why = frame.error().message;
      return Following::connection_lost;
    }
    if (auto* delivery = std::get_if<amqp::Delivery>(&*frame)) {
      auto verdict = follower.accept(*delivery);
      if (!verdict.note.empty())
        say("solstice-runner: %s\n", verdict.note);
      if (!hand_to_printer(self, printer, std::move(verdict.events), signals))
        return Following::signalled;
      (void)client.ack(delivery->tag);
    }
    auto printer_done = false;
    self->receive([&](caf::down_msg&) { printer_done = true; }, caf::after(0ms) >> [] {});
    if (printer_done)
      return Following::printer_done;
    if (signals.next_signal(0ms))
      return Following::signalled;
  }
}

// Follows until the printer is done (nullopt) or the exit code says otherwise;
// a lost connection is made again with a growing back-off.
std::optional<int> follow_until_done(std::unique_ptr<amqp::Client> client,
                                     const amqp::Endpoint& endpoint, const amqp::Names& names,
                                     const std::string& job_id, caf::scoped_actor& self,
                                     const event_sink_actor& printer, BlockedSignals& signals) {
  amqp::JobFollower follower{names};
  auto backoff = std::chrono::milliseconds(500ms);
  for (;;) {
    std::string why;
    auto consuming = client ? client->consume(follow_queue_name(job_id), follow_prefetch, false)
                            : Result<void>{};
    auto how = Following::connection_lost;
    if (client && consuming) {
      backoff = 500ms;
      how = follow_job(*client, follower, self, printer, signals, why);
    } else if (client) {
      why = consuming.error().message;
    }
    if (how == Following::printer_done) {
      (void)client->delete_queue(follow_queue_name(job_id));
      return std::nullopt;
    }
    if (how == Following::signalled) {
      say("\nsolstice-runner: %s\n",
          "no longer following the job; it stays on the bus and runs to its end");
      return exit_cancelled;
    }
    client.reset();
    if (!why.empty())
      say("solstice-runner: %s\n", "lost the AMQP broker (" + why + "); reconnecting in " +
                                     std::to_string(backoff.count()) + " ms");
    for (auto until = std::chrono::steady_clock::now() + backoff;
         std::chrono::steady_clock::now() < until;)
      if (signals.next_signal(100ms))
        return exit_cancelled;
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30s));
    auto again = connect_follower(endpoint, names, job_id);
    if (again) {
      client = std::move(*again);
      say("solstice-runner: %s\n", "reconnected to the AMQP broker; following job " + job_id);
    } else {
      say("solstice-runner: %s\n", again.error().message);
    }
  }
}

}  // namespace

int amqp_submit_command(const SubmitOptions& options) {
  auto endpoint = amqp_endpoint(options.amqp);
  if (!endpoint) {
    say("solstice-runner: %s\n", endpoint.error().message);
    return exit_invalid_input;
  }
  auto job = submittable_job(options.job_file);
  if (!job) {
    say("solstice-runner: %s\n", job.error().message);
    return exit_invalid_input;
  }
  BlockedSignals signals;
  const auto& names = options.amqp.names;
  // A detached job has no follower: nothing binds a queue to its events.
  auto client = options.detach ? amqp::Client::connect(*endpoint, 30s)
                               : connect_follower(*endpoint, names, job->id());
  if (client && options.detach)
    if (auto declared = (*client)->declare(names); !declared)
      client = tl::unexpected(declared.error());
  if (!client) {
    say("solstice-runner: %s\n", client.error().message);
    return exit_infrastructure_error;
  }
  amqp::Message message{names.jobs_exchange, names.jobs_queue, message_to_json(*job), {},
                        job->id(), true};
  if (auto published = (*client)->publish_confirmed(message, 30s); !published) {
    say("solstice-runner: %s\n", "cannot submit job " + job->id() + ": " + published.error().message);
    if (!options.detach)
      (void)(*client)->delete_queue(follow_queue_name(job->id()));
    return exit_infrastructure_error;
  }
  if (options.detach) {
    std::printf("%s\n", job->id().c_str());
    return 0;
  }
  if (!options.json) {
    std::printf("job %s: %s\n  published to queue %s\n", job->id().c_str(),
                job->name().empty() ? "(unnamed)" : job->name().c_str(), names.jobs_queue.c_str());
    std::fflush(stdout);
  }
  caf::actor_system_config cfg;
  add_runner_types(cfg);
  use_sleeping_scheduler(cfg);
  caf::actor_system sys{cfg};
  auto result = std::make_shared<std::optional<v1::JobResult>>();
  auto result_mutex = std::make_shared<std::mutex>();
  auto printer = sys.spawn<caf::detached>(
    terminal_printer, options.json, options.console, static_cast<uint32_t>(job->steps_size()),
    [result, result_mutex](const v1::JobResult& r) {
      std::lock_guard<std::mutex> lock{*result_mutex};
      *result = r;
    });
  caf::scoped_actor self{sys};
  self->monitor(printer);
  if (auto ended = follow_until_done(std::move(*client), *endpoint, names, job->id(), self,
                                     printer, signals)) {
    self->send_exit(printer, caf::exit_reason::user_shutdown);
    return *ended;
  }
  std::lock_guard<std::mutex> lock{*result_mutex};
  if (!*result) {
    say("solstice-runner: job %s ended without a result\n", job->id());
    return exit_infrastructure_error;
  }
  return exit_code_for(**result);
}

}  // namespace solstice::cluster_cli
