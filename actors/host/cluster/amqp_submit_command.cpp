// `solstice-runner submit --amqp URL job.json`: publishes the job to the jobs
// queue (persistent, confirmed by the broker), then follows its events and its
// result on the bus and shows them like `run` does; `--detach` only publishes.
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>
#include <google/protobuf/util/json_util.h>

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
#include "actors/sinks/terminal_printer.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

Result<v1::JobResult> result_from_json(const std::string& text) {
  v1::JobResult result;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage(text, &result, options).ok())
    return fail("a result on the bus is not JobResult JSON");
  return result;
}

// Feeds the job's events and result from `queue` to the printer until the
// printer is done (nullopt) or the wait ends otherwise (the exit code).
std::optional<int> follow_job(amqp::Client& client, const amqp::Names& names,
                              caf::scoped_actor& self, const event_sink_actor& printer,
                              BlockedSignals& signals) {
  uint64_t next_sequence = 0;
  bool told_redelivered = false;
  for (;;) {
    auto frame = client.next(200ms);
    if (!frame) {
      say("solstice-runner: %s\n", frame.error().message + "; the job's result is unknown here "
                                   "(it is still published to the results exchange)");
      return exit_infrastructure_error;
    }
    if (auto* delivery = std::get_if<amqp::Delivery>(&*frame)) {
      if (delivery->headers.count("x-solstice-redelivered") && !told_redelivered) {
        told_redelivered = true;
        say("solstice-runner: %s\n", "note: the job was delivered again (the node that had it "
                                     "was lost); it runs again from the start");
      }
      v1::JobEvent event;
      if (delivery->exchange == names.results_exchange) {
        auto result = result_from_json(delivery->body);
        if (!result) {
          say("solstice-runner: %s\n", result.error().message);
          continue;
        }
        event.set_job_id(result->job_id());
        event.set_sequence(next_sequence);
        *event.mutable_result() = std::move(*result);
      } else if (auto parsed = event_from_json_line(delivery->body)) {
        event = std::move(*parsed);
        next_sequence = event.sequence() + 1;
      } else {
        continue;
      }
      self->send(printer, event_atom::value, std::move(event));
    }
    auto printer_done = false;
    self->receive([&](caf::down_msg&) { printer_done = true; }, caf::after(0ms) >> [] {});
    if (printer_done)
      return std::nullopt;
    if (signals.next_signal(0ms)) {
      say("\nsolstice-runner: %s\n",
          "no longer following the job; it stays on the bus and runs to its end");
      return exit_cancelled;
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
  auto client = amqp::Client::connect(*endpoint, 30s);
  if (!client) {
    say("solstice-runner: %s\n", client.error().message);
    return exit_infrastructure_error;
  }
  const auto& names = options.amqp.names;
  const auto key = amqp::job_routing_key(job->id());
  // The job's own queue is bound before the job is published, so no event of
  // it can be missed.
  auto declared = (*client)->declare(names);
  auto queue = declared ? (*client)->declare_private_queue(
                            {{names.events_exchange, key}, {names.results_exchange, key}})
                        : tl::unexpected(declared.error());
  if (!queue) {
    say("solstice-runner: %s\n", queue.error().message);
    return exit_infrastructure_error;
  }
  amqp::Message message{names.jobs_exchange, names.jobs_queue, message_to_json(*job), {},
                        job->id(), true};
  if (auto published = (*client)->publish_confirmed(message, 30s); !published) {
    say("solstice-runner: %s\n", "cannot submit job " + job->id() + ": " + published.error().message);
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
  if (auto consuming = (*client)->consume(*queue, 0, true); !consuming) {
    say("solstice-runner: %s\n", consuming.error().message);
    return exit_infrastructure_error;
  }
  caf::actor_system_config cfg;
  add_runner_types(cfg);
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
  if (auto ended = follow_job(**client, names, self, printer, signals)) {
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
