#include <doctest/doctest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "runtime/job/job_file.hpp"
#include "runtime/job/redactor.hpp"
#include "runtime/job/runner_config.hpp"
#include "tests/unit/temp_dir.hpp"

namespace fs = std::filesystem;
using solstice::load_job_file;
using solstice::parse_job_json;
using solstice::validate_job;

namespace {

struct TempDir : solstice::test::TempDir {
  TempDir() : solstice::test::TempDir("solstice-job-file-") {}
};

std::string error_of(const solstice::Result<solstice::v1::JobSpec>& result) {
  REQUIRE_FALSE(result.has_value());
  return result.error().message;
}

std::string parse_error(const std::string& text) {
  return error_of(parse_job_json(text, "job.json", "/nowhere"));
}

// A config with one image, `label`, whose disk is a small raw file in `dir`.
solstice::v1::RunnerConfig config_with_label(const std::string& label, const TempDir& dir) {
  auto config = solstice::default_runner_config();
  auto* image = config.add_images();
  image->set_label(label);
  image->set_disk(dir.write("images/" + label + ".raw", std::string(64 * 1024, '\0')).string());
  return config;
}

// Runs a shell command (qemu-img here) and requires that it succeeds.
void shell(const std::string& command) {
  INFO(command);
  REQUIRE(std::system(command.c_str()) == 0);
}

// A real qcow2 image made by qemu-img.
fs::path make_qcow2(const TempDir& dir, const std::string& name, const std::string& backing = "") {
  const fs::path image = dir.path / name;
  shell("qemu-img create -q -f qcow2 " +
        (backing.empty() ? std::string() : "-F qcow2 -b '" + (dir.path / backing).string() + "' ") +
        "'" + image.string() + "' 16M");
  return image;
}

// Overwrites `bytes` of `file` at `offset`, keeping its size.
void overwrite(const fs::path& file, std::streamoff offset, const std::string& bytes) {
  std::fstream stream(file, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(stream);
  stream.seekp(offset);
  stream.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(stream);
}

// Runs `script` with /bin/sh under `env` (NAME=value pairs) and returns its exit
// status and combined output.
std::pair<int, std::string> run_shell(const std::string& script,
                                      const std::vector<std::string>& env) {
  std::string command = "env -i PATH=/usr/bin:/bin";
  for (const auto& assignment : env) command += " '" + assignment + "'";
  TempDir scratch;
  const fs::path script_file = scratch.write("step.sh", script);
  command += " /bin/sh " + script_file.string() + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string output;
  char buffer[4096];
  while (std::size_t got = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, got);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

}  // namespace

TEST_CASE("a job file in snake_case or lowerCamel parses into a JobSpec") {
  const auto snake = parse_job_json(R"({
    "name": "demo", "runs_on": "linux", "vcpus": 2, "memory_mib": "1024",
    "steps": [{"name": "a", "script": "true", "timeout_seconds": 5, "allow_failure": true}],
    "env": {"A": "1"}, "secrets": {"TOKEN": "x"},
    "debug_on_failure": {"enabled": true, "keep_seconds": 60}
  })", "job.json", "/nowhere");
  REQUIRE(snake.has_value());
  CHECK(snake->name() == "demo");
  CHECK(snake->runs_on() == "linux");
  CHECK(snake->vcpus() == 2);
  CHECK(snake->memory_mib() == 1024);
  REQUIRE(snake->steps_size() == 1);
  CHECK(snake->steps(0).timeout_seconds() == 5);
  CHECK(snake->steps(0).allow_failure());
  CHECK(snake->env().at("A") == "1");
  CHECK(snake->debug_on_failure().keep_seconds() == 60);

  const auto camel = parse_job_json(R"({"runsOn": "linux", "memoryMib": 1024,
    "steps": [{"script": "true", "timeoutSeconds": 5, "allowFailure": true}]})", "job.json", "/nowhere");
  REQUIRE(camel.has_value());
  CHECK(camel->runs_on() == "linux");
  CHECK(camel->memory_mib() == 1024);
  CHECK(camel->steps(0).allow_failure());
  CHECK(camel->steps(0).timeout_seconds() == 5);
}

TEST_CASE("malformed JSON is reported with file, line and column") {
  CHECK(parse_error("{\n  \"name\": \"x\",\n  \"steps\": [,]\n}").rfind("job.json:3:13: invalid JSON: ", 0) == 0);
  // A missing comma: the error points at the end of the unexpected key.
  const auto missing_comma = parse_error("{\n  \"name\": \"x\"\n  \"steps\": []\n}");
  CHECK(missing_comma.rfind("job.json:3:9: invalid JSON: ", 0) == 0);
  CHECK(missing_comma.find("expected '}'") != std::string::npos);
  CHECK(parse_error("").rfind("job.json:1:1: invalid JSON: ", 0) == 0);
  CHECK(parse_error("{\"steps\": [").rfind("job.json:1:12: invalid JSON: ", 0) == 0);
  CHECK(parse_error("[1, 2]") == "job.json: a job file holds one JSON object, got an array");
  CHECK(parse_error(R"({"env": {"A": "1"}, "steps": [{"script": "x", "name": "a", "name": "b"}]})") ==
        "job.json: key \"name\" appears twice in one object");
  CHECK(parse_error(R"({"env": {"A": "1"}, "env": {"B": "2"}})") == "job.json: key \"env\" appears twice in one object");
  CHECK(parse_job_json(R"({"steps": [{"name": "a"}, {"name": "a"}], "x": null})", "job.json", "/")
            .error().message == "job.json: unknown field 'x'");
}

TEST_CASE("unknown fields are named, with a suggestion when one is close") {
  CHECK(parse_error(R"({"stepz": []})") == "job.json: unknown field 'stepz' (did you mean 'steps'?)");
  CHECK(parse_error(R"({"steps": [{"script": "x"}, {"scrpt": "y"}]})") ==
        "job.json: unknown field 'steps[1].scrpt' (did you mean 'script'?)");
  CHECK(parse_error(R"({"colour": "blue"})") == "job.json: unknown field 'colour'");
}

TEST_CASE("wrong types name the field and the value") {
  CHECK(parse_error(R"({"vcpus": "two"})") ==
        "job.json: field 'vcpus' must be a whole number from 0 to 4294967295, got string \"two\"");
  CHECK(parse_error(R"({"vcpus": -1})").find("field 'vcpus' must be a whole number") != std::string::npos);
  CHECK(parse_error(R"({"memory_mib": 2.5})").find("got number 2.5") != std::string::npos);
  CHECK(parse_error(R"({"steps": "make"})") == "job.json: field 'steps' must be an array, got string \"make\"");
  CHECK(parse_error(R"({"steps": [{"script": 5}]})") ==
        "job.json: field 'steps[0].script' must be a string, got number 5");
  CHECK(parse_error(R"({"steps": [{"script": "x", "allow_failure": "yes"}]})") ==
        "job.json: field 'steps[0].allow_failure' must be true or false, got string \"yes\"");
  CHECK(parse_error(R"({"env": {"A": 1}})") == "job.json: field 'env[\"A\"]' must be a string, got number 1");
  CHECK(parse_error(R"({"env": ["A=1"]})").find("field 'env' must be an object") != std::string::npos);
  CHECK(parse_error(R"({"debugOnFailure": true})") ==
        "job.json: field 'debugOnFailure' must be an object, got true");
  // null is the protobuf JSON mapping's "default".
  CHECK(parse_job_json(R"({"vcpus": null, "steps": null})", "job.json", "/").has_value());
}

TEST_CASE("loading names steps and resolves paths against the job file's directory") {
  TempDir dir;
  const auto file = dir.write("jobs/job.json", R"({
    "image": "../images/base.qcow2",
    "steps": [{"script": "a"}, {"name": "named", "script": "b"}, {"script": "c"}],
    "uploads": [{"source": "files/tool.sh", "destination": "/tmp/tool.sh"},
                {"source": "/abs/file", "destination": "/tmp/file"}]
  })");
  const auto spec = load_job_file(file);
  REQUIRE(spec.has_value());
  CHECK(spec->steps(0).name() == "step 1");
  CHECK(spec->steps(1).name() == "named");
  CHECK(spec->steps(2).name() == "step 3");
  CHECK(spec->image() == (dir.path / "images/base.qcow2").string());
  CHECK(spec->uploads(0).source() == (dir.path / "jobs/files/tool.sh").string());
  CHECK(spec->uploads(1).source() == "/abs/file");

  const auto missing = load_job_file(dir.path / "nope.json");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().message.find((dir.path / "nope.json").string()) != std::string::npos);
  CHECK(missing.error().message.find("No such file") != std::string::npos);
  CHECK(load_job_file(dir.path).error().message.find("is a directory") != std::string::npos);
  const fs::path fifo = dir.path / "fifo.json";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK(load_job_file(fifo).error().message == fifo.string() + ": is not a regular file");

  const auto bad = dir.write("bad.json", "{\n\"steps\": [{\"script\": \"x\"}],\n\"stepz\": 1}");
  CHECK(load_job_file(bad).error().message == bad.string() + ": unknown field 'stepz' (did you mean 'steps'?)");
}

TEST_CASE("jobrequest.v1 becomes a job: env vars, a checkout step and the script") {
  const auto spec = parse_job_json(R"({
    "schema_version": "jobrequest.v1", "request_id": "5b1d-77", "source": "Manual",
    "repo_url": "https://example.org/o/r.git", "repo_owner": "o", "repo_name": "r",
    "commit_sha": "0123456789abcdef", "runs_on": "debian", "script_path": "ci/build.sh",
    "workflow_path": null, "submitted_at": "2025-01-01T00:00:00Z", "something_newer": 1
  })", "request.json", "/");
  REQUIRE(spec.has_value());
  CHECK(spec->id() == "5b1d-77");
  CHECK(spec->runs_on() == "debian");
  CHECK(spec->name() == "o/r@0123456789ab");
  CHECK(spec->env().at("SOLSTICE_REPO_URL") == "https://example.org/o/r.git");
  CHECK(spec->env().at("SOLSTICE_COMMIT_SHA") == "0123456789abcdef");
  REQUIRE(spec->steps_size() == 2);
  CHECK(spec->steps(0).name() == "checkout");
  CHECK(spec->steps(1).name() == "run ci/build.sh");
  TempDir dir;
  CHECK(validate_job(*spec, config_with_label("debian", dir)).has_value());

  const auto without_repo = parse_job_json(R"({"request_id": "r1", "runs_on": "x", "script_path": "/opt/ci.sh"})",
                                           "request.json", "/");
  REQUIRE(without_repo.has_value());
  CHECK(without_repo->steps_size() == 1);
  CHECK(without_repo->env().count("SOLSTICE_REPO_URL") == 0);

  CHECK(error_of(parse_job_json(R"({"schema_version": "jobrequest.v2", "script_path": "a"})", "r.json", "/")) ==
        "r.json: schema_version \"jobrequest.v2\" is not supported (expected \"jobrequest.v1\")");
  CHECK(error_of(parse_job_json(R"({"request_id": "r1", "workflow_path": "w.kdl"})", "r.json", "/"))
            .find("'script_path' is missing") != std::string::npos);
  CHECK(error_of(parse_job_json(R"({"request_id": 7, "script_path": "a"})", "r.json", "/")) ==
        "r.json: jobrequest.v1 field 'request_id' must be a string, got number 7");
}

TEST_CASE("jobrequest.v1 steps clone the repository and run the script, in a real shell") {
  TempDir dir;
  const fs::path repo = dir.path / "origin";
  dir.write("origin/ci/it's here.sh", "echo \"ran from $(basename \"$(pwd)\") at $(git rev-parse --short HEAD)\"\nexit 7\n");
  const std::string git = "git -C '" + repo.string() + "' -c init.defaultBranch=main -c user.name=t -c user.email=t@example.org ";
  REQUIRE(std::system((git + "init -q && " + git + "add -A && " + git + "commit -qm first").c_str()) == 0);
  dir.write("origin/ci/it's here.sh", "echo second; exit 1\n");
  REQUIRE(std::system((git + "commit -qam second").c_str()) == 0);
  std::string first_commit;
  {
    FILE* pipe = ::popen((git + "rev-list --max-parents=0 HEAD").c_str(), "r");
    REQUIRE(pipe != nullptr);
    char line[128] = {};
    REQUIRE(std::fgets(line, sizeof line, pipe) != nullptr);
    ::pclose(pipe);
    first_commit = std::string(line).substr(0, 40);
  }

  const auto spec = parse_job_json(
      R"({"request_id": "r2", "runs_on": "x", "repo_url": ")" + repo.string() + R"(",
          "commit_sha": ")" + first_commit + R"(", "script_path": "ci/it's here.sh"})",
      "request.json", "/");
  REQUIRE(spec.has_value());
  REQUIRE(spec->steps_size() == 2);
  const fs::path home = dir.path / "home";
  fs::create_directories(home);
  std::vector<std::string> env{"HOME=" + home.string()};
  for (const auto& [name, value] : spec->env()) env.push_back(name + "=" + value);

  const auto [checkout_status, checkout_output] = run_shell(spec->steps(0).script(), env);
  INFO(checkout_output);
  REQUIRE(checkout_status == 0);
  CHECK(fs::exists(home / "workspace/ci/it's here.sh"));

  // The script is not executable, so it runs with sh, from the workspace, at the
  // requested (first) commit; its exit code is the step's.
  const auto [run_status, run_output] = run_shell(spec->steps(1).script(), env);
  CHECK(run_status == 7);
  CHECK(run_output == "ran from workspace at " + first_commit.substr(0, 7) + "\n");
}

TEST_CASE("validation names each field that is wrong") {
  TempDir dir;
  const auto config = config_with_label("linux", dir);
  const auto problems = [&](const std::string& json) {
    auto spec = parse_job_json(json, "job.json", dir.path);
    REQUIRE(spec.has_value());
    auto valid = validate_job(*spec, config);
    REQUIRE_FALSE(valid.has_value());
    return valid.error().message;
  };
  const auto valid = [&](const std::string& json) {
    auto spec = parse_job_json(json, "job.json", dir.path);
    REQUIRE(spec.has_value());
    auto checked = validate_job(*spec, config);
    INFO((checked ? std::string() : checked.error().message));
    return checked.has_value();
  };
  const std::string step = R"("steps": [{"script": "true"}])";

  CHECK(valid(R"({"runs_on": "linux", )" + step + "}"));
  CHECK(problems(R"({)" + step + "}").find("neither image nor runs_on is set") == 0);
  CHECK(problems(R"({"runs_on": "linux", "image": "x.img", )" + step + "}") ==
        "image \"" + (dir.path / "x.img").string() + "\" and runs_on \"linux\" are both set: a job names exactly one of them");
  CHECK(problems(R"({"runs_on": "windows", )" + step + "}") ==
        "runs_on \"windows\": no image has this label (configured labels: \"linux\")");

  // Images: a regular, readable, non-empty file; qcow2 by its magic, else raw.
  CHECK(problems(R"({"image": "missing.qcow2", )" + step + "}") ==
        "image \"" + (dir.path / "missing.qcow2").string() + "\": no such file");
  fs::create_directories(dir.path / "a-directory");
  CHECK(problems(R"({"image": "a-directory", )" + step + "}").find("is a directory, not a disk image") != std::string::npos);
  dir.write("empty.img", "");
  CHECK(problems(R"({"image": "empty.img", )" + step + "}").find("is empty (0 bytes)") != std::string::npos);
  make_qcow2(dir, "disk.qcow2");
  dir.write("disk.raw", std::string(1024, '\0'));
  CHECK(valid(R"({"image": "disk.qcow2", )" + step + "}"));
  CHECK(valid(R"({"image": "disk.raw", )" + step + "}"));
  CHECK(solstice::detect_disk_format(dir.path / "disk.qcow2", "image").value() == "qcow2");
  CHECK(solstice::detect_disk_format(dir.path / "disk.raw", "image").value() == "raw");

  // Steps.
  CHECK(problems(R"({"runs_on": "linux", "steps": []})") == "steps: a job needs at least one step");
  CHECK(problems(R"({"runs_on": "linux", "steps": [{"name": "build", "script": " \n"}]})") ==
        "steps[0] (\"build\"): script is empty");
  CHECK(problems(R"({"runs_on": "linux", "steps": [{"script": "a"}, {"name": "step 1", "script": "b"}]})") ==
        "steps[1] (\"step 1\"): the name is already used by steps[0]; step names must be unique");

  // Size.
  CHECK(valid(R"({"runs_on": "linux", "vcpus": 64, "memory_mib": 64, )" + step + "}"));
  CHECK(problems(R"({"runs_on": "linux", "vcpus": 65, )" + step + "}") ==
        "vcpus 65: must be 0 (the image's default) or 1 to 64");
  CHECK(problems(R"({"runs_on": "linux", "memory_mib": 1, )" + step + "}") ==
        "memory_mib 1: at least 64 MiB is needed to boot a guest");
  CHECK(problems(R"({"runs_on": "linux", "memory_mib": 2000000, )" + step + "}") ==
        "memory_mib 2000000: at most 1048576 (1 TiB)");

  // Uploads.
  dir.write("tool.sh", "echo hi\n");
  CHECK(valid(R"({"runs_on": "linux", "uploads": [{"source": "tool.sh", "destination": "/tmp/t", "mode": 493}], )" + step + "}"));
  CHECK(problems(R"({"runs_on": "linux", "uploads": [{"source": "nope.sh", "destination": "/tmp/t"}], )" + step + "}") ==
        "uploads[0].source \"" + (dir.path / "nope.sh").string() + "\": no such file");
  CHECK(problems(R"({"runs_on": "linux", "uploads": [{"source": "tool.sh", "destination": "tmp/t"}], )" + step + "}") ==
        "uploads[0].destination \"tmp/t\": must be an absolute path in the guest");
  CHECK(problems(R"({"runs_on": "linux", "uploads": [{"source": "tool.sh", "destination": "/t", "mode": 755}], )" + step + "}")
            == "uploads[0].mode 755: not a sensible file mode (JSON has no octal: 0755 is written 493)");
  CHECK(problems(R"({"runs_on": "linux", "uploads": [{"source": "tool.sh", "destination": "/t", "mode": 4096}], )" + step + "}")
            .find("uploads[0].mode 4096: not a file mode") == 0);
  CHECK(valid(R"({"runs_on": "linux", "uploads": [{"source": "tool.sh", "destination": "/t", "mode": 2541}], )" + step + "}"));

  // Artifacts.
  CHECK(valid(R"({"runs_on": "linux", "artifacts": [{"path": "/tmp/out/r.txt"}, {"path": "/tmp/r.txt", "destination": "r2.txt"}], )" + step + "}"));
  CHECK(problems(R"({"runs_on": "linux", "artifacts": [{"path": ""}], )" + step + "}") ==
        "artifacts[0].path is empty: give a path in the guest");
  CHECK(problems(R"({"runs_on": "linux", "artifacts": [{"path": "/a", "destination": "../a"}], )" + step + "}") ==
        "artifacts[0].destination \"../a\": must be a plain file name (no '/', not '.' or '..')");
  CHECK(problems(R"({"runs_on": "linux", "artifacts": [{"path": "/a", "destination": ".."}], )" + step + "}")
            .find("must be a plain file name") != std::string::npos);
  CHECK(problems(R"({"runs_on": "linux", "artifacts": [{"path": "/tmp/"}], )" + step + "}") ==
        "artifacts[0].path \"/tmp/\": has no file name to store it under; give a destination");
  CHECK(problems(R"({"runs_on": "linux", "artifacts": [{"path": "/a/r.txt"}, {"path": "/b/r.txt"}], )" + step + "}") ==
        "artifacts[1]: destination \"r.txt\" is already used by artifacts[0]");

  // Environment and secrets.
  CHECK(valid(R"({"runs_on": "linux", "env": {"_A1": "", "B": "x"}, "secrets": {"TOKEN": "t"}, )" + step + "}"));
  CHECK(problems(R"({"runs_on": "linux", "env": {"1A": "x"}, )" + step + "}") ==
        "env name \"1A\": must be a shell identifier (letters, digits and '_', not starting with a digit)");
  CHECK(problems(R"({"runs_on": "linux", "secrets": {"MY-TOKEN": "x"}, )" + step + "}").find("secrets name \"MY-TOKEN\"") == 0);
  CHECK(problems(R"({"runs_on": "linux", "secrets": {"TOKEN": ""}, )" + step + "}") ==
        "secrets \"TOKEN\": value is empty (an empty secret cannot be hidden)");

  CHECK(problems(R"({"id": "../../etc", "runs_on": "linux", )" + step + "}").find("id \"../../etc\": may hold only") == 0);

  // Everything wrong at once: one line per problem.
  const std::string all = problems(R"({"vcpus": 99, "memory_mib": 3, "steps": [], "env": {"a b": "x"}})");
  CHECK(std::count(all.begin(), all.end(), '\n') == 4);
}

TEST_CASE("the sample job loads and validates against a config that knows its label") {
  const fs::path examples = fs::path(SOLSTICE_SOURCE_DIR) / "examples";
  const auto spec = load_job_file(examples / "sample-job.json");
  INFO((spec ? std::string() : spec.error().message));
  REQUIRE(spec.has_value());
  CHECK(spec->runs_on() == solstice::test_guest_label);
  REQUIRE(spec->steps_size() == 3);
  CHECK(spec->steps(0).name() == "system info");
  CHECK(spec->steps(1).name() == "allowed to fail");
  CHECK(spec->steps(1).allow_failure());
  CHECK(spec->steps(2).name() == "build");
  REQUIRE(spec->uploads_size() == 1);
  CHECK(spec->uploads(0).source() == (examples / "hello.sh").string());
  CHECK(spec->uploads(0).destination() == "/tmp/hello.sh");
  CHECK(spec->uploads(0).mode() == 0755);
  REQUIRE(spec->artifacts_size() == 1);
  CHECK(spec->artifacts(0).path() == "/tmp/out/result.txt");
  REQUIRE(spec->secrets_size() == 1);

  TempDir dir;
  CHECK(validate_job(*spec, config_with_label(solstice::test_guest_label, dir)).has_value());
  const auto unknown = validate_job(*spec, config_with_label("other", dir));
  REQUIRE_FALSE(unknown.has_value());
  CHECK(unknown.error().message.find("runs_on \"solstice-test-guest\"") == 0);

  // The steps really do what the README says, here in a host shell: the "allowed to
  // fail" step exits 3, and hello.sh prints the secret, which redaction hides.
  CHECK(run_shell(spec->steps(1).script(), {}).first == 3);
  std::vector<std::string> env;
  for (const auto& [name, value] : spec->env()) env.push_back(name + "=" + value);
  for (const auto& [name, value] : spec->secrets()) env.push_back(name + "=" + value);
  const auto [status, output] = run_shell("sh '" + spec->uploads(0).source() + "'", env);
  CHECK(status == 0);
  const std::string secret = solstice::job_secret_values(*spec).at(0);
  CHECK(output.find(secret) != std::string::npos);
  const std::string shown = solstice::redact(output, solstice::job_secret_values(*spec));
  CHECK(shown.find(secret) == std::string::npos);
  CHECK(shown.find("the token is ***\n") != std::string::npos);

  const auto request = load_job_file(examples / "jobrequest.json");
  INFO((request ? std::string() : request.error().message));
  REQUIRE(request.has_value());
  CHECK(validate_job(*request, config_with_label(solstice::test_guest_label, dir)).has_value());
}

TEST_CASE("a disk image QEMU cannot use is refused by validation, naming the file and why") {
  TempDir dir;
  const std::string step = R"("steps": [{"script": "true"}])";
  const auto check_job = [&](const std::string& image, const solstice::v1::RunnerConfig& config) {
    auto spec = parse_job_json(R"({"image": ")" + image + "\", " + step + "}", "job.json", dir.path);
    REQUIRE(spec.has_value());
    return validate_job(*spec, config);
  };
  const auto config = solstice::default_runner_config();
  const fs::path good = make_qcow2(dir, "good.qcow2");
  CHECK(check_job(good.string(), config).has_value());

  SUBCASE("a valid qcow2 header with a corrupt body") {
    const fs::path corrupt = make_qcow2(dir, "corrupt.qcow2");
    // The header (112 bytes) stays; the header extensions after it become garbage.
    overwrite(corrupt, 112, std::string(4096, '\xa5'));
    REQUIRE(solstice::detect_disk_format(corrupt, "image").value() == "qcow2");
    const auto refused = check_job(corrupt.string(), config);
    REQUIRE_FALSE(refused.has_value());
    const std::string& message = refused.error().message;
    INFO(message);
    CHECK(message.find("image \"" + corrupt.string() + "\": QEMU cannot open it: ") == 0);
    // qemu-img's own reason follows.
    CHECK(message.find("Header extension too large") != std::string::npos);
  }
  SUBCASE("a qcow2 header and nothing after it") {
    const auto header_only = dir.write("header-only.qcow2", std::string("QFI\xfb\0\0\0\3", 8) + std::string(504, '\0'));
    const auto refused = check_job(header_only.string(), config);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("image \"" + header_only.string() + "\": QEMU cannot open it") == 0);
  }
  SUBCASE("a qcow2 whose backing file is gone") {
    make_qcow2(dir, "base.qcow2");
    const fs::path overlay = make_qcow2(dir, "overlay.qcow2", "base.qcow2");
    CHECK(check_job(overlay.string(), config).has_value());
    fs::remove(dir.path / "base.qcow2");
    const auto refused = check_job(overlay.string(), config);
    REQUIRE_FALSE(refused.has_value());
    INFO(refused.error().message);
    CHECK(refused.error().message.find("image \"" + overlay.string() + "\": QEMU cannot open it") == 0);
    CHECK(refused.error().message.find((dir.path / "base.qcow2").string()) != std::string::npos);
  }
  SUBCASE("a qcow2 that QEMU marked corrupt") {
    const fs::path marked = make_qcow2(dir, "marked.qcow2");
    // incompatible_features (big-endian, bytes 72-79), bit 1: corrupt.
    overwrite(marked, 79, std::string(1, '\x02'));
    const auto refused = check_job(marked.string(), config);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message ==
          "image \"" + marked.string() + "\": the image is marked corrupt by QEMU (qemu-img check -r all repairs it)");
  }
  SUBCASE("another format than the runner would pass to QEMU") {
    // No qcow2 magic, so the runner would hand it to QEMU as raw.
    const fs::path vmdk = dir.path / "disk.vmdk";
    shell("qemu-img create -q -f vmdk '" + vmdk.string() + "' 16M");
    const auto refused = check_job(vmdk.string(), config);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("image \"" + vmdk.string() +
                                       "\": QEMU reads it as a \"vmdk\" image, but it would be used as \"raw\"") == 0);
  }
  SUBCASE("the disk of a runs_on image is checked as its configured format") {
    auto with_image = solstice::default_runner_config();
    auto* image = with_image.add_images();
    image->set_label("debian");
    image->set_disk(good.string());
    auto spec = parse_job_json(R"({"runs_on": "debian", )" + step + "}", "job.json", dir.path);
    REQUIRE(spec.has_value());
    CHECK(validate_job(*spec, with_image).has_value());
    image->set_disk_format("qcow2");
    CHECK(validate_job(*spec, with_image).has_value());
    image->set_disk_format("raw");
    auto refused = validate_job(*spec, with_image);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message == "images[0] (\"debian\") disk \"" + good.string() +
                                       "\": QEMU reads it as a \"qcow2\" image, but it would be used as \"raw\" "
                                       "(the runner takes qcow2 or raw images; qemu-img convert -O qcow2 makes one)");
    image->set_disk_format("");
    overwrite(good, 112, std::string(4096, '\xa5'));
    refused = validate_job(*spec, with_image);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("images[0] (\"debian\") disk \"" + good.string() + "\": QEMU cannot open it: ") == 0);
  }
}

TEST_CASE("pack_uploads reads each upload into the job and clears its source; check_self_contained "
          "refuses a job that names a path") {
  TempDir dir;
  const std::string bytes("a\0b\xff\n", 5);
  dir.write("jobs/data.bin", bytes);
  const auto file = dir.write("jobs/job.json", R"({
    "runs_on": "x", "steps": [{"script": "a"}],
    "uploads": [{"source": "data.bin", "destination": "/tmp/data.bin"}]
  })");
  auto spec = load_job_file(file);
  REQUIRE(spec.has_value());
  auto refused = solstice::check_self_contained(*spec);
  REQUIRE_FALSE(refused.has_value());
  CHECK(refused.error().message.find("uploads[0].source") != std::string::npos);
  CHECK(refused.error().message.find("names a file on the node") != std::string::npos);

  REQUIRE(solstice::pack_uploads(*spec).has_value());
  CHECK(spec->uploads(0).source().empty());
  CHECK(spec->uploads(0).has_content());
  CHECK(spec->uploads(0).content() == bytes);
  CHECK(solstice::check_self_contained(*spec).has_value());
  // Packing again (a packed job) changes nothing.
  REQUIRE(solstice::pack_uploads(*spec).has_value());
  CHECK(spec->uploads(0).content() == bytes);

  solstice::v1::JobSpec with_image;
  with_image.set_image("/var/lib/disk.qcow2");
  auto image = solstice::check_self_contained(with_image);
  REQUIRE_FALSE(image.has_value());
  CHECK(image.error().message.find("image \"/var/lib/disk.qcow2\" names a file on the node") !=
        std::string::npos);
  auto packed_image = solstice::pack_uploads(with_image);
  REQUIRE_FALSE(packed_image.has_value());
  CHECK(packed_image.error().message.find("runs_on label only") != std::string::npos);

  solstice::v1::JobSpec missing;
  auto upload = missing.add_uploads();
  upload->set_source((dir.path / "nope.bin").string());
  upload->set_destination("/tmp/x");
  auto not_there = solstice::pack_uploads(missing);
  REQUIRE_FALSE(not_there.has_value());
  CHECK(not_there.error().message.find("uploads[0].source") != std::string::npos);
  CHECK(not_there.error().message.find("nope.bin") != std::string::npos);
}
