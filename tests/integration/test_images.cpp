// Images by URL, on the real binary: an HTTP server started here on 127.0.0.1
// serves the test guest's disk converted to qcow2; `image pull` checks its sha256
// (a wrong one leaves nothing in the cache), `image list/verify/rm` look after the
// cache, and jobs run on the pulled label and on a configured label pulled on first
// use (real QEMU). Then UEFI: the UEFI-only twin of the test guest boots with
// `firmware: uefi` and does not boot without it.
#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/vm/image_cache.hpp"
#include "tests/integration/guest_fixture.hpp"

using namespace solstice;
using namespace solstice::testing;
using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

fs::path runner_binary() { return fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner"; }

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE_MESSAGE(out.good(), "cannot write " << path);
}

struct Outcome {
  int code = -1;  // -1: killed by a signal or did not end in time
  std::string out, err;
  std::string describe() const { return "--- stdout ---\n" + out.substr(0, 6000) + "\n--- stderr ---\n" + err.substr(0, 6000); }
};

// Runs `solstice-runner ARGS` to its end (killed at `limit`).
Outcome run_runner(const std::vector<std::string>& args, std::chrono::seconds limit = 60s) {
  std::vector<std::string> argv{runner_binary().string()};
  argv.insert(argv.end(), args.begin(), args.end());
  auto child = ChildProcess::spawn(argv);
  REQUIRE_MESSAGE(child.has_value(), why(child));
  Outcome outcome;
  std::optional<ExitStatus> status;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!status && std::chrono::steady_clock::now() < deadline) {
    pollfd fds[2] = {{child->stdout_fd(), POLLIN, 0}, {child->stderr_fd(), POLLIN, 0}};
    ::poll(fds, 2, 100);
    outcome.out += read_available(child->stdout_fd());
    outcome.err += read_available(child->stderr_fd());
    status = child->try_wait();
  }
  if (!status) {
    child->kill(SIGKILL);
    child->wait_for(10s);
    return outcome;
  }
  outcome.out += read_available(child->stdout_fd());
  outcome.err += read_available(child->stderr_fd());
  outcome.code = status->signaled ? -1 : status->code;
  return outcome;
}

// python3's http.server on 127.0.0.1, on a port it picks itself (read from its
// first line), serving `dir`; stopped by its PID when this goes.
struct HttpServer {
  ChildProcess child;
  unsigned port = 0;

  explicit HttpServer(const fs::path& dir) {
    auto spawned = ChildProcess::spawn({"python3", "-u", "-m", "http.server", "--bind", "127.0.0.1",
                                        "--directory", dir.string(), "0"});
    REQUIRE_MESSAGE(spawned.has_value(), why(spawned));
    child = std::move(*spawned);
    std::string said;
    std::smatch match;
    const std::regex serving("port ([0-9]+)");
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!std::regex_search(said, match, serving) && std::chrono::steady_clock::now() < deadline) {
      pollfd fds[1] = {{child.stdout_fd(), POLLIN, 0}};
      ::poll(fds, 1, 100);
      said += read_available(child.stdout_fd());
      REQUIRE_MESSAGE(child.running(), "http.server ended: " << said << read_available(child.stderr_fd()));
    }
    REQUIRE_MESSAGE(!match.empty(), "http.server did not say its port: " << said);
    port = static_cast<unsigned>(std::stoul(match[1].str()));
  }
  ~HttpServer() {
    child.kill(SIGTERM);
    child.wait_for(5s);
  }
  std::string url(const std::string& name) const { return "http://127.0.0.1:" + std::to_string(port) + "/" + name; }
};

std::vector<fs::path> files_under(const fs::path& dir) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (const auto& entry : fs::recursive_directory_iterator(dir, ec))
    if (entry.is_regular_file()) found.push_back(entry.path());
  return found;
}

// A job of one step that prints `marker`, on `label`.
json job_on(const std::string& label, const std::string& marker) {
  return {{"name", "on " + label},
          {"runs_on", label},
          {"memory_mib", 256},
          {"steps", json::array({{{"name", "hello"}, {"script", "echo " + marker}}})}};
}

}  // namespace

TEST_SUITE("images") {

TEST_CASE("image pull over HTTP: a wrong sha256 stores nothing; the right one is cached, run on, listed, verified, removed") {
  auto guest = load_test_guest();
  REQUIRE_MESSAGE(guest.has_value(), why(guest));
  auto made = TempDir::make("solstice-images-test-");
  REQUIRE_MESSAGE(made.has_value(), why(made));
  const fs::path root = made->path();
  const fs::path www = root / "www", state = root / "state";
  fs::create_directories(www);
  ::setenv("SOLSTICE_TEST_GUEST_DIR", SOLSTICE_TEST_GUEST_DIR, 0);

  // The test guest's disk as a compressed qcow2, the way cloud images are served.
  auto convert = ChildProcess::spawn({"qemu-img", "convert", "-c", "-O", "qcow2", guest->disk.string(),
                                      (www / "guest.qcow2").string()});
  REQUIRE_MESSAGE(convert.has_value(), why(convert));
  auto converted = convert->wait_for(120s);
  REQUIRE((converted && converted->code == 0));
  auto sha = sha256_of_file(www / "guest.qcow2");
  REQUIRE_MESSAGE(sha.has_value(), why(sha));
  const std::string wrong(64, 'a');
  HttpServer server(www);
  const std::string url = server.url("guest.qcow2");
  const std::vector<std::string> at_state{"--state-dir", state.string()};
  auto with_state = [&](std::vector<std::string> args) {
    args.insert(args.end(), at_state.begin(), at_state.end());
    return args;
  };

  // A wrong sha256: a clear error with both sums, nothing in the cache.
  auto refused = run_runner(with_state({"image", "pull", url, "--sha256", wrong, "--label", "wrong"}));
  INFO(refused.describe());
  CHECK(refused.code == 1);
  CHECK(contains(refused.err, "sha256 mismatch"));
  CHECK(contains(refused.err, "expected " + wrong));
  CHECK(contains(refused.err, "got " + *sha));
  CHECK(files_under(state / "images").empty());
  // A URL the server does not have: the HTTP error, nothing in the cache.
  auto missing = run_runner(with_state({"image", "pull", server.url("nothing.qcow2"), "--sha256", *sha}));
  CHECK(missing.code == 1);
  CHECK(contains(missing.err, "404"));
  CHECK(files_under(state / "images").empty());
  // Not a sha256 at all: invalid input.
  auto bad_hex = run_runner(with_state({"image", "pull", url, "--sha256", "1234"}));
  CHECK(bad_hex.code == 2);
  CHECK(contains(bad_hex.err, "must be 64 hex digits"));

  // The right sha256: stored by its sum, the label registered (default: the file name).
  auto pulled = run_runner(with_state({"image", "pull", url, "--sha256", *sha}), 300s);
  INFO(pulled.describe());
  REQUIRE(pulled.code == 0);
  CHECK(contains(pulled.out, "pulled guest: qcow2"));
  const fs::path blob = state / "images" / "blobs" / *sha;
  CHECK(fs::is_regular_file(blob));
  auto blob_sha = sha256_of_file(blob);
  CHECK(blob_sha.value_or("") == *sha);
  CHECK(files_under(state / "images" / "partial").empty());

  // A job on the pulled label boots it (real QEMU) and runs.
  write_file(root / "job.json", job_on("guest", "ran-on-pulled-image").dump());
  auto job = run_runner(with_state({"run", "--cold", (root / "job.json").string(), "--accel", "tcg"}), 600s);
  INFO(job.describe());
  CHECK(job.code == 0);
  CHECK(contains(job.out, "ran-on-pulled-image"));

  // list: the label, its size, its sha256, and that a job used it.
  auto listed = run_runner(with_state({"image", "list", "--json"}));
  REQUIRE(listed.code == 0);
  auto entry = json::parse(listed.out.substr(0, listed.out.find('\n')), nullptr, false);
  REQUIRE(entry.is_object());
  CHECK(entry["label"] == "guest");
  CHECK(entry["sha256"] == *sha);
  CHECK(entry["format"] == "qcow2");
  CHECK(entry["size"].get<uint64_t>() == fs::file_size(www / "guest.qcow2"));
  CHECK(entry["last_used_us"].get<int64_t>() > 0);
  auto table = run_runner(with_state({"image", "list"}));
  CHECK(std::regex_search(table.out, std::regex("\nguest +qcow2 +[0-9.]+ MiB +[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]+ +bios +" + *sha)));

  // verify: fine as pulled; a changed blob is caught with both sums.
  auto verified = run_runner(with_state({"image", "verify"}));
  CHECK(verified.code == 0);
  CHECK(contains(verified.out, "guest: ok"));
  {
    std::ofstream append(blob, std::ios::binary | std::ios::app);
    append << "x";
  }
  auto corrupt = run_runner(with_state({"image", "verify", "guest"}));
  CHECK(corrupt.code == 1);
  CHECK(contains(corrupt.out, "guest: FAILED: sha256 mismatch: expected " + *sha));

  // rm: the label and its blob go; an unknown label is invalid input.
  auto removed = run_runner(with_state({"image", "rm", "guest"}));
  CHECK(removed.code == 0);
  CHECK_FALSE(fs::exists(blob));
  CHECK(run_runner(with_state({"image", "list", "--json"})).out.empty());
  auto again = run_runner(with_state({"image", "rm", "guest"}));
  CHECK(again.code == 2);
  CHECK(contains(again.err, "label \"guest\": not in the image cache"));

  // A configured label with url + sha256 is pulled when a job first runs on it.
  json config = {{"state_dir", state.string()},
                 {"images", json::array({{{"label", "on-first-use"}, {"url", url}, {"sha256", *sha}, {"memory_mib", 256}}})}};
  write_file(root / "config.json", config.dump());
  write_file(root / "job.json", job_on("on-first-use", "ran-after-first-use-pull").dump());
  auto first_use = run_runner({"run", "--cold", (root / "job.json").string(), "--accel", "tcg", "--config",
                               (root / "config.json").string()},
                              600s);
  INFO(first_use.describe());
  CHECK(first_use.code == 0);
  CHECK(contains(first_use.out, "ran-after-first-use-pull"));
  CHECK(fs::is_regular_file(blob));
  auto listed_after = run_runner({"image", "list", "--json", "--config", (root / "config.json").string()});
  CHECK(contains(listed_after.out, "\"label\":\"on-first-use\""));
}

TEST_CASE("firmware uefi: the UEFI-only guest boots and runs a job with OVMF, and does not boot on BIOS") {
  const fs::path uefi_disk = fs::path(SOLSTICE_TEST_GUEST_DIR) / "uefi" / "disk.raw";
  REQUIRE_MESSAGE(fs::is_regular_file(uefi_disk), uefi_disk << " is missing: build it with deploy/test-guest/uefi/build.sh "
                                                            << SOLSTICE_TEST_GUEST_DIR << " (deploy/setup.sh does)");
  auto made = TempDir::make("solstice-uefi-test-");
  REQUIRE_MESSAGE(made.has_value(), why(made));
  const fs::path root = made->path(), state = root / "state";
  // The BIOS run cannot boot: a short boot timeout ends it soon.
  for (const auto& [name, boot_timeout] : {std::pair{"uefi.json", 300}, std::pair{"bios.json", 45}}) {
    json config = {{"state_dir", state.string()},
                   {"boot_timeout_seconds", boot_timeout},
                   {"images", json::array({{{"label", "uefi-guest"}, {"disk", uefi_disk.string()}, {"memory_mib", 256}}})}};
    write_file(root / name, config.dump());
  }

  // firmware: uefi in the job: OVMF, with this VM's own copy of the variables store,
  // opened read-write by QEMU's own user when the runner is root.
  json job = job_on("uefi-guest", "booted-through-uefi");
  job["firmware"] = "uefi";
  write_file(root / "job.json", job.dump());
  auto uefi = run_runner({"run", "--cold", (root / "job.json").string(), "--accel", "tcg", "--console", "--config",
                          (root / "uefi.json").string()},
                         600s);
  INFO(uefi.describe());
  CHECK(uefi.code == 0);
  CHECK(contains(uefi.out, "booted-through-uefi"));
  CHECK(contains(uefi.out + uefi.err, "EFI stub"));  // the kernel was started by UEFI firmware
  // The VM's files, its variables store with them, are gone.
  CHECK(files_under(state / "run").empty());

  // The same guest on BIOS (the default): nothing boots, the job fails at boot.
  job.erase("firmware");
  write_file(root / "job.json", job.dump());
  auto bios = run_runner({"run", "--cold", (root / "job.json").string(), "--accel", "tcg", "--config",
                          (root / "bios.json").string()},
                         300s);
  INFO(bios.describe());
  CHECK(bios.code == 125);
  CHECK_FALSE(contains(bios.out, "booted-through-uefi"));
  CHECK(contains(bios.out + bios.err, "SSH did not become ready"));
  CHECK(files_under(state / "run").empty());

  // A firmware that does not exist is invalid input, named.
  job["firmware"] = "coreboot";
  write_file(root / "job.json", job.dump());
  auto wrong = run_runner({"run", "--cold", (root / "job.json").string(), "--config", (root / "uefi.json").string()});
  CHECK(wrong.code == 2);
  CHECK(contains(wrong.err, "firmware \"coreboot\": must be \"bios\" or \"uefi\""));
}

}  // TEST_SUITE
