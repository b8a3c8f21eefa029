#include "runtime/host/cli.hpp"

int main(int argc, char** argv) {
  return solstice::run_cli(argc, argv);
}
