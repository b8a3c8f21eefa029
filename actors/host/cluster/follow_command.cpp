// `solstice-runner follow`: shows a queued or running job of a coordinator from
// now on, like `submit` shows its own, and exits with the job's exit code.
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>

#include <caf/scoped_actor.hpp>
#include <caf/spawn_options.hpp>

#include "actors/runner_types.hpp"
#include "actors/sinks/terminal_printer.hpp"
#include "runtime/job/job_result.hpp"

#include "actors/host/cluster/cluster_commands.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

int follow_command(const FollowOptions& options) {
  auto to = checked_endpoint(options.coordinator, "--coordinator", options.net);
  if (!to) {
    say("solstice-runner: %s\n", to.error().message);
    return exit_invalid_input;
  }
  if (options.job_id.empty()) {
    say("solstice-runner: %s\n", "follow: give the JOB_ID to follow");
    return exit_invalid_input;
  }
  BlockedSignals signals;
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  auto coordinator = connect_to_coordinator(sys, *to, options.net, 30s);
  if (!coordinator) {
    say("solstice-runner: %s\n", coordinator.error().message);
    return exit_infrastructure_error;
  }
  auto result = std::make_shared<std::optional<v1::JobResult>>();
  auto result_mutex = std::make_shared<std::mutex>();
  // The step count is not known here: the printer shows steps as they start.
  auto printer = sys.spawn<caf::detached>(terminal_printer, options.json, false, uint32_t{0},
                                          [result, result_mutex](const v1::JobResult& r) {
                                            std::lock_guard<std::mutex> lock{*result_mutex};
                                            *result = r;
                                          });
  caf::scoped_actor self{sys};
  self->monitor(printer);
  self->monitor(*coordinator);
  std::string problem;
  auto invalid = false;
  self->request(*coordinator, std::chrono::milliseconds(30s), follow_atom::value, options.job_id,
                printer)
    .receive([](ok_atom) {},
             [&](caf::error& err) {
               invalid = err.category() == caf::atom("solstice");
               problem = "cannot follow job " + options.job_id + ": " + error_text(err);
             });
  auto finish = [&](int code) {
    self->send_exit(printer, caf::exit_reason::user_shutdown);
    return code;
  };
  if (!problem.empty()) {
    say("solstice-runner: %s\n", problem);
    return finish(invalid ? exit_invalid_input : exit_infrastructure_error);
  }
  if (!options.json) {
    std::printf("following job %s at %s\n", options.job_id.c_str(), to->text().c_str());
    std::fflush(stdout);
  }
  if (auto ended = follow_job(self, printer, *coordinator, options.job_id, signals, false))
    return finish(*ended);
  std::lock_guard<std::mutex> lock{*result_mutex};
  if (!*result) {
    say("solstice-runner: job %s ended without a result\n", options.job_id);
    return exit_infrastructure_error;
  }
  return exit_code_for(**result);
}

}  // namespace solstice::cluster_cli
