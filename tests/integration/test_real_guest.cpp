// The runner against a real cloud image (deploy/test-guest/cloud/build.sh: Debian
// bookworm, systemd, cloud-init, OpenSSH), configured by nothing but cloud-init from
// the runner's NoCloud seed. One `solstice-runner run` of the real binary, one boot
// (about a minute under TCG), and every assertion on that one job: steps, output,
// exit code, upload and artifact; the user is the one cloud-init created from the
// seed; the host key the runner pinned is the seed's, also after cloud-init
// restarted sshd; the first step starts only once cloud-init is done. Then restored
// clones of a template of that image, two at once: the identity the runner gives
// them through OpenSSH (host key, authorized key, hostname, clock).
// ctest label `real-guest` (doctest suite real_guest), apart from `integration`.
#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/base/shell.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "solstice.pb.h"
#include "tests/integration/guest_fixture.hpp"

using namespace solstice;
using namespace solstice::testing;
using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A cold boot of the cloud image takes 40 s on a quiet 2-core host under TCG and
// 90-170 s on a loaded one (over 300 s, the default boot timeout, at a load of
// 11); cloud-init, the steps and the power-down follow.
constexpr unsigned boot_timeout_seconds = 900;
constexpr auto run_limit = 1500s;

fs::path cloud_guest_directory() { return fs::path(SOLSTICE_TEST_GUEST_DIR) / "cloud"; }

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

void write_file(const fs::path& path, const std::string& bytes, fs::perms perms = fs::perms::owner_read | fs::perms::owner_write) {
  {
    std::ofstream file(path, std::ios::binary);
    file << bytes;
    REQUIRE_MESSAGE(file.good(), "cannot write " << path.string());
  }
  fs::permissions(path, perms);
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// The cloud guest's disk from its manifest; a missing build says how to make it.
fs::path cloud_guest_disk() {
  const auto manifest = cloud_guest_directory() / "guest.json";
  REQUIRE_MESSAGE(fs::exists(manifest),
                  "the cloud-image test guest is not built: " << manifest.string()
                    << " does not exist. Build it (as root) with: deploy/test-guest/cloud/build.sh "
                    << cloud_guest_directory().string());
  auto parsed = json::parse(read_file(manifest), nullptr, false);
  REQUIRE_MESSAGE((parsed.is_object() && parsed.contains("disk")), manifest.string() << " has no \"disk\"");
  auto disk = cloud_guest_directory() / parsed["disk"].get<std::string>();
  REQUIRE_MESSAGE(fs::exists(disk), disk.string() << " is missing: rebuild the cloud-image test guest");
  return disk;
}

struct RunnerRun {
  std::optional<ExitStatus> status;
  std::string out, err;
  int exit_code() const { return status && !status->signaled ? status->code : -1; }
  std::string describe() const {
    return (status ? status->describe() : std::string("no exit within the limit")) +
           "\n--- stdout (tail) ---\n" + out.substr(out.size() > 4000 ? out.size() - 4000 : 0) +
           "\n--- stderr (tail) ---\n" + err.substr(err.size() > 4000 ? err.size() - 4000 : 0);
  }
};

// Runs the runner binary of this build to its end (killed by PID at the limit),
// reading both pipes as it goes.
RunnerRun run_runner(const std::vector<std::string>& args) {
  std::vector<std::string> argv{(fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner").string()};
  argv.insert(argv.end(), args.begin(), args.end());
  auto child = ChildProcess::spawn(argv);
  REQUIRE_MESSAGE(child.has_value(), why(child));
  RunnerRun run;
  const auto deadline = std::chrono::steady_clock::now() + run_limit;
  while (!run.status) {
    pollfd fds[2] = {{child->stdout_fd(), POLLIN, 0}, {child->stderr_fd(), POLLIN, 0}};
    ::poll(fds, 2, 200);
    run.out += read_available(child->stdout_fd());
    run.err += read_available(child->stderr_fd());
    run.status = child->try_wait();
    if (!run.status && std::chrono::steady_clock::now() > deadline) {
      child->kill(SIGKILL);
      child->wait_for(10s);
      break;
    }
  }
  run.out += read_available(child->stdout_fd());
  run.err += read_available(child->stderr_fd());
  return run;
}

// The bytes of step `step` on `stream`, from the job's events.
std::string step_output(const std::vector<v1::JobEvent>& events, uint32_t step, v1::OutputStream stream) {
  std::string bytes;
  for (const auto& event : events)
    if (event.has_output() && event.output().step_index() == step && event.output().stream() == stream)
      bytes += event.output().data();
  return bytes;
}

// "KEY=value" lines a step printed, as a map.
std::map<std::string, std::string> key_values(const std::string& text) {
  std::map<std::string, std::string> values;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);)
    if (auto eq = line.find('='); eq != std::string::npos)
      values[line.substr(0, eq)] = line.substr(eq + 1);
  return values;
}

// The job records of a state dir, by job id.
std::map<std::string, fs::path> job_records(const fs::path& state_dir) {
  std::map<std::string, fs::path> records;
  for (const auto& entry : fs::directory_iterator(state_dir / "jobs"))
    records[entry.path().filename().string()] = entry.path();
  return records;
}

// The ed25519 host public key ("ssh-ed25519 BASE64") in the seed's user-data.
std::string seed_host_key(const fs::path& iso, const fs::path& scratch) {
  const auto out = scratch / "seed-user-data";
  const std::string command = "xorriso -osirrox on -indev " + shell_quote(iso.string()) +
                              " -extract /user-data " + shell_quote(out.string()) + " >/dev/null 2>&1";
  REQUIRE_MESSAGE(std::system(command.c_str()) == 0, "cannot extract user-data from " << iso.string());
  std::smatch match;
  const auto user_data = read_file(out);
  REQUIRE_MESSAGE(std::regex_search(user_data, match, std::regex("ed25519_public: (ssh-ed25519 [A-Za-z0-9+/=]+)")),
                  "no ed25519_public in the seed's user-data:\n" << user_data);
  return match[1];
}

}  // namespace

TEST_SUITE("real_guest") {

TEST_CASE("a job on the real cloud image: cloud-init's user and the seed's host key, steps after cloud-init, upload, artifact, exit code") {
  const auto disk = cloud_guest_disk();
  auto made = TempDir::make("solstice-real-guest-");
  REQUIRE_MESSAGE(made.has_value(), why(made));
  TempDir temp = std::move(*made);
  const auto state_dir = temp.path() / "state";

  // QEMU is started through this wrapper, which keeps a copy of the seed ISO the
  // runner made (the runner removes its own with the VM). QEMU may run as another
  // user (qemu_user), so the copy's directory is open to it.
  const auto seed_copy_dir = temp.path() / "seed-copy";
  fs::create_directory(seed_copy_dir);
  fs::permissions(seed_copy_dir, fs::perms::all);
  const auto wrapper = temp.path() / "qemu-keeping-the-seed";
  write_file(wrapper,
             "#!/bin/sh\n"
             "for arg in \"$@\"; do\n"
             "  case \"$arg\" in\n"
             "    file=*,if=ide,media=cdrom,*) seed=${arg#file=}; cp \"${seed%%,if=ide,*}\" " +
               shell_quote((seed_copy_dir / "seed.iso").string()) + " ;;\n"
             "  esac\n"
             "done\n"
             "exec qemu-system-x86_64 \"$@\"\n",
             fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read |
               fs::perms::others_exec);

  const auto config = temp.path() / "config.json";
  write_file(config, json{{"qemu_binary", wrapper.string()},
                          {"boot_timeout_seconds", boot_timeout_seconds},
                          {"images", json::array({json{{"label", "debian-12-cloud"},
                                                       {"disk", disk.string()},
                                                       {"user", "runner"},
                                                       {"memory_mib", 512}}})}}
                       .dump(2));
  // 9 MiB: over uploads_iso_min_bytes, so it travels on the uploads ISO (a cold
  // boot: in the drive from the start), which the real image's sudo mounts.
  std::string payload;
  for (int i = 0; i < 9 * 1024 * 1024; ++i) payload += static_cast<char>((i * 7919) & 0xff);
  write_file(temp.path() / "payload.bin", payload);

  const auto job_file = temp.path() / "job.json";
  write_file(job_file, json{
    {"name", "real guest"},
    {"runs_on", "debian-12-cloud"},
    {"env", {{"GREETING", "hello from the cloud image"}}},
    {"uploads", json::array({json{{"source", (temp.path() / "payload.bin").string()},
                                  {"destination", "/tmp/in/payload.bin"}}})},
    {"steps", json::array({
      json{{"name", "who and what"},
           {"script",
            // cloud-init's state as the first step finds it, then what cloud-init made.
            "echo \"cloud_init=$(cloud-init status | sed -n 's/^status: //p')\"\n"
            "echo \"user=$(id -un) uid=$(id -u)\"\n"
            "echo \"passwd=$(getent passwd \"$(id -un)\")\"\n"
            "echo \"hostname=$(hostname)\"\n"
            "echo \"sudo=$(sudo -n id -un)\"\n"
            "echo \"created_by_cloud_init=$(sudo -n grep -c \"Adding user $(id -un)\" /var/log/cloud-init.log)\"\n"
            "echo \"sshd_restarts=$(sudo -n grep -c 'Restarted the SSH daemon' /var/log/cloud-init.log)\"\n"
            "echo \"host_key=$(sudo -n cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)\"\n"
            "echo \"host_keys=$(ls /etc/ssh | grep -c '^ssh_host_.*_key$')\"\n"
            "echo \"greeting=$GREETING\"\n"
            "echo \"payload=$(stat -c '%a %U:%G' /tmp/in/payload.bin)\"\n"
            "echo \"mounted=$(grep -c uploads-iso /proc/mounts)\"\n"
            // For the log: sshd's logins and restarts this boot (on stderr).
            "sudo -n journalctl -b -o short-monotonic --no-pager -u ssh.service "
            "| grep -E 'Accepted publickey|Stopping|Started' >&2 || true\n"}},
      json{{"name", "artifact"},
           {"script", "mkdir -p /tmp/out && cp /tmp/in/payload.bin /tmp/out/copy.bin && echo copied >&2"}},
      json{{"name", "last"}, {"script", "echo the end; exit 7"}},
    })},
    {"artifacts", json::array({json{{"path", "/tmp/out/copy.bin"}}})},
  }.dump(2));

  // A cold boot: this case is about real cloud-init at boot (restored clones are below).
  auto run = run_runner({"run", job_file.string(), "--config", config.string(), "--state-dir",
                         state_dir.string(), "--accel", "tcg", "--cold"});
  INFO(run.describe());
  REQUIRE(run.status.has_value());
  // The last step's exit code is the job's.
  CHECK(run.exit_code() == 7);

  std::vector<fs::path> jobs;
  for (const auto& entry : fs::directory_iterator(state_dir / "jobs")) jobs.push_back(entry.path());
  REQUIRE(jobs.size() == 1);
  const auto record = jobs.front();
  v1::JobResult result;
  REQUIRE(google::protobuf::util::JsonStringToMessage(read_file(record / "result.json"), &result).ok());
  auto events = read_event_log(record / "events.jsonl");
  REQUIRE_MESSAGE(events.has_value(), why(events));
  INFO("console tail:\n" << file_tail(record / "console.log", 3000));

  CHECK(result.status() == v1::FAILED);
  CHECK(result.exit_code() == 7);
  REQUIRE(result.steps_size() == 3);
  CHECK(result.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(result.steps(1).outcome() == v1::STEP_SUCCEEDED);
  CHECK(result.steps(2).outcome() == v1::STEP_FAILED);
  CHECK(result.steps(2).exit_code() == 7);
  CHECK(result.shutdown_method() == "powerdown");
  // The wait for cloud-init has its own phase, between the boot and the steps.
  bool setup_phase = false;
  for (const auto& timing : result.phases()) setup_phase |= timing.phase() == "setup";
  CHECK(setup_phase);
  // The upload went on the uploads ISO, not over SFTP, and landed as SFTP puts it.
  bool uploads_iso_phase = false;
  for (const auto& timing : result.phases()) uploads_iso_phase |= timing.phase() == "uploads_iso";
  CHECK(uploads_iso_phase);
  CHECK(step_output(*events, 1, v1::STDERR) == "copied\n");
  CHECK(step_output(*events, 2, v1::STDOUT) == "the end\n");

  // Upload in, artifact out (collected after the failing step), byte for byte.
  REQUIRE(result.artifacts_size() == 1);
  CHECK(read_file(result.artifacts(0)) == payload);

  auto seen = key_values(step_output(*events, 0, v1::STDOUT));
  MESSAGE("sshd this boot (guest's monotonic clock):\n" << step_output(*events, 0, v1::STDERR));
  // The first step starts after cloud-init has finished, and it finished cleanly
  // (no notice of cloud-init errors).
  CHECK(seen["cloud_init"] == "done");
  for (const auto& event : *events)
    if (event.has_notice()) CHECK_FALSE(contains(event.notice().message(), "cloud-init"));
  // The user the steps run as is the seed's, made by cloud-init (the image has
  // none), with the seed's shell and passwordless sudo.
  CHECK(seen["user"] == "runner uid=1000");
  CHECK(seen["passwd"] == "runner:x:1000:1000::/home/runner:/bin/sh");
  CHECK_MESSAGE(seen["created_by_cloud_init"] == "1", "cloud-init.log does not say it added the user");
  CHECK(seen["sudo"] == "root");
  CHECK(seen["hostname"] == "solstice-" + result.job_id());
  CHECK(seen["greeting"] == "hello from the cloud image");
  CHECK(seen["payload"] == "644 runner:runner");
  CHECK(seen["mounted"] == "0");
  // cloud-init restarted sshd during this boot (the case the runner must live
  // with); the key the guest serves after it is the one of the runner's seed,
  // which the runner pinned (it refuses any other), and the only one there is.
  CHECK_MESSAGE(seen["sshd_restarts"] == "1",
                "cloud-init did not restart sshd this boot, so the case this test is for did not "
                "happen (cloud-init's set-passwords restarts it when ssh_pwauth changes sshd_config)");
  const auto seed_iso = seed_copy_dir / "seed.iso";
  REQUIRE_MESSAGE(fs::exists(seed_iso), "the QEMU wrapper kept no copy of the seed");
  CHECK(seen["host_key"] == seed_host_key(seed_iso, temp.path()));
  CHECK(seen["host_keys"] == "1");

  // Nothing of the VM is left.
  CHECK(processes_mentioning(state_dir.string()).empty());
  std::error_code ec;
  CHECK((!fs::exists(state_dir / "run", ec) || fs::is_empty(state_dir / "run", ec)));
}

TEST_CASE("restored clones of the real cloud image: OpenSSH serves a new host key of each clone's own, only the job's key is authorized, own hostname, the host's clock") {
  const auto disk = cloud_guest_disk();
  auto made = TempDir::make("solstice-real-guest-");
  REQUIRE_MESSAGE(made.has_value(), why(made));
  TempDir temp = std::move(*made);
  const auto state_dir = temp.path() / "state";
  const auto config = temp.path() / "config.json";
  write_file(config, json{{"boot_timeout_seconds", boot_timeout_seconds},
                          {"images", json::array({json{{"label", "debian-12-cloud"},
                                                       {"disk", disk.string()},
                                                       {"user", "runner"},
                                                       {"memory_mib", 512}}})}}
                       .dump(2));
  const std::vector<std::string> where{"--config", config.string(), "--state-dir", state_dir.string(),
                                       "--accel", "tcg"};
  auto with = [&](std::vector<std::string> args) {
    args.insert(args.end(), where.begin(), where.end());
    return args;
  };
  // The template: a cold boot configured by cloud-init, frozen once cloud-init is done.
  auto built = run_runner(with({"template", "build", "debian-12-cloud"}));
  INFO("template build: " << built.describe());
  REQUIRE(built.exit_code() == 0);
  std::vector<fs::path> templates;
  for (const auto& entry : fs::directory_iterator(state_dir / "templates"))
    if (fs::exists(entry.path() / "manifest.json")) templates.push_back(entry.path());
  REQUIRE(templates.size() == 1);
  const auto manifest = json::parse(read_file(templates[0] / "manifest.json"));
  std::string template_host_blob;
  const auto hex = manifest.value("host_key_blob", std::string{});
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    template_host_blob += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  REQUIRE_FALSE(template_host_blob.empty());
  const auto template_pub = read_file(templates[0] / "key.pub");
  const auto template_key = template_pub.substr(template_pub.find(' ') + 1, 68);  // its base64
  // systemd's udev loads virtio_console: the template runs the identity agent (the
  // perl one: Debian has perl), and each clone takes its identity over its
  // virtio-serial port before any SSH.
  CHECK_MESSAGE(manifest.value("identity_agent", false), manifest.dump());
  // cloud-init ended cleanly in the template's guest (real cloud-init's status):
  // no clone is told otherwise.
  CHECK_MESSAGE(manifest.contains("cloud_init_errors"), manifest.dump());
  CHECK_FALSE(manifest.value("cloud_init_errors", true));

  // Two clones at once; the clock is read first.
  const char* identity =
    "echo NOW=$(date +%s)\n"
    "echo HOSTKEY=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)\n"
    "echo SERVED=$(ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | cut -d' ' -f3)\n"
    "echo HOSTKEYS=$(ls /etc/ssh | grep -c '^ssh_host_.*_key$')\n"
    "echo AUTHKEYS=$(cut -d' ' -f2 ~/.ssh/authorized_keys | tr '\\n' ,)\n"
    "echo HOSTNAME=$(hostname)\n"
    "echo INSTANCE=$(cat /run/instance-id)\n"
    "echo CLOUD_INSTANCE=$(cat /var/lib/cloud/data/instance-id)\n"
    "echo RANDOM=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')\n"
    // The job's files, made by the identity agent (as root) for the job's user.
    "echo ME=$(id -u):$(id -g)\n"
    "echo STAGE=\"$STAGE\"\n"
    "[ \"$TOKEN\" = \"s3cr'et \\$x\" ] && echo SECRET=same || echo SECRET=differs\n"
    "echo JOBDIR=$(stat -c '%a %u:%g' /tmp/solstice)\n"
    "echo ENVFILE=$(stat -c '%a %u:%g' /tmp/solstice/env)\n"
    // The step's own script, written by the agent (the step only runs it).
    "echo SCRIPT=$(stat -c '%a %u:%g' /tmp/solstice/step-1)\n"
    "echo UPDIR=$(stat -c '%a %u:%g' /home/runner/job-tools /home/runner/job-tools/bin | tr '\\n' ' ')\n"
    "echo UPLOAD=$(cat /home/runner/job-tools/bin/tool.txt)\n"
    // Guest seconds (its monotonic clock, which stands still while a VM is saved)
    // from the template's SSH session's close to the clone's first journal line under
    // its own hostname: the state was saved once the guest was idle, so the close is
    // not left for the clone to finish.
    R"SH(echo QUIET_GAP=$(sudo -n journalctl -o short-monotonic --no-pager -q | awk -v h="$(hostname)" '
      { line = $0; sub(/^\[ */, "", line); split(line, f, /[] ]+/) }
      /sshd\[[0-9]+\]: pam_unix\(sshd:session\): session closed for user/ { closed = f[1] }
      f[2] == h && first == "" { first = f[1] }
      END { if (closed != "" && first != "") printf "%.3f", first - closed }'))SH" "\n";
  const auto tool = temp.path() / "tool.txt";
  write_file(tool, "uploaded\n");
  std::vector<std::string> args{"run"};
  for (const char* id : {"cloud-clone-a", "cloud-clone-b"}) {
    const auto file = temp.path() / (std::string(id) + ".json");
    write_file(file, json{{"id", id}, {"runs_on", "debian-12-cloud"},
                          {"env", {{"STAGE", "ci 'quoted'"}}},
                          {"secrets", {{"TOKEN", "s3cr'et $x"}}},
                          {"uploads", json::array({json{{"source", tool.string()},
                                                        {"destination", "/home/runner/job-tools/bin/tool.txt"}}})},
                          {"steps", json::array({json{{"name", "identity"}, {"script", identity}}})}}
                       .dump(2));
    args.push_back(file.string());
  }
  auto run = run_runner(with(args));
  INFO("run: " << run.describe());
  REQUIRE(run.exit_code() == 0);
  CHECK(run.out.find("cloud-init finished with errors") == std::string::npos);

  std::map<std::string, std::map<std::string, std::string>> seen;
  const auto records = job_records(state_dir);
  for (const char* id : {"cloud-clone-a", "cloud-clone-b"}) {
    REQUIRE(records.count(id) == 1);
    v1::JobResult result;
    REQUIRE(google::protobuf::util::JsonStringToMessage(read_file(records.at(id) / "result.json"), &result).ok());
    CHECK(result.status() == v1::SUCCEEDED);
    CHECK(result.start() == "restored");
    bool one_handshake = false;  // the phases of the identity port's path
    bool setup = false;          // the agent made the job's files: no set-up exec
    for (const auto& phase : result.phases()) {
      one_handshake |= phase.phase() == "ssh_ready";
      setup |= phase.phase() == "setup";
    }
    CHECK(one_handshake);
    CHECK_FALSE(setup);
    auto events = read_event_log(records.at(id) / "events.jsonl");
    REQUIRE_MESSAGE(events.has_value(), why(events));
    auto& values = seen[id] = key_values(step_output(*events, 0, v1::STDOUT));
    // The guest's clock against the host's, read between the step's start and its
    // first output's arrival (seconds apart on a loaded machine).
    int64_t started_s = 0, output_s = 0;
    for (const auto& event : *events) {
      if (event.has_step_started() && event.step_started().step_index() == 0)
        started_s = event.timestamp_us() / 1000000;
      if (event.has_output() && !output_s) output_s = event.timestamp_us() / 1000000;
    }
    INFO(id << ": " << step_output(*events, 0, v1::STDOUT));
    INFO("host " << started_s << " (step started) to " << output_s << " (first output)");
    REQUIRE(started_s > 0);
    CHECK(std::stoll(values["NOW"]) >= started_s - 2);
    CHECK(std::stoll(values["NOW"]) <= output_s + 2);
    // sshd serves the key in /etc/ssh (reloaded), the only one, not the template's.
    CHECK(values["HOSTKEY"].size() > 40);
    CHECK(values["SERVED"] == values["HOSTKEY"]);
    CHECK(values["HOSTKEYS"] == "1");
    CHECK(values["HOSTKEY"] != base64_encode(template_host_blob));
    // Only the job's own key is authorized; the template's is gone.
    CHECK(std::count(values["AUTHKEYS"].begin(), values["AUTHKEYS"].end(), ',') == 1);
    CHECK_FALSE(contains(values["AUTHKEYS"], template_key));
    CHECK(values["HOSTNAME"] == std::string("solstice-") + id);
    CHECK(values["INSTANCE"] == std::string("solstice-") + id);
    CHECK(values["CLOUD_INSTANCE"] == std::string("solstice-") + id);
    // The job's files as the set-up made them as the job's user (uid 1000 here).
    CHECK(values["ME"] != "0:0");
    CHECK(values["STAGE"] == "ci 'quoted'");
    CHECK(values["SECRET"] == "same");
    CHECK(values["JOBDIR"] == "700 " + values["ME"]);
    CHECK(values["ENVFILE"] == "600 " + values["ME"]);
    CHECK(values["SCRIPT"] == "755 " + values["ME"]);
    CHECK(values["UPDIR"] == "700 " + values["ME"] + " 700 " + values["ME"]);
    CHECK(values["UPLOAD"] == "uploaded");
    REQUIRE_FALSE(values["QUIET_GAP"].empty());
    CHECK(std::stod(values["QUIET_GAP"]) >= 0.4);
  }
  CHECK(seen["cloud-clone-a"]["HOSTKEY"] != seen["cloud-clone-b"]["HOSTKEY"]);
  CHECK(seen["cloud-clone-a"]["AUTHKEYS"] != seen["cloud-clone-b"]["AUTHKEYS"]);
  // The kernel RNG was reseeded in each clone (its template's state is shared).
  CHECK(seen["cloud-clone-a"]["RANDOM"].size() == 64);
  CHECK(seen["cloud-clone-a"]["RANDOM"] != seen["cloud-clone-b"]["RANDOM"]);

  // Uploads over uploads_iso_min_bytes go into a clone on the ISO QEMU inserts
  // into its drive; the guest's one root shell mounts it and copies as the job's
  // user: what the user may write lands as the user's, what it may not fails the
  // job, naming the upload.
  const auto big = temp.path() / "big.bin";
  write_file(big, std::string(9u << 20, 'b'));
  for (const char* destination : {"/home/runner/in/big.bin", "/root/big.bin"}) {
    const auto file = temp.path() / "iso-clone.json";
    write_file(file, json{{"id", "cloud-iso-clone"}, {"runs_on", "debian-12-cloud"},
                          {"uploads", json::array({json{{"source", big.string()}, {"destination", destination}}})},
                          {"steps", json::array({json{{"name", "stat"},
                                                      {"script", "stat -c '%s %a %U:%G' /home/runner/in/big.bin; "
                                                                 "grep -c uploads-iso /proc/mounts || :"}}})}}
                       .dump(2));
    auto iso_run = run_runner(with({"run", "--replace", file.string()}));
    INFO(destination << ": " << iso_run.describe());
    const auto iso_records = job_records(state_dir);
    REQUIRE(iso_records.count("cloud-iso-clone") == 1);
    v1::JobResult result;
    REQUIRE(google::protobuf::util::JsonStringToMessage(
              read_file(iso_records.at("cloud-iso-clone") / "result.json"), &result).ok());
    CHECK(result.start() == "restored");
    bool iso_phase = false;
    for (const auto& phase : result.phases()) iso_phase |= phase.phase() == "uploads_iso";
    CHECK(iso_phase);
    if (std::string(destination) == "/root/big.bin") {
      CHECK(result.status() == v1::FAILED);
      CHECK_MESSAGE(contains(result.error(), " -> /root/big.bin: "), result.error());
      CHECK_MESSAGE(contains(result.error(), "Permission denied"), result.error());
    } else {
      CHECK(result.status() == v1::SUCCEEDED);
      auto events = read_event_log(iso_records.at("cloud-iso-clone") / "events.jsonl");
      REQUIRE_MESSAGE(events.has_value(), why(events));
      CHECK(step_output(*events, 0, v1::STDOUT) == std::to_string(9u << 20) + " 644 runner:runner\n0\n");
    }
  }
  CHECK(processes_mentioning(state_dir.string()).empty());
}

}  // TEST_SUITE
