#include <csignal>

#include "runtime/host/cli.hpp"

int main(int argc, char** argv) {
  // A closed terminal pipe or SSH socket must be an error to handle, not a death
  // that leaves a VM behind.
  std::signal(SIGPIPE, SIG_IGN);
  return solstice::run_cli(argc, argv);
}
