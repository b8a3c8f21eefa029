#include <doctest/doctest.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/job/guest_commands.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
namespace fs = std::filesystem;

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

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

unsigned mode_of(const fs::path& path) {
  struct stat info {};
  REQUIRE(::stat(path.c_str(), &info) == 0);
  return info.st_mode & 07777;
}

// Not a prefix of the guest's job directory, which relocated() looks for.
const std::string scratch_prefix = "guest-commands-test-";

// `command` as the guest would run it, with the guest's job directory moved to
// `job_dir` so the test touches only its own temporary directory.
std::string relocated(std::string command, const fs::path& job_dir) {
  const std::string from = guest_job_dir;
  for (auto at = command.find(from); at != std::string::npos;
       at = command.find(from, at + job_dir.string().size()))
    command.replace(at, from.size(), job_dir.string());
  return command;
}

struct ShellRun {
  int wait_status = -1;
  std::string out, err;
};

// Runs `command` with /bin/sh -c, `input` as its stdin and HOME=`home`, as sshd
// runs an exec request.
ShellRun run_with_input(const std::string& command, const std::string& input,
                        const fs::path& home, const test::TempDir& scratch) {
  auto in = scratch.write("stdin", input);
  auto out = scratch.path / "stdout";
  auto err = scratch.path / "stderr";
  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  posix_spawn_file_actions_addopen(&files, 0, in.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&files, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&files, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::string home_var = "HOME=" + home.string();
  std::string path_var = "PATH=/usr/bin:/bin";
  std::vector<char*> argv{const_cast<char*>("/bin/sh"), const_cast<char*>("-c"),
                          const_cast<char*>(command.c_str()), nullptr};
  std::vector<char*> envp{home_var.data(), path_var.data(), nullptr};
  pid_t pid = -1;
  int spawned = ::posix_spawn(&pid, "/bin/sh", &files, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&files);
  REQUIRE(spawned == 0);
  ShellRun run;
  REQUIRE(::waitpid(pid, &run.wait_status, 0) == pid);
  run.out = read_file(out);
  run.err = read_file(err);
  return run;
}

int exit_code(const ShellRun& run) {
  return WIFEXITED(run.wait_status) ? WEXITSTATUS(run.wait_status) : -1;
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

  TEST_CASE("step paths") {
    CHECK(step_script_path(0) == "/tmp/solstice/step-1");
    CHECK(env_file_path() == "/tmp/solstice/env");
  }

  TEST_CASE("set-up command makes the directories and writes the env file from stdin") {
    test::TempDir scratch{scratch_prefix};
    const auto job_dir = scratch.path / "job";
    const auto upload_dir = scratch.path / "up loads" / "it's";
    const auto env_file = job_dir / "env";
    // Secrets and odd bytes go through stdin untouched, never into the command.
    auto env = make_env_file({{"GREETING", "hello world"}}, {{"TOKEN", "s3cr'et $(id)"}});
    auto command = setup_command({upload_dir.string(), ""});
    CHECK(command.find("s3cr") == std::string::npos);

    auto run = run_with_input(relocated(command, job_dir), env, scratch.path, scratch);
    REQUIRE_MESSAGE(exit_code(run) == 0, run.err);
    CHECK(read_file(env_file) == env);
    CHECK(mode_of(env_file) == 0600);
    CHECK(mode_of(job_dir) == 0700);
    CHECK(fs::is_directory(upload_dir));
    CHECK(run_sh(". " + shell_quote(env_file.string()) + "; printf '%s|%s' \"$GREETING\" \"$TOKEN\"") ==
          "hello world|s3cr'et $(id)");

    // Byte for byte, whatever the bytes (NUL, no final newline), and again on a
    // second run (the set-up is repeated on a new connection after a reset).
    std::string binary("a\0b\xff\ncd", 8);
    run = run_with_input(relocated(command, job_dir), binary, scratch.path, scratch);
    REQUIRE_MESSAGE(exit_code(run) == 0, run.err);
    CHECK(read_file(env_file) == binary);
  }

  TEST_CASE("set-up command waits for cloud-init where it runs this boot, and says when it failed") {
    test::TempDir scratch{scratch_prefix};
    const auto job_dir = scratch.path / "job";
    const auto bin = scratch.path / "bin";
    const auto enabled = scratch.path / "run-cloud-init-enabled";
    const auto calls = scratch.path / "calls";
    fs::create_directories(bin);
    // A stand-in cloud-init: records its arguments, whether the env file existed
    // yet and what it got on stdin; exits with the code in the file "rc".
    scratch.write("bin/cloud-init",
                  "#!/bin/sh\n"
                  "echo \"args=$* env_before=$(test -e " + shell_quote((job_dir / "env").string()) +
                    " && echo yes || echo no) stdin=$(cat)\" >> " + shell_quote(calls.string()) + "\n"
                  "exit $(cat " + shell_quote((scratch.path / "rc").string()) + ")\n");
    fs::permissions(bin / "cloud-init", fs::perms::owner_all);
    // The guest's /run/cloud-init/enabled, moved into the scratch directory.
    auto command = relocated(setup_command({}), job_dir);
    const std::string marker = "/run/cloud-init/enabled";
    REQUIRE(command.find(marker) != std::string::npos);
    command.replace(command.find(marker), marker.size(), enabled.string());
    command = "PATH=" + shell_quote(bin.string()) + ":$PATH; " + command;
    const std::string env = "export A=1\n";

    // cloud-init installed but not enabled this boot (a host, a disabled image): no wait.
    scratch.write("rc", "0");
    auto run = run_with_input(command, env, scratch.path, scratch);
    REQUIRE_MESSAGE(exit_code(run) == 0, run.err);
    CHECK_FALSE(fs::exists(calls));
    CHECK(read_file(job_dir / "env") == env);

    // Enabled: waited for before anything else, with stdin left for the env file.
    fs::remove_all(job_dir);
    scratch.write("run-cloud-init-enabled", "");
    run = run_with_input(command, env, scratch.path, scratch);
    REQUIRE_MESSAGE(exit_code(run) == 0, run.err);
    CHECK(read_file(calls) == "args=status --wait env_before=no stdin=\n");
    CHECK(read_file(job_dir / "env") == env);

    // cloud-init ended with errors: the set-up is still done, and its exit code says so.
    fs::remove_all(job_dir);
    scratch.write("rc", "1");
    run = run_with_input(command, env, scratch.path, scratch);
    CHECK(exit_code(run) == setup_cloud_init_failed_exit);
    CHECK(read_file(job_dir / "env") == env);
    CHECK(mode_of(job_dir / "env") == 0600);
  }

  TEST_CASE("a template's quiet command waits for cloud-init and says when it ended with errors") {
    test::TempDir scratch{scratch_prefix};
    const auto bin = scratch.path / "bin";
    const auto calls = scratch.path / "calls";
    fs::create_directories(bin);
    scratch.write("bin/cloud-init", "#!/bin/sh\necho \"$*\" >> " + shell_quote(calls.string()) +
                                      "\nexit $(cat " + shell_quote((scratch.path / "rc").string()) +
                                      ")\n");
    fs::permissions(bin / "cloud-init", fs::perms::owner_all);
    const auto with_cloud_init = "PATH=" + shell_quote(bin.string()) + ":$PATH; " + template_quiet_command();
    const std::string word = template_cloud_init_errors_word;

    scratch.write("rc", "0");
    auto run = run_with_input(with_cloud_init, "", scratch.path, scratch);
    CHECK(exit_code(run) == 0);
    CHECK(run.out.find(word) == std::string::npos);
    CHECK(read_file(calls) == "status --wait\n");

    scratch.write("rc", "1");
    run = run_with_input(with_cloud_init, "", scratch.path, scratch);
    CHECK(exit_code(run) == 0);
    CHECK(run.out.find(word) != std::string::npos);

    // No cloud-init at all (PATH without it): nothing to wait for, no errors.
    run = run_with_input("PATH=/nonexistent; " + template_quiet_command(), "", scratch.path, scratch);
    CHECK(run.out.find(word) == std::string::npos);
  }

  TEST_CASE("set-up command fails when a directory cannot be made") {
    test::TempDir scratch{scratch_prefix};
    scratch.write("a-file", "x");
    auto command = setup_command({(scratch.path / "a-file" / "below").string()});
    auto run = run_with_input(relocated(command, scratch.path / "job"), "export A=1\n",
                              scratch.path, scratch);
    CHECK(exit_code(run) != 0);
    CHECK_FALSE(fs::exists(scratch.path / "job" / "env"));
  }

  TEST_CASE("step command writes the script from stdin and runs it in $HOME, env sourced, stdin empty") {
    test::TempDir scratch{scratch_prefix};
    const auto job_dir = scratch.path / "job";
    const auto home = scratch.path / "home";
    fs::create_directories(home);
    auto setup = run_with_input(relocated(setup_command({}), job_dir),
                                make_env_file({{"GREETING", "hello world"}}, {}), home, scratch);
    REQUIRE_MESSAGE(exit_code(setup) == 0, setup.err);

    // The step's stdin must be /dev/null, not what is left of the command's stdin.
    auto script = make_step_script(
      "pwd\n"
      "echo \"$GREETING\"\n"
      "readlink /proc/$$/fd/0\n"
      "echo to-err >&2\n"
      "exit 7");
    auto command = step_command(1);
    CHECK(command.find("GREETING") == std::string::npos);
    auto run = run_with_input(relocated(command, job_dir), script, home, scratch);
    CHECK(exit_code(run) == 7);
    CHECK(run.out == fs::canonical(home).string() + "\nhello world\n/dev/null\n");
    CHECK(run.err == "to-err\n");
    const auto written = job_dir / "step-2";
    CHECK(read_file(written) == script);
    CHECK(mode_of(written) == 0755);

    SUBCASE("a script written already (by a clone's identity agent) runs as it would") {
      auto again = run_with_input(relocated(step_command_written(1), job_dir), "", home, scratch);
      CHECK(exit_code(again) == 7);
      CHECK(again.out == run.out);
      CHECK(again.err == "to-err\n");
    }

    SUBCASE("a #! script runs with its own interpreter") {
      auto own = run_with_input(relocated(command, job_dir),
                                "#!/bin/sh\nfalse\necho set-e-is-not-added\n", home, scratch);
      CHECK(exit_code(own) == 0);
      CHECK(own.out == "set-e-is-not-added\n");
    }
    SUBCASE("a signal that kills the script is the command's own end (exec keeps the PID)") {
      auto killed = run_with_input(relocated(command, job_dir), make_step_script("kill -TERM $$"),
                                   home, scratch);
      REQUIRE(WIFSIGNALED(killed.wait_status));
      CHECK(WTERMSIG(killed.wait_status) == SIGTERM);
    }
    SUBCASE("without $HOME the step starts in /") {
      fs::remove_all(home);
      auto rootless = run_with_input(relocated(command, job_dir), make_step_script("pwd"), home,
                                     scratch);
      CHECK(exit_code(rootless) == 0);
      CHECK(rootless.out == "/\n");
    }
  }

  TEST_CASE("step command says why when the script cannot be written, and runs nothing") {
    test::TempDir scratch{scratch_prefix};
    auto run = run_with_input(relocated(step_command(0), scratch.path / "missing"),
                              make_step_script("echo ran"), scratch.path, scratch);
    CHECK(exit_code(run) == 125);
    CHECK(run.out.empty());
    CHECK(run.err.find("cannot write the step script") != std::string::npos);
  }

  TEST_CASE("the identity input carries the job's files as the guest's shell reads them back") {
    GuestIdentity identity;
    identity.authorized_key = "ssh-ed25519 AAAA job";
    identity.hostname = "solstice-job";
    identity.instance_id = "solstice-job";
    identity.random_bytes = std::string("\0\n%\\-x", 6);
    identity.host_key_public = "ssh-ed25519 BBBB";
    identity.host_key_private = "-----BEGIN-----\nkey\n-----END-----\n";
    // Every byte a value may hold: quotes, newlines, printf's % and \, a leading
    // dash, spaces at both ends, UTF-8.
    const auto env = make_env_file({{"A", " -lead %s \\n 'q' \"d\" "}, {"SOLSTICE_JOB_ID", "job"}},
                                   {{"TOKEN", "s3cr\net\t\xc3\xa9"}});
    const std::vector<std::string> scripts{make_step_script("echo '|%s' \\\\n | cat"),
                                           "#!/usr/bin/env python3\nprint('two')\n"};
    identity.job_files = GuestJobFiles{{"/opt/my tools/bin", "/opt/my tools", "/srv/it's"}, env, scripts};
    // As the identity script reads it: six lines, then the job files' four (the
    // scripts as path|text|..., split as the script splits them).
    auto out = run_sh("printf %s " + shell_quote(make_identity_input(identity)) +
                      " | { for _ in 1 2 3 4 5 6; do read -r x; done; IFS= read -r dirs; "
                      "IFS= read -r path; IFS= read -r text; IFS= read -r scripts; eval \"set -- $dirs\"; "
                      "for d; do printf '[%s]' \"$d\"; done; printf '\\n%s\\n' \"$path\"; "
                      "printf \"$text\"; read -r rest; printf '%s|' \"$rest\"; "
                      "set -f; IFS='|'; set -- $scripts; while [ $# -ge 2 ]; do printf '<%s>' \"$1\"; "
                      "printf \"$2\"; shift 2; done; }");
    CHECK(out == "[/tmp][/tmp/solstice][/opt][/opt/my tools][/opt/my tools/bin][/srv][/srv/it's]\n" +
                   env_file_path() + "\n" + env + "-----BEGIN-----|<" + step_script_path(0) + ">" +
                   scripts[0] + "<" + step_script_path(1) + ">" + scripts[1]);
    // Without job files (the identity over SSH) the four lines are empty.
    identity.job_files.reset();
    out = run_sh("printf %s " + shell_quote(make_identity_input(identity)) +
                 " | { for _ in 1 2 3 4 5 6; do read -r x; done; IFS= read -r a; IFS= read -r b; "
                 "IFS= read -r c; IFS= read -r d; read -r rest; "
                 "printf '%s|%s|%s|%s|%s' \"$a\" \"$b\" \"$c\" \"$d\" \"$rest\"; }");
    CHECK(out == "||||-----BEGIN-----");
  }

  TEST_CASE("the identity commands fit a command line dropbear accepts (at most 9000 bytes)") {
    // Exceeding it, dropbear refuses the exec: the template then had no agent.
    CHECK(identity_command().size() < 9000);
    CHECK(identity_agent_command("org.solstice.identity").size() < 9000);
    // Comment lines are not sent.
    for (const auto& command : {identity_command(), identity_agent_command("org.solstice.identity")}) {
      CHECK(command.find("\n#") == std::string::npos);
      CHECK(command.find("\n\t#") == std::string::npos);
    }
  }
}
