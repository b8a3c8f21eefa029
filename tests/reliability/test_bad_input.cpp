// Bad input is refused before any VM starts: exit code 2, a message naming the
// file, field and value, nothing made in the state directory, no QEMU started.
#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <regex>

#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

struct Refusal {
  int code = -1;
  std::string err;
};

// Runs the runner on `job` and checks that it refused to start anything.
Refusal run_refused(const Sandbox& sandbox, const fs::path& job,
                    const std::vector<std::string>& extra = {}, const fs::path& config = {}) {
  auto runner = run_to_end(sandbox.run_args(job, "tcg", config, extra), 60s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  Refusal refusal{runner.wait(0ms)->code, runner.err()};
  INFO(runner.output());
  CHECK(refusal.code == 2);
  // Nothing was prepared: no VM directory, no job record, no process.
  CHECK_FALSE(fs::exists(sandbox.state() / "run"));
  CHECK_FALSE(fs::exists(sandbox.state() / "jobs"));
  check_nothing_left(sandbox);
  return refusal;
}

bool mentions(const Refusal& refusal, const std::string& part) {
  return refusal.err.find(part) != std::string::npos;
}

// A real qcow2 image (qemu-img create) whose header is valid and whose header
// extensions, right after it, are garbage: the magic says qcow2, QEMU cannot open it.
fs::path corrupt_qcow2(const Sandbox& sandbox, const std::string& name) {
  auto image = sandbox.root() / name;
  auto command = "qemu-img create -q -f qcow2 '" + image.string() + "' 16M";
  REQUIRE_MESSAGE(std::system(command.c_str()) == 0, command);
  std::fstream file(image, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(112);  // the end of a version 3 qcow2 header
  const std::string garbage(4096, '\xa5');
  file.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
  REQUIRE(file.good());
  return image;
}

nlohmann::json job_with(nlohmann::json fields) {
  nlohmann::json job = {{"runs_on", "solstice-test-guest"}, {"steps", {{{"script", "true"}}}}};
  for (auto& [key, value] : fields.items())
    job[key] = value;
  return job;
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("bad job files are refused before any VM starts") {
  Sandbox sandbox;

  SUBCASE("malformed JSON: file, line and column") {
    auto job = sandbox.write("broken.json",
                             "{\n  \"runs_on\": \"solstice-test-guest\",\n"
                             "  \"steps\": [ { \"script\": \"true\" } }\n}\n");
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(std::regex_search(refusal.err, std::regex("broken\\.json:3:[0-9]+")));
  }
  SUBCASE("unknown field") {
    auto job = sandbox.write_json("job.json", job_with({{"stepz", 1}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "job.json"));
    CHECK(mentions(refusal, "stepz"));
  }
  SUBCASE("wrong type") {
    auto job = sandbox.write_json("job.json", job_with({{"vcpus", "two"}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "job.json"));
    CHECK(mentions(refusal, "vcpus"));
    CHECK(mentions(refusal, "two"));
  }
  SUBCASE("missing image") {
    auto missing = sandbox.root() / "missing.qcow2";
    auto job = sandbox.write_json("job.json", {{"image", missing.string()},
                                               {"steps", {{{"script", "true"}}}}});
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, missing.string()));
    CHECK(mentions(refusal, "no such file"));
  }
  SUBCASE("image that is a directory") {
    auto dir = sandbox.root() / "image-dir";
    fs::create_directory(dir);
    auto job = sandbox.write_json("job.json", {{"image", dir.string()},
                                               {"steps", {{{"script", "true"}}}}});
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, dir.string()));
    CHECK(mentions(refusal, "is a directory"));
  }
  SUBCASE("image that is empty") {
    auto empty = sandbox.write("empty.raw", "");
    auto job = sandbox.write_json("job.json", {{"image", empty.string()},
                                               {"steps", {{{"script", "true"}}}}});
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, empty.string()));
    CHECK(mentions(refusal, "empty"));
  }
  SUBCASE("qcow2 image with a valid header and a corrupt body") {
    auto corrupt = corrupt_qcow2(sandbox, "corrupt.qcow2");
    auto job = sandbox.write_json("job.json", {{"image", corrupt.string()},
                                               {"steps", {{{"script", "true"}}}}});
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "image \"" + corrupt.string() + "\""));
    CHECK(mentions(refusal, "QEMU cannot open it"));
  }
  SUBCASE("runs_on image whose qcow2 disk has a corrupt body") {
    auto corrupt = corrupt_qcow2(sandbox, "corrupt-base.qcow2");
    auto config = sandbox.write_json(
      "config.json", {{"images", {{{"label", "broken-disk"}, {"disk", corrupt.string()}}}}});
    auto job = sandbox.write_json("job.json", job_with({{"runs_on", "broken-disk"}}));
    auto refusal = run_refused(sandbox, job, {}, config);
    INFO(refusal.err);
    CHECK(mentions(refusal, "images[0] (\"broken-disk\") disk \"" + corrupt.string() + "\""));
    CHECK(mentions(refusal, "QEMU cannot open it"));
  }
  SUBCASE("upload source missing") {
    auto missing = sandbox.root() / "src.tar.gz";
    auto job = sandbox.write_json(
      "job.json",
      job_with({{"uploads", {{{"source", missing.string()}, {"destination", "/tmp/src.tar.gz"}}}}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "uploads[0].source"));
    CHECK(mentions(refusal, missing.string()));
  }
  SUBCASE("65 vcpus") {
    auto job = sandbox.write_json("job.json", job_with({{"vcpus", 65}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "vcpus 65"));
  }
  SUBCASE("65 vcpus on the command line") {
    auto job = sandbox.write_json("job.json", job_with({}));
    auto refusal = run_refused(sandbox, job, {"--vcpus", "65"});
    INFO(refusal.err);
    CHECK(mentions(refusal, "vcpus 65"));
  }
  SUBCASE("1 MiB of memory") {
    auto job = sandbox.write_json("job.json", job_with({{"memory_mib", 1}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "memory_mib 1"));
  }
  SUBCASE("a runs_on label nobody configured") {
    auto job = sandbox.write_json("job.json", job_with({{"runs_on", "nobody-has-this"}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "runs_on"));
    CHECK(mentions(refusal, "nobody-has-this"));
  }
  SUBCASE("a job file that does not exist") {
    auto refusal = run_refused(sandbox, sandbox.root() / "no-such-job.json");
    INFO(refusal.err);
    CHECK(mentions(refusal, "no-such-job.json"));
  }
  SUBCASE("user_data that is not cloud-config") {
    auto job = sandbox.write_json("job.json", job_with({{"user_data", "packages: [curl]\n"}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "user_data starting with"));
    CHECK(mentions(refusal, "#cloud-config"));
  }
  SUBCASE("timeouts, keep_seconds and retries of 4294967295") {
    auto job = sandbox.write_json(
      "job.json", job_with({{"timeout_seconds", 4294967295u},
                            {"retries", 4294967295u},
                            {"debug_on_failure", {{"enabled", true}, {"keep_seconds", 4294967295u}}},
                            {"steps", {{{"script", "true"}, {"timeout_seconds", 4294967295u}}}}}));
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "timeout_seconds 4294967295: at most 604800"));
    CHECK(mentions(refusal, "steps[0] (\"step 1\") timeout_seconds 4294967295"));
    CHECK(mentions(refusal, "keep_seconds 4294967295: at most 86400"));
    CHECK(mentions(refusal, "retries 4294967295: at most 10"));
  }
  SUBCASE("a text file as a raw disk image") {
    auto text = sandbox.write("passwd", "root:x:0:0:root:/root:/bin/sh\n" + std::string(2048, '#'));
    auto job = sandbox.write_json("job.json", {{"image", text.string()},
                                               {"steps", {{{"script", "true"}}}}});
    auto refusal = run_refused(sandbox, job);
    INFO(refusal.err);
    CHECK(mentions(refusal, "image \"" + text.string() + "\": not a bootable raw disk image"));
  }
}

TEST_CASE("0 vcpus means the image's default and is accepted") {
  Sandbox sandbox;
  // An image whose QEMU exits at once: the job gets past validation (so not exit 2)
  // and fails fast as an infrastructure error.
  auto not_a_kernel = sandbox.write("not-a-kernel", std::string(4096, 'x'));
  auto config = sandbox.write_json(
    "config.json", {{"images", {{{"label", "broken-kernel"},
                                 {"boot_mode", "BOOT_MODE_KERNEL"},
                                 {"kernel", not_a_kernel.string()},
                                 {"memory_mib", 128}}}}});
  auto job = sandbox.write_json("job.json", {{"id", "zero-vcpus"},
                                             {"runs_on", "broken-kernel"},
                                             {"vcpus", 0},
                                             {"steps", {{{"script", "true"}}}}});
  auto runner = run_to_end(sandbox.run_args(job, "tcg", config), 60s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  CHECK(runner.wait(0ms)->code == 125);
  auto booting = sandbox.state_detail("zero-vcpus", solstice::v1::BOOTING);
  REQUIRE(booting);
  CHECK(booting->find("1 vcpus") != std::string::npos);
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
