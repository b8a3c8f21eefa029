// Templates and restored jobs (README "Fast starts"), with the real runner binary on
// the real test guest: a restored job runs and cleans up and says so; two clones
// running at once have identities of their own (host key, authorized key, clock,
// RNG, hostname) and refuse the template's key; a changed image gets a new template;
// a corrupt state file falls back to a cold boot. One template is built once (by
// `template build`) and copied into each test's state directory.
#include <doctest/doctest.h>

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <set>

#include "runtime/base/clock.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice;
using namespace solstice::reliability;

namespace {

std::string file_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

bool any_contains(const std::vector<std::string>& texts, const std::string& part) {
  for (const auto& text : texts)
    if (contains(text, part))
      return true;
  return false;
}

// The templates of a state dir, as `template list --json` prints them.
std::vector<nlohmann::json> listed_templates(const fs::path& state) {
  auto list = run_to_end({"template", "list", "--json", "--state-dir", state.string()}, 60s);
  std::vector<nlohmann::json> out;
  size_t start = 0;
  const auto& text = list.out();
  while (start < text.size()) {
    auto end = text.find('\n', start);
    if (end == std::string::npos)
      end = text.size();
    auto line = nlohmann::json::parse(text.substr(start, end - start), nullptr, false);
    if (line.is_object())
      out.push_back(line);
    start = end + 1;
  }
  return out;
}

// A state dir with the test guest's template, built once for the whole file.
const fs::path& template_source() {
  static Sandbox* sandbox = nullptr;
  if (!sandbox) {
    sandbox = new Sandbox();  // lives until the process ends (the suite's last test)
    auto built = run_to_end({"template", "build", "--state-dir", sandbox->state().string(),
                             "--accel", "tcg"},
                            600s);
    INFO(built.output());
    REQUIRE(built.exited());
    REQUIRE(contains(built.out(), "built in"));
    std::atexit([] { delete sandbox; });
  }
  static const fs::path templates = sandbox->state() / "templates";
  return templates;
}

// Copies the shared template into `sandbox` (its state dir made as the runner would).
void give_template(const Sandbox& sandbox) {
  const auto& source = template_source();
  fs::create_directories(sandbox.state());
  fs::copy(source, sandbox.state() / "templates", fs::copy_options::recursive);
}

std::string template_id(const Sandbox& sandbox) {
  auto listed = listed_templates(sandbox.state());
  REQUIRE(listed.size() == 1);
  return listed[0].value("id", std::string{});
}

// What a job printed, as KEY=VALUE lines, with the host's time of the output.
struct Printed {
  std::map<std::string, std::string> values;
  int64_t step_started_us = 0;  // when the runner started the step
  int64_t host_time_us = 0;     // when its first output reached the runner
};

Printed printed_by(const Sandbox& sandbox, const std::string& id, uint32_t step) {
  Printed printed;
  for (const auto& event : sandbox.events(id)) {
    if (event.has_step_started() && event.step_started().step_index() == step)
      printed.step_started_us = event.timestamp_us();
    if (!event.has_output() || event.output().step_index() != step)
      continue;
    if (!printed.host_time_us)
      printed.host_time_us = event.timestamp_us();
  }
  auto text = sandbox.step_output(id, step);
  size_t start = 0;
  while (start < text.size()) {
    auto end = text.find('\n', start);
    if (end == std::string::npos)
      end = text.size();
    auto line = text.substr(start, end - start);
    if (auto eq = line.find('='); eq != std::string::npos)
      printed.values[line.substr(0, eq)] = line.substr(eq + 1);
    start = end + 1;
  }
  return printed;
}

// The guest's clock (`date +%s` as the step's first line) is within 2 s of the
// host's: the host's clock read between the step's start and its first output's
// arrival, which on a loaded machine can be seconds apart.
void check_clock(const Printed& printed) {
  const auto guest_s = std::stoll(printed.values.at("NOW"));
  const auto started_s = printed.step_started_us / 1000000;
  const auto output_s = printed.host_time_us / 1000000;
  INFO("guest " << guest_s << ", host " << started_s << " (step started) to " << output_s
                << " (first output)");
  REQUIRE(printed.step_started_us > 0);
  CHECK(guest_s >= started_s - 2);
  CHECK(guest_s <= output_s + 2);
}

bool has_phase(const v1::JobResult& result, const std::string& name) {
  for (const auto& phase : result.phases())
    if (phase.phase() == name)
      return true;
  return false;
}

// What a clone says about its identity, all at once (the clock read first).
const char* identity_script =
  "echo NOW=$(date +%s)\n"
  "echo HOSTKEY=$(dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key | grep '^ssh-ed25519' | cut -d' ' -f2)\n"
  "echo AUTHKEYS=$(cat ~/.ssh/authorized_keys | cut -d' ' -f2 | tr '\\n' ,)\n"
  "echo RANDOM=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')\n"
  "echo HOSTNAME=$(hostname)\n"
  "echo INSTANCE=$(cat /run/instance-id)\n";

// What a job sees of its files: the env and a secret (its value compared in the
// guest: output hides it), the directories' and env file's owner and mode, and an
// upload into a directory that did not exist.
const char* job_files_script =
  "echo STAGE=\"$STAGE\"\n"
  "echo JOB=\"$SOLSTICE_JOB_ID\"\n"
  "[ \"$TOKEN\" = \"s3cr'et \\$x\" ] && echo SECRET=same || echo SECRET=differs\n"
  "echo JOBDIR=$(stat -c '%a %u:%g' /tmp/solstice)\n"
  "echo ENVFILE=$(stat -c '%a %u:%g' /tmp/solstice/env)\n"
  "echo SCRIPT=$(stat -c '%a %u:%g' /tmp/solstice/step-1)\n"
  "echo UPDIR=$(stat -c '%a %u:%g' /opt/job-tools /opt/job-tools/bin | tr '\\n' ' ')\n"
  "echo UPLOAD=$(cat /opt/job-tools/bin/tool.txt)\n";

// A job running job_files_script, with an env value, a secret and an upload.
nlohmann::json job_files_job(const Sandbox& sandbox, const std::string& id) {
  auto job = guest_job(id, {job_files_script});
  job["env"] = {{"STAGE", "ci 'quoted'"}};
  job["secrets"] = {{"TOKEN", "s3cr'et $x"}};
  auto source = sandbox.write_json("tool-" + id + ".json", {{"uploaded", true}});
  job["uploads"] = {{{"source", source.string()}, {"destination", "/opt/job-tools/bin/tool.txt"}}};
  return job;
}

// The job's files are as the set-up over SSH makes them (the test guest's user is uid 0).
void check_job_files(const Sandbox& sandbox, const std::string& id) {
  auto printed = printed_by(sandbox, id, 0);
  CHECK(printed.values["STAGE"] == "ci 'quoted'");
  CHECK(printed.values["JOB"] == id);
  CHECK(printed.values["SECRET"] == "same");
  CHECK(printed.values["JOBDIR"] == "700 0:0");
  CHECK(printed.values["ENVFILE"] == "600 0:0");
  CHECK(printed.values["SCRIPT"] == "755 0:0");  // by the step, or by a clone's agent
  CHECK(printed.values["UPDIR"] == "700 0:0 700 0:0");
  CHECK(contains(printed.values["UPLOAD"], "uploaded"));
}

}  // namespace

TEST_SUITE("templates") {
  TEST_CASE("a job on an image with a template restores, runs, cleans up and says so") {
    REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
    Sandbox sandbox;
    give_template(sandbox);
    auto id = template_id(sandbox);
    auto job_json = job_files_job(sandbox, "restored");
    job_json["steps"].push_back({{"name", "step 2"}, {"script", "echo step ran; hostname"}});
    auto job = sandbox.write_json("job.json", job_json);
    auto run = run_to_end(sandbox.snapshot_run_args(job, "tcg"), 300s);
    INFO(run.output());
    auto result = sandbox.result("restored");
    REQUIRE(result);
    CHECK(result->status() == v1::SUCCEEDED);
    CHECK(result->start() == "restored");
    CHECK(has_phase(*result, "restore"));
    CHECK_FALSE(has_phase(*result, "boot_to_ssh"));
    // The identity agent made the job's directories and env file: no set-up ran,
    // and the step sees them as the set-up would have made them.
    CHECK_FALSE(has_phase(*result, "setup"));
    check_job_files(sandbox, "restored");
    // The test guest has virtio_console: its template runs the identity agent, and
    // the clone took its identity over the port before its one SSH connection.
    auto before = listed_templates(sandbox.state());
    REQUIRE(before.size() == 1);
    CHECK_MESSAGE(before[0].value("identity_agent", false), before[0].dump());
    CHECK(has_phase(*result, "identity"));
    CHECK(has_phase(*result, "ssh_ready"));
    CHECK(result->shutdown_method() == "quit");  // a clone's disk is thrown away
    CHECK(sandbox.step_output("restored", 1) == "step ran\nsolstice-restored\n");
    CHECK(any_contains(sandbox.notices("restored"), "start: restored from template " + id));
    CHECK(contains(run.out(), "restored from template"));  // the terminal says it too
    // Cleaned up as after a cold boot; the template is untouched and still ready.
    check_nothing_left(sandbox);
    auto listed = listed_templates(sandbox.state());
    REQUIRE(listed.size() == 1);
    CHECK(listed[0].value("stale", std::string{"?"}).empty());
  }

  TEST_CASE("two first jobs at once: one builds the template, says so, both restore it") {
    Sandbox sandbox;
    auto a = sandbox.write_json("a.json", guest_job("first-a", {"echo first"}));
    auto b = sandbox.write_json("b.json", guest_job("first-b", {"echo first"}));
    auto args = sandbox.snapshot_run_args(a, "tcg");
    args.insert(args.begin() + 2, b.string());
    auto run = run_to_end(args, 600s);
    INFO(run.output());
    std::multiset<std::string> notes;
    for (const char* id : {"first-a", "first-b"}) {
      auto result = sandbox.result(id);
      REQUIRE(result);
      CHECK(result->status() == v1::SUCCEEDED);
      CHECK(result->start() == "restored");
      notes.insert(result->start_note());
      CHECK(any_contains(sandbox.notices(id), "no template yet for image 'solstice-test-guest'"));
    }
    // Built once, under its lock: the other job waited and restored that template.
    CHECK(notes == std::multiset<std::string>{"template built by another job", "template built first"});
    CHECK(listed_templates(sandbox.state()).size() == 1);
    // --cold (and snapshots: off) boot cold even with a template there.
    auto cold_job = sandbox.write_json("cold.json", guest_job("cold", {"echo cold"}));
    auto cold = run_to_end(sandbox.run_args(cold_job, "tcg"), 300s);
    auto cold_result = sandbox.result("cold");
    REQUIRE(cold_result);
    CHECK(cold_result->start() == "cold");
    CHECK(cold_result->start_note() == "snapshots off");
    CHECK(has_phase(*cold_result, "boot_to_ssh"));
    check_nothing_left(sandbox);
  }

  TEST_CASE("two clones at once: own host key, own authorized key, the host's clock, own RNG, own hostname") {
    Sandbox sandbox;
    give_template(sandbox);
    auto id = template_id(sandbox);
    const auto template_dir = sandbox.state() / "templates" / id;
    // The second steps sleep, so both VMs are up while the template key is tried.
    auto a = sandbox.write_json("a.json", guest_job("clone-a", {identity_script, "sleep 6"}));
    auto b = sandbox.write_json("b.json", guest_job("clone-b", {identity_script, "sleep 6"}));
    auto args = sandbox.snapshot_run_args(a, "tcg");
    args.insert(args.begin() + 2, b.string());
    auto runner = Runner::start(args);
    // While the second steps run, the template's key is refused by both clones,
    // which also no longer show the template's host key.
    auto both_running = [&] {
      for (const char* job : {"clone-a", "clone-b"}) {
        bool second_step = false;
        for (const auto& event : sandbox.events(job))
          second_step |= event.has_step_started() && event.step_started().step_index() == 1;
        if (!second_step)
          return false;
      }
      return true;
    };
    REQUIRE_MESSAGE(runner.wait_until(both_running, 300s), runner.output());
    std::string template_host_key;
    {
      auto manifest = nlohmann::json::parse(file_text(template_dir / "manifest.json"));
      auto hex = manifest.value("host_key_blob", std::string{});
      for (size_t i = 0; i + 1 < hex.size(); i += 2)
        template_host_key += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
    }
    REQUIRE_FALSE(template_host_key.empty());
    SshTarget with_template_key;
    with_template_key.user = "runner";
    with_template_key.private_key = file_text(template_dir / "key");
    for (const char* job : {"clone-a", "clone-b"}) {
      auto where = sandbox.state_detail(job, v1::WAITING_FOR_SSH);
      REQUIRE(where);
      with_template_key.port = static_cast<uint16_t>(std::stoi(where->substr(where->rfind(':') + 1)));
      auto refused = SshSession::connect(with_template_key, 20s);
      REQUIRE_FALSE(refused);
      CHECK_MESSAGE(contains(refused.error().message, "public key authentication"),
                    refused.error().message);
      // Nor is the template's host key what the clone presents.
      auto pinned = with_template_key;
      pinned.expected_host_key = template_host_key;
      auto other_key = SshSession::connect(pinned, 20s);
      REQUIRE_FALSE(other_key);
      CHECK_MESSAGE(contains(other_key.error().message, "host key mismatch"), other_key.error().message);
    }
    REQUIRE(runner.wait(300s));
    INFO(runner.output());

    std::map<std::string, Printed> printed;
    for (const char* job : {"clone-a", "clone-b"}) {
      auto result = sandbox.result(job);
      REQUIRE(result);
      CHECK(result->status() == v1::SUCCEEDED);
      CHECK(result->start() == "restored");
      printed[job] = printed_by(sandbox, job, 0);
    }
    const auto& pa = printed["clone-a"].values;
    const auto& pb = printed["clone-b"].values;
    // The template's public key: the base64 field of its key.pub line.
    auto template_line = file_text(template_dir / "key.pub");
    auto template_key = template_line.substr(template_line.find(' ') + 1);
    template_key = template_key.substr(0, template_key.find(' '));
    REQUIRE(template_key.size() > 40);
    for (const auto* p : {&pa, &pb}) {
      for (const char* key : {"NOW", "HOSTKEY", "AUTHKEYS", "RANDOM", "HOSTNAME", "INSTANCE"})
        REQUIRE_MESSAGE(!p->at(key).empty(), key);
      // The template's key is gone; only the job's own is there.
      CHECK_FALSE(contains(p->at("AUTHKEYS"), template_key));
      CHECK(std::count(p->at("AUTHKEYS").begin(), p->at("AUTHKEYS").end(), ',') == 1);
    }
    // Both took their identity over the identity port (the template has the agent).
    CHECK(listed_templates(sandbox.state())[0].value("identity_agent", false));
    for (const char* job : {"clone-a", "clone-b"})
      CHECK(has_phase(*sandbox.result(job), "ssh_ready"));
    CHECK(pa.at("HOSTKEY") != pb.at("HOSTKEY"));
    CHECK(pa.at("AUTHKEYS") != pb.at("AUTHKEYS"));
    CHECK(pa.at("RANDOM") != pb.at("RANDOM"));
    CHECK(pa.at("HOSTNAME") == "solstice-clone-a");
    CHECK(pb.at("HOSTNAME") == "solstice-clone-b");
    CHECK(pa.at("INSTANCE") == "solstice-clone-a");
    CHECK(pb.at("INSTANCE") == "solstice-clone-b");
    for (const char* job : {"clone-a", "clone-b"}) {
      const auto& p = printed[job];
      INFO(job);
      check_clock(p);
    }
    check_nothing_left(sandbox);
  }

  TEST_CASE("debug access to a failed restored job hands out the job's own key, never the template's") {
    Sandbox sandbox;
    give_template(sandbox);
    auto id = template_id(sandbox);
    auto job_json = guest_job("debugged", {"exit 3"});
    job_json["debug_on_failure"] = {{"enabled", true}, {"keep_seconds", 300}};
    auto job = sandbox.write_json("job.json", job_json);
    auto runner = Runner::start(sandbox.snapshot_run_args(job, "tcg"));
    auto held = [&] { return any_contains(sandbox.notices("debugged"), "debug-on-failure: the VM stays up"); };
    REQUIRE_MESSAGE(runner.wait_until(held, 300s), runner.output());
    auto where = sandbox.state_detail("debugged", v1::WAITING_FOR_SSH);
    REQUIRE(where);
    SshTarget target;
    target.user = "runner";
    target.port = static_cast<uint16_t>(std::stoi(where->substr(where->rfind(':') + 1)));
    // The key handed out gets in, and it is not the template's.
    target.private_key = file_text(sandbox.job_dir("debugged") / "debug-key");
    CHECK(target.private_key != file_text(sandbox.state() / "templates" / id / "key"));
    auto in = SshSession::connect(target, 30s);
    CHECK_MESSAGE(in, (in ? "" : in.error().message));
    target.private_key = file_text(sandbox.state() / "templates" / id / "key");
    CHECK_FALSE(SshSession::connect(target, 30s));
    runner.signal(SIGINT);
    REQUIRE(runner.wait(120s));
    check_nothing_left(sandbox);
  }

  TEST_CASE("a guest without the virtio-serial driver: its template has no identity agent, and clones take their identity over SSH") {
    Sandbox sandbox;
    // The test guest with virtio_console refused by its kernel (module_blacklist):
    // no identity port in the guest, as on an image without the driver.
    const auto guest = test_guest_dir();
    const auto cmdline = file_text(guest / "cmdline").substr(0, file_text(guest / "cmdline").find('\n'));
    auto config = sandbox.write_json(
      "config.json",
      {{"images",
        {{{"label", "no-vserial-guest"},
          {"disk", (guest / "disk.raw").string()},
          {"disk_format", "raw"},
          {"boot_mode", "BOOT_MODE_KERNEL"},
          {"kernel", (guest / "vmlinuz").string()},
          {"initrd", (guest / "initrd.img").string()},
          {"kernel_append", cmdline + " module_blacklist=virtio_console"},
          {"memory_mib", 256}}}}});
    auto job_json = guest_job("first", {"echo first"});
    job_json["runs_on"] = "no-vserial-guest";
    auto job = sandbox.write_json("job.json", job_json);
    auto first_run = run_to_end(sandbox.snapshot_run_args(job, "tcg", config), 600s);
    INFO(first_run.output());
    auto listed = listed_templates(sandbox.state());
    REQUIRE(listed.size() == 1);
    CHECK_FALSE(listed[0].value("identity_agent", true));
    CHECK_MESSAGE(contains(listed[0].value("identity_note", std::string{}), "no virtio-serial port"),
                  listed[0].dump());
    const auto template_dir = sandbox.state() / "templates" / listed[0].value("id", std::string{});
    auto template_line = file_text(template_dir / "key.pub");
    auto template_key = template_line.substr(template_line.find(' ') + 1);
    template_key = template_key.substr(0, template_key.find(' '));

    // A clone of it: the identity exec and the reconnect over SSH, and the set-up, as before.
    job_json = job_files_job(sandbox, "ssh-identity");
    job_json["runs_on"] = "no-vserial-guest";
    job_json["steps"].push_back({{"name", "identity"}, {"script", identity_script}});
    job = sandbox.write_json("job2.json", job_json);
    auto run = run_to_end(sandbox.snapshot_run_args(job, "tcg", config), 300s);
    INFO(run.output());
    auto result = sandbox.result("ssh-identity");
    REQUIRE(result);
    CHECK(result->status() == v1::SUCCEEDED);
    CHECK(result->start() == "restored");
    CHECK(has_phase(*result, "identity"));
    CHECK_FALSE(has_phase(*result, "ssh_ready"));
    CHECK(has_phase(*result, "setup"));
    check_job_files(sandbox, "ssh-identity");
    auto printed = printed_by(sandbox, "ssh-identity", 1);
    CHECK(printed.values["HOSTNAME"] == "solstice-ssh-identity");
    CHECK(printed.values["INSTANCE"] == "solstice-ssh-identity");
    CHECK_FALSE(contains(printed.values["AUTHKEYS"], template_key));
    check_clock(printed);
    check_nothing_left(sandbox);
  }

  TEST_CASE("a changed image gets a new template: the stale one is never restored") {
    Sandbox sandbox;
    // A copy of the test guest under a label of its own, whose disk then changes.
    const auto guest = test_guest_dir();
    for (const char* file : {"vmlinuz", "initrd.img", "disk.raw"})
      fs::copy_file(guest / file, sandbox.root() / file);
    auto config = sandbox.write_json(
      "config.json",
      {{"images",
        {{{"label", "copied-guest"},
          {"disk", (sandbox.root() / "disk.raw").string()},
          {"disk_format", "raw"},
          {"boot_mode", "BOOT_MODE_KERNEL"},
          {"kernel", (sandbox.root() / "vmlinuz").string()},
          {"initrd", (sandbox.root() / "initrd.img").string()},
          {"kernel_append", file_text(guest / "cmdline").substr(0, file_text(guest / "cmdline").find('\n'))},
          {"memory_mib", 256}}}}});
    auto job_json = guest_job("old-image", {"echo on the old image"});
    job_json["runs_on"] = "copied-guest";
    auto job = sandbox.write_json("job.json", job_json);
    run_to_end(sandbox.snapshot_run_args(job, "tcg", config), 600s);
    auto first = sandbox.result("old-image");
    REQUIRE(first);
    CHECK(first->start_note() == "template built first");
    auto old_templates = listed_templates(sandbox.state());
    REQUIRE(old_templates.size() == 1);
    auto old_id = old_templates[0].value("id", std::string{});

    // The image changes (a byte appended: another content, size and mtime).
    std::ofstream(sandbox.root() / "disk.raw", std::ios::app) << '\0';
    job_json["id"] = "new-image";
    job = sandbox.write_json("job2.json", job_json);
    auto run = run_to_end(sandbox.snapshot_run_args(job, "tcg", config), 600s);
    INFO(run.output());
    auto second = sandbox.result("new-image");
    REQUIRE(second);
    CHECK(second->status() == v1::SUCCEEDED);
    CHECK(second->start_note() == "template built first");
    CHECK_FALSE(any_contains(sandbox.notices("new-image"), old_id));
    CHECK(listed_templates(sandbox.state()).size() == 2);
    check_nothing_left(sandbox);
  }

  TEST_CASE("a corrupt state file falls back to a cold boot with a notice, and the template goes stale") {
    Sandbox sandbox;
    give_template(sandbox);
    auto id = template_id(sandbox);
    auto state_file = sandbox.state() / "templates" / id / "state";
    {
      std::fstream corrupt(state_file, std::ios::in | std::ios::out | std::ios::binary);
      corrupt.seekp(0);
      corrupt << std::string(4096, 'x');
    }
    auto job = sandbox.write_json("job.json", guest_job("fallback", {"echo still ran"}));
    auto run = run_to_end(sandbox.snapshot_run_args(job, "tcg"), 600s);
    INFO(run.output());
    auto result = sandbox.result("fallback");
    REQUIRE(result);
    CHECK(result->status() == v1::SUCCEEDED);
    CHECK(result->start() == "cold");
    CHECK(result->start_note().rfind("restore failed", 0) == 0);
    CHECK(sandbox.step_output("fallback", 0) == "still ran\n");
    CHECK(any_contains(sandbox.notices("fallback"), "restoring template " + id + " failed"));
    auto listed = listed_templates(sandbox.state());
    REQUIRE(listed.size() == 1);
    CHECK_FALSE(listed[0].value("stale", std::string{}).empty());
    check_nothing_left(sandbox);
  }
}

// Uploads over uploads_iso_min_bytes in all travel on a read-only ISO (README
// "Uploads"): attached at boot on a cold start, inserted by QMP into a restored
// clone. What lands in the guest is what SFTP would give: the bytes (sha256), the
// mode, the owner; directories made; nothing mounted afterwards; a destination that
// cannot be written fails the job naming that upload; the ISO goes with the VM.
namespace {

const char* iso_upload_script =
  "echo BIG=$(sha256sum /opt/iso-up/big.bin | cut -d' ' -f1)\n"
  "echo BIGSTAT=$(stat -c '%a %U %s' /opt/iso-up/big.bin)\n"
  "echo TOOLSTAT=$(stat -c '%a %U' /tmp/iso-up/tool.sh)\n"
  "echo TOOL=$(/tmp/iso-up/tool.sh)\n"
  "echo MOUNTED=$(grep -c uploads-iso /proc/mounts)\n";

std::string random_bytes(size_t size) {
  std::string bytes(size, '\0');
  std::ifstream("/dev/urandom", std::ios::binary).read(bytes.data(), static_cast<std::streamsize>(size));
  return bytes;
}

std::string sha256_of(const fs::path& path) {
  std::string sum(64, '\0');
  FILE* pipe = ::popen(("sha256sum '" + path.string() + "'").c_str(), "r");
  REQUIRE(pipe);
  sum.resize(std::fread(sum.data(), 1, sum.size(), pipe));
  ::pclose(pipe);
  return sum;
}

nlohmann::json iso_upload_job(const Sandbox& sandbox, const std::string& id, const fs::path& big) {
  auto job = guest_job(id, {iso_upload_script});
  auto tool = sandbox.write("tool-" + id + ".sh", "#!/bin/sh\necho tool ran\n");
  job["uploads"] = {{{"source", big.string()}, {"destination", "/opt/iso-up/big.bin"}, {"mode", 0640}},
                    {{"source", tool.string()}, {"destination", "/tmp/iso-up/tool.sh"}, {"mode", 0755}}};
  return job;
}

// `by_iso`: the ISO was used; otherwise the uploads fell back to SFTP.
void check_iso_uploads(const Sandbox& sandbox, const std::string& id, const fs::path& big, bool by_iso = true) {
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::SUCCEEDED);
  CHECK(has_phase(*result, "uploads_iso"));  // the ISO was tried first
  if (by_iso)
    for (const auto& notice : sandbox.notices(id))
      CHECK_FALSE(contains(notice, "SFTP"));
  auto printed = printed_by(sandbox, id, 0);
  CHECK(printed.values["BIG"] == sha256_of(big));
  CHECK(printed.values["BIGSTAT"] == "640 runner " + std::to_string(fs::file_size(big)));
  CHECK(printed.values["TOOLSTAT"] == "755 runner");
  CHECK(printed.values["TOOL"] == "tool ran");
  CHECK(printed.values["MOUNTED"] == "0");
}

}  // namespace

TEST_SUITE("templates") {
  TEST_CASE("uploads over the ISO threshold go by ISO, cold and restored, as SFTP would place them") {
    REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
    Sandbox sandbox;
    give_template(sandbox);
    const auto big = sandbox.write("big.bin", random_bytes(9u << 20));

    SUBCASE("cold: the ISO is in the uploads drive from the boot") {
      auto job = sandbox.write_json("job.json", iso_upload_job(sandbox, "iso-cold", big));
      auto run = run_to_end(sandbox.run_args(job, "tcg"), 300s);
      INFO(run.output());
      CHECK(sandbox.result("iso-cold")->start() == "cold");
      check_iso_uploads(sandbox, "iso-cold", big);
    }
    SUBCASE("restored: the ISO is inserted into the clone's empty drive") {
      auto job = sandbox.write_json("job.json", iso_upload_job(sandbox, "iso-restored", big));
      auto run = run_to_end(sandbox.snapshot_run_args(job, "tcg"), 300s);
      INFO(run.output());
      CHECK(sandbox.result("iso-restored")->start() == "restored");
      check_iso_uploads(sandbox, "iso-restored", big);
    }
    SUBCASE("a guest that finds no uploads ISO says so, and the uploads go over SFTP") {
      // The real QEMU with the uploads drive left empty.
      auto wrapper = sandbox.write("qemu-no-uploads-iso",
                                   "#!/bin/sh\n"
                                   "for arg do\n"
                                   "  shift\n"
                                   "  case \"$arg\" in if=none,id=uploads-medium,*) arg=if=none,id=uploads-medium,readonly=on ;; esac\n"
                                   "  set -- \"$@\" \"$arg\"\n"
                                   "done\n"
                                   "exec qemu-system-x86_64 \"$@\"\n");
      fs::permissions(wrapper, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                 fs::perms::others_read | fs::perms::others_exec);
      auto config = sandbox.write_json("config.json", {{"qemu_binary", wrapper.string()}});
      auto job = sandbox.write_json("job.json", iso_upload_job(sandbox, "iso-fallback", big));
      auto run = run_to_end(sandbox.run_args(job, "tcg", config), 300s);
      INFO(run.output());
      check_iso_uploads(sandbox, "iso-fallback", big, false);
      CHECK(any_contains(sandbox.notices("iso-fallback"),
                         "the uploads ISO cannot be used in this guest (no CD-ROM drive holds the volume "
                         "SOLSTICEUPLOADS): the uploads go over SFTP"));
    }
    SUBCASE("a destination that cannot be written fails the job, naming the upload") {
      auto job_json = iso_upload_job(sandbox, "iso-bad", big);
      job_json["uploads"][1]["destination"] = "/etc";  // a directory
      auto job = sandbox.write_json("job.json", job_json);
      auto run = run_to_end(sandbox.run_args(job, "tcg"), 300s);
      INFO(run.output());
      auto result = sandbox.result("iso-bad");
      REQUIRE(result);
      CHECK(result->status() == v1::FAILED);
      CHECK(has_phase(*result, "uploads_iso"));
      CHECK_MESSAGE(contains(result->error(), "upload " + (sandbox.root() / "tool-iso-bad.sh").string() + " -> /etc: "),
                    result->error());
      CHECK_MESSAGE(contains(result->error(), "Is a directory"), result->error());
    }
    check_nothing_left(sandbox);  // the ISO went with the VM's work directory
  }
}
