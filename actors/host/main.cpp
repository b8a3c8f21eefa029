#include <csignal>

#include "actors/host/cli.hpp"
#include "actors/host/embedding.hpp"

int main(int argc, char** argv) {
  // A closed terminal pipe or SSH socket must be an error to handle, not a death
  // that leaves a VM behind.
  std::signal(SIGPIPE, SIG_IGN);
  // Jobs come and go on threads of their own; without a cap every thread's
  // malloc arena keeps pages and RSS climbs over the first jobs.
  solstice::limit_malloc_arenas();
  return solstice::run_cli(argc, argv);
}
