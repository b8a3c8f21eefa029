// `solstice-runner submit`: sends a job to a coordinator and streams its events like `run`.
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>

#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/runner_types.hpp"
#include "actors/sinks/terminal_printer.hpp"
#include "runtime/job/job_file.hpp"

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/host/runner_host.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

std::optional<int> follow_job(caf::scoped_actor& self, const event_sink_actor& printer,
                              const coordinator_actor& coordinator, const std::string& job_id,
                              BlockedSignals& signals, bool interrupt_cancels) {
  int interrupts = 0;
  for (;;) {
    auto printer_done = false;
    std::string lost;
    self->receive(
      [&](caf::down_msg& msg) {
        if (msg.source == printer.address())
          printer_done = true;
        else if (msg.source == coordinator.address())
          lost = peer_loss_text(msg.reason);
      },
      caf::after(200ms) >> [] {});
    if (printer_done)
      return std::nullopt;
    if (!lost.empty()) {
      say("solstice-runner: lost the coordinator (%s) before the job ended; its result is "
          "unknown\n",
          lost);
      return exit_infrastructure_error;
    }
    if (signals.next_signal(0ms)) {
      if (!interrupt_cancels) {
        say("\nsolstice-runner: %s\n", "no longer following the job (it goes on running)");
        return exit_cancelled;
      }
      if (++interrupts == 1) {
        say("\nsolstice-runner: %s\n",
            "cancelling the job (interrupt again to stop waiting for it)");
        self->send(coordinator, cancel_atom::value, job_id);
      } else {
        say("\nsolstice-runner: %s\n",
            "no longer waiting; the coordinator cancels the job as this submitter goes away");
        return exit_cancelled;
      }
    }
  }
}

Result<v1::JobSpec> submittable_job(const std::string& job_file) {
  auto job = load_job_file(job_file);
  if (!job)
    return job;
  if (auto packed = pack_uploads(*job); !packed)
    return fail(job_file + ": " + packed.error().message);
  if (job->id().empty())
    job->set_id(make_job_id());
  return job;
}

int submit_command(const SubmitOptions& options) {
  if (!options.amqp.url.empty())
    return amqp_submit_command(options);
  if (options.to.empty()) {
    say("solstice-runner: %s\n", "submit: give --to HOST:PORT (a coordinator) or --amqp URL");
    return exit_invalid_input;
  }
  auto to = checked_endpoint(options.to, "--to", options.net);
  if (!to) {
    say("solstice-runner: %s\n", to.error().message);
    return exit_invalid_input;
  }
  auto job = submittable_job(options.job_file);
  if (!job) {
    say("solstice-runner: %s\n", job.error().message);
    return exit_invalid_input;
  }

  BlockedSignals signals;
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  auto coordinator_handle = connect_to_coordinator(sys, *to, options.net, 30s);
  if (!coordinator_handle) {
    say("solstice-runner: %s\n", coordinator_handle.error().message);
    return exit_infrastructure_error;
  }
  if (!options.json) {
    std::printf("job %s: %s\n  submitted to %s\n", job->id().c_str(),
                job->name().empty() ? "(unnamed)" : job->name().c_str(), to->text().c_str());
    std::fflush(stdout);
  }
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
  self->monitor(*coordinator_handle);
  std::string problem;
  auto invalid = false;
  self->request(*coordinator_handle, std::chrono::milliseconds(30s), submit_atom::value, *job,
                printer)
    .receive([](const std::string&) {},
             [&](caf::error& err) {
               invalid = err.category() == caf::atom("solstice");
               problem = "the coordinator did not take the job: " + error_text(err);
             });
  auto finish = [&](int code) {
    self->send_exit(printer, caf::exit_reason::user_shutdown);
    return code;
  };
  if (!problem.empty()) {
    say("solstice-runner: %s\n", problem);
    return finish(invalid ? exit_invalid_input : exit_infrastructure_error);
  }
  if (auto ended = follow_job(self, printer, *coordinator_handle, job->id(), signals, true))
    return finish(*ended);
  std::lock_guard<std::mutex> lock{*result_mutex};
  if (!*result) {
    say("solstice-runner: job %s ended without a result\n", job->id());
    return exit_infrastructure_error;
  }
  return exit_code_for(**result);
}

}  // namespace solstice::cluster_cli
