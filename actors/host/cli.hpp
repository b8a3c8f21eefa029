#pragma once
// The `solstice-runner` command line.
namespace solstice {

// Parses argv and runs the chosen command; returns the process exit code.
int run_cli(int argc, char** argv);

}  // namespace solstice
