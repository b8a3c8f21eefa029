// The README's first command, as a user runs it: the first ```sh block of README.md,
// with bash, from the source directory, with the default configuration (accel
// auto: on a host whose /dev/kvm cannot run guests, that is the KVM fallback). It
// must exit 0.
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

// deploy/setup.sh may have to rebuild what changed on two cores, then the job boots.
constexpr auto command_allowance = 25min;

std::string first_sh_block(const fs::path& readme) {
  std::ifstream file(readme);
  std::string line, block;
  bool inside = false;
  while (std::getline(file, line)) {
    if (!inside && line == "```sh") {
      inside = true;
    } else if (inside && line.rfind("```", 0) == 0) {
      return block;
    } else if (inside) {
      block += line + "\n";
    }
  }
  return {};
}

void replace_all(std::string& text, const std::string& from, const std::string& to) {
  for (auto at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
}

// "record: PATH" lines of the runner's output: the job records the run made.
std::vector<fs::path> records_named(const std::string& output) {
  std::vector<fs::path> records;
  std::istringstream lines(output);
  std::string line;
  const std::string marker = "record: ";
  while (std::getline(lines, line))
    if (auto at = line.find(marker); at != std::string::npos)
      records.emplace_back(line.substr(at + marker.size()));
  return records;
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("README: the first command (deploy/setup.sh, then the sample job) exits 0") {
  if (::geteuid() != 0) {
    MESSAGE("the README's command is for root (it installs packages): not run");
    return;
  }
  const fs::path source = SOLSTICE_SOURCE_DIR;
  const fs::path binary_dir = SOLSTICE_BINARY_DIR;
  std::string command = first_sh_block(source / "README.md");
  REQUIRE_MESSAGE(!command.empty(), "README.md has no ```sh block");

  // deploy/setup.sh configures and builds source/build, the README's build tree.
  // When this suite is that build (the README's own way: setup.sh, then ctest
  // --test-dir build) the command runs literally: setup.sh then only finds nothing
  // to redo, and relinking a running test binary would not disturb it. From another
  // build tree it would build and test a tree other than this one, and race with
  // whoever builds there; so there the command's own steps run on this build
  // instead: setup.sh's dependency check, then this build's runner.
  std::error_code ec;
  const bool readme_build = fs::equivalent(source / "build", binary_dir, ec);
  if (!readme_build) {
    replace_all(command, "deploy/setup.sh", "deploy/install-deps.sh");
    replace_all(command, "build/solstice-runner", (binary_dir / "solstice-runner").string());
  }
  MESSAGE(std::string(readme_build ? "the README's command, literally: " : "on this build tree: ")
          << command);

  // The runner's default state directory keeps each job's record; the ones this
  // run made are removed afterwards.
  auto runner =
    Runner::start_program({"bash", "-c", "cd -- \"$1\" && eval \"$2\"", "readme",
                           source.string(), command});
  auto status = runner.wait(command_allowance);
  if (!status) {
    // Its own process group (the runner's QEMU dies with the runner).
    ::kill(-runner.pid(), SIGKILL);
    runner.wait(30s);
  }
  for (const auto& record : records_named(runner.out()))
    if (record.parent_path().filename() == "jobs" && fs::exists(record / "events.jsonl"))
      fs::remove_all(record, ec);

  // Whether this host's KVM made the runner fall back (shown, not required).
  std::istringstream lines(runner.out());
  for (std::string line; std::getline(lines, line);)
    if (line.find("falling back") != std::string::npos)
      MESSAGE(line);
  INFO(runner.output());
  REQUIRE_MESSAGE(status, "still running after " << command_allowance.count() << " min");
  CHECK(status->code == 0);
  CHECK_FALSE(status->signaled);
}

}  // TEST_SUITE
