// `solstice-runner follow`: shows a queued or running job of a coordinator from
// now on, like `submit` shows its own, and exits with the job's exit code.
#include <cstdio>

#include <caf/scoped_actor.hpp>

#include "actors/runner_types.hpp"
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
  if (!options.json) {
    std::printf("following job %s at %s\n", options.job_id.c_str(), to->text().c_str());
    std::fflush(stdout);
  }
  // The step count is not known here: the printer shows steps as they start.
  return show_job(sys, *coordinator, options.job_id, {options.json, false, 0}, signals, false,
                  [&](caf::scoped_actor& self, const event_sink_actor& printer) {
                    Attached attached;
                    self->request(*coordinator, std::chrono::milliseconds(30s), follow_atom::value,
                                  options.job_id, printer)
                      .receive([](ok_atom) {},
                               [&](caf::error& err) {
                                 attached.invalid = err.category() == caf::atom("solstice");
                                 attached.problem = "cannot follow job " + options.job_id + ": " +
                                                    error_text(err);
                               });
                    return attached;
                  });
}

}  // namespace solstice::cluster_cli
