// `solstice-runner submit`: sends a job to a coordinator and streams its events like `run`.
#include <cstdio>
#include <functional>
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

namespace {

// Waits while the job runs and the printer shows its events. Returns nullopt once
// the printer is done (the job's result has been shown), or the exit code when
// the wait ends otherwise: the coordinator was lost, or an interrupt — which with
// `interrupt_cancels` first cancels the job and gives up at the second, and
// otherwise only stops following.
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

}  // namespace

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
  return show_job(sys, *coordinator_handle, job->id(),
                  {options.json, options.console, static_cast<uint32_t>(job->steps_size())},
                  signals, true, [&](caf::scoped_actor& self, const event_sink_actor& printer) {
                    Attached attached;
                    self->request(*coordinator_handle, std::chrono::milliseconds(30s),
                                  submit_atom::value, *job, printer)
                      .receive([](const std::string&) {},
                               [&](caf::error& err) {
                                 attached.invalid = err.category() == caf::atom("solstice");
                                 attached.problem =
                                   "the coordinator did not take the job: " + error_text(err);
                               });
                    return attached;
                  });
}

int show_job(caf::actor_system& sys, const coordinator_actor& coordinator,
             const std::string& job_id, const Printing& printing, BlockedSignals& signals,
             bool interrupt_cancels,
             const std::function<Attached(caf::scoped_actor&, const event_sink_actor&)>& attach) {
  auto result = std::make_shared<std::optional<v1::JobResult>>();
  auto result_mutex = std::make_shared<std::mutex>();
  auto printer = sys.spawn<caf::detached>(
    terminal_printer, printing.json, printing.console, printing.step_count,
    [result, result_mutex](const v1::JobResult& r) {
      std::lock_guard<std::mutex> lock{*result_mutex};
      *result = r;
    });
  caf::scoped_actor self{sys};
  self->monitor(printer);
  self->monitor(coordinator);
  auto attached = attach(self, printer);
  auto finish = [&](int code) {
    self->send_exit(printer, caf::exit_reason::user_shutdown);
    return code;
  };
  if (!attached.problem.empty()) {
    say("solstice-runner: %s\n", attached.problem);
    return finish(attached.invalid ? exit_invalid_input : exit_infrastructure_error);
  }
  if (auto ended = follow_job(self, printer, coordinator, job_id, signals, interrupt_cancels))
    return finish(*ended);
  std::lock_guard<std::mutex> lock{*result_mutex};
  if (!*result) {
    say("solstice-runner: job %s ended without a result\n", job_id);
    return exit_infrastructure_error;
  }
  return exit_code_for(**result);
}

}  // namespace solstice::cluster_cli
