// A host CAF application that embeds Solstice Runner: it has its own actors and
// its own configuration, registers the runner's types, cleans what a previous run
// that died left in its state directory, starts one job on the built-in test guest
// and prints the job's events as its own actor receives them.
//
//   embedded_host TEST_GUEST_DIR STATE_DIR
#include <cstdio>
#include <string>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include "actors/host/embedding.hpp"
#include "runtime/job/runner_config.hpp"

namespace {

using greet_atom = caf::atom_constant<caf::atom("greet")>;

// The host's own business: an actor that has nothing to do with the runner.
caf::behavior greeter(caf::event_based_actor*) {
  return {[](greet_atom, const std::string& who) { return "hello, " + who; }};
}

struct printer_state {
  int exit_code = -1;
};

// The host's event sink: prints what the job does; quits after the result.
solstice::event_sink_actor::behavior_type
job_printer(solstice::event_sink_actor::stateful_pointer<printer_state> self, int* exit_code) {
  return {
    [=](solstice::event_atom, const solstice::v1::JobEvent& event) {
      if (event.has_state())
        std::printf("host saw state %s\n",
                    solstice::v1::JobState_Name(event.state().state()).c_str());
      else if (event.has_output())
        std::printf("host saw output: %s", event.output().data().c_str());
      else if (event.has_result()) {
        std::printf("host saw result %s: %s\n",
                    solstice::v1::JobStatus_Name(event.result().status()).c_str(),
                    event.result().summary().c_str());
        *exit_code = event.result().exit_code();
        self->quit();
      }
      std::fflush(stdout);
    },
  };
}

struct host_config : caf::actor_system_config {
  host_config() {
    solstice::add_runner_types(*this);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s TEST_GUEST_DIR STATE_DIR\n", argv[0]);
    return 2;
  }
  solstice::limit_malloc_arenas();  // a host that may run many jobs (embedding.hpp)
  host_config cfg;
  caf::actor_system sys{cfg};

  // The host's own actors keep working next to the runner's.
  auto hello = sys.spawn(greeter);
  {
    caf::scoped_actor self{sys};
    self->request(hello, std::chrono::seconds(5), greet_atom::value, std::string{"runner"})
      .receive([](const std::string& text) { std::printf("host's own actor says: %s\n", text.c_str()); },
               [](caf::error&) { std::printf("host's own actor did not answer\n"); });
  }

  auto config = solstice::default_runner_config();
  config.set_state_dir(argv[2]);
  auto guest = solstice::load_test_guest_image(argv[1]);
  if (!guest) {
    std::fprintf(stderr, "embedded_host: %s\n", guest.error().message.c_str());
    return 2;
  }
  *config.add_images() = *guest;

  // Once, at the host's start: clean what a previous run that died left behind.
  auto recovered = solstice::recover_abandoned_jobs_at_start(config);
  if (!recovered)
    std::fprintf(stderr, "embedded_host: recovery skipped: %s\n", recovered.error().message.c_str());
  else
    for (const auto& job : *recovered)
      std::printf("host recovered: %s\n", job.description.c_str());

  solstice::v1::JobSpec job;
  job.set_name("embedded job");
  job.set_runs_on(solstice::test_guest_label);
  auto* step = job.add_steps();
  step->set_name("greet");
  step->set_script("echo \"hello from $(hostname)\"");

  int exit_code = -1;
  auto printer = sys.spawn(job_printer, &exit_code);
  auto started = solstice::start_job(sys, job, config, printer);
  if (!started) {
    std::fprintf(stderr, "embedded_host: %s\n", started.error().message.c_str());
    caf::anon_send_exit(printer, caf::exit_reason::user_shutdown);
    return 2;
  }
  std::printf("host started job %s (record in %s)\n", started->job_id.c_str(),
              started->job_dir.c_str());
  caf::anon_send_exit(hello, caf::exit_reason::user_shutdown);
  // Every actor ends with the job: the printer after the result, the runner's
  // actors after cleaning up.
  sys.await_all_actors_done();
  return exit_code;
}
