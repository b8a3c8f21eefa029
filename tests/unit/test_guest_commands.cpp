#include <doctest/doctest.h>

#include <cstdio>
#include <string>

#include "runtime/guest_commands.hpp"

using namespace solstice;

namespace {

// Runs `script` with /bin/sh and returns its stdout.
std::string run_sh(const std::string& script) {
  std::string out;
  auto* pipe = ::popen(("/bin/sh -c " + shell_quote(script)).c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[256];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0)
    out.append(buf, n);
  ::pclose(pipe);
  return out;
}

}  // namespace

TEST_SUITE("guest_commands") {
  TEST_CASE("shell_quote survives quotes, spaces, dollars and newlines") {
    for (std::string value : {"plain", "it's", "a b  c", "$HOME `id` $(id)", "line1\nline2",
                              "'", "", "\\\"'\"\\"}) {
      CHECK(run_sh("printf %s " + shell_quote(value)) == value);
    }
  }

  TEST_CASE("env file exports env and secrets, secrets win") {
    auto file = make_env_file({{"GREETING", "hello world"}, {"TOKEN", "public"}},
                              {{"TOKEN", "s3cr'et"}});
    CHECK(run_sh(file + "printf '%s|%s' \"$GREETING\" \"$TOKEN\"") == "hello world|s3cr'et");
  }

  TEST_CASE("step scripts without #! get /bin/sh with set -e") {
    auto script = make_step_script("false\necho not reached");
    CHECK(script.rfind("#!/bin/sh\nset -e\n", 0) == 0);
    CHECK(run_sh(script).empty());
    CHECK(make_step_script("#!/bin/bash\necho hi\n") == "#!/bin/bash\necho hi\n");
  }

  TEST_CASE("step paths and command") {
    CHECK(step_script_path(0) == "/tmp/solstice/step-1");
    CHECK(step_command(2).find(". /tmp/solstice/env && exec /tmp/solstice/step-3") !=
          std::string::npos);
  }
}
