// A KVM that cannot run the guest, in each shape QEMU shows it: it aborts at once,
// aborts once QMP is connected, or stops the VM as on a KVM internal error. `auto`
// must fall back to TCG with a notice and the job succeed; an explicit `kvm` must
// fail saying why. A wrapper QEMU makes the shape and a plain file stands in for
// /dev/kvm, so these run the same on every host, whatever its own KVM does.
#include <doctest/doctest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <optional>

#include "tests/reliability/harness.hpp"
#include "tests/reliability/qemu_wrappers.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;
using steady = std::chrono::steady_clock;

namespace {

// A failed KVM attempt, then a TCG boot of the test guest on a loaded two-core host.
constexpr auto run_allowance = 420s;
// From the KVM failure to the runner's notice that it falls back.
constexpr double notice_within_seconds = 10.0;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

// A notice that says the job falls back to TCG.
bool is_fallback_notice(const std::string& message) {
  return contains(message, "TCG") && contains(lower(message), "fall");
}

// A runner configuration that makes `auto` choose KVM (a file of the sandbox as the
// device) and starts QEMU through `wrapper`.
fs::path write_kvm_config(const Sandbox& sandbox, const fs::path& wrapper,
                          const std::string& accel) {
  return write_runner_config(sandbox, {{"qemu_binary", wrapper.string()},
                                       {"kvm_device", write_fake_kvm_device(sandbox).string()},
                                       {"accel", accel}});
}

void check_falls_back(KvmFailure failure) {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "kvm-fallback";
  auto wrapper = write_kvm_failure_wrapper(sandbox, failure);
  auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-ran"}));
  auto started = steady::now();
  auto runner =
    run_to_end(sandbox.run_args(job, "auto", write_kvm_config(sandbox, wrapper, "auto")),
               run_allowance);
  auto took = std::chrono::duration<double>(steady::now() - started).count();
  auto log = read_wrapper_log(sandbox);
  INFO("KVM " << std::string(describe(failure)) << "; took " << took << " s\n"
              << runner.output() << "\n--- wrapper log:\n" << log.text);
  REQUIRE_MESSAGE(runner.exited(), "the runner still runs after " << took << " s");

  // The shape was really made: one KVM attempt that failed, then TCG.
  REQUIRE_FALSE(log.accels.empty());
  CHECK(log.accels.front() == "kvm");
  CHECK(std::count(log.accels.begin(), log.accels.end(), "kvm") == 1);
  CHECK(log.accels.back() == "tcg");
  REQUIRE(log.fault_at);

  CHECK(runner.wait(0ms)->code == 0);
  auto result = sandbox.result(id);
  REQUIRE(result);
  INFO("error: " << result->error());
  CHECK(result->status() == v1::SUCCEEDED);
  CHECK(contains(sandbox.step_output(id, 0), "step-ran"));

  // Announced in the job's events and on the terminal, soon after the failure.
  std::optional<int64_t> notice_us;
  for (const auto& event : sandbox.events(id))
    if (event.has_notice() && is_fallback_notice(event.notice().message()) && !notice_us)
      notice_us = event.timestamp_us();
  REQUIRE_MESSAGE(notice_us, "no notice about falling back to TCG");
  double noticed_after = static_cast<double>(*notice_us) / 1e6 - *log.fault_at;
  INFO("fallback noticed " << noticed_after << " s after the KVM failure");
  CHECK(noticed_after >= 0.0);
  CHECK(noticed_after < notice_within_seconds);
  CHECK(is_fallback_notice(runner.out() + runner.err()));

  // The KVM attempt's phases come first, named as such, then TCG's own.
  std::vector<std::string> phases;
  std::string listed;
  for (const auto& phase : result->phases()) {
    phases.push_back(phase.phase());
    listed += phase.phase() + " ";
  }
  INFO("phases: " << listed);
  auto is_kvm = [](const std::string& phase) { return phase.rfind("kvm:", 0) == 0; };
  REQUIRE_FALSE(phases.empty());
  CHECK(is_kvm(phases.front()));
  auto first_tcg = std::find_if_not(phases.begin(), phases.end(), is_kvm);
  CHECK(first_tcg != phases.end());
  CHECK(std::none_of(first_tcg, phases.end(), is_kvm));
  CHECK(std::count(first_tcg, phases.end(), "boot_to_ssh") == 1);
  check_nothing_left(sandbox);
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("KVM fallback: QEMU aborts at once on KVM (before QMP answers); auto falls back to "
          "TCG and the job succeeds") {
  SUBCASE("its QMP socket listens until the abort") { check_falls_back(KvmFailure::abort_at_once); }
  SUBCASE("before its QMP socket exists") { check_falls_back(KvmFailure::abort_before_socket); }
}

TEST_CASE("KVM fallback: QEMU aborts on KVM after QMP connected; auto falls back to TCG and "
          "the job succeeds") {
  check_falls_back(KvmFailure::abort_after_qmp_connect);
}

TEST_CASE("KVM fallback: QEMU stops the VM on KVM as on an internal error; auto falls back to "
          "TCG and the job succeeds") {
  check_falls_back(KvmFailure::stop_vm);
}

TEST_CASE("KVM fallback with templates: the template is built on TCG, the job restores it and "
          "says it runs on TCG, the next job restores without trying KVM again") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  auto wrapper = write_kvm_failure_wrapper(sandbox, KvmFailure::abort_at_once);
  auto config = write_kvm_config(sandbox, wrapper, "auto");
  for (const std::string id : {"kvm-template-1", "kvm-template-2"}) {
    auto job = sandbox.write_json(id + ".json", guest_job(id, {"echo step-ran"}));
    auto runner = run_to_end(sandbox.snapshot_run_args(job, "auto", config), run_allowance);
    INFO(id << ":\n" << runner.output() << "\n--- wrapper log:\n" << read_wrapper_log(sandbox).text);
    REQUIRE(runner.exited());
    CHECK(runner.wait(0ms)->code == 0);
    auto result = sandbox.result(id);
    REQUIRE(result);
    CHECK(result->status() == v1::SUCCEEDED);
    CHECK(result->start() == "restored");
    CHECK(contains(sandbox.step_output(id, 0), "step-ran"));
    std::string said_tcg;
    for (const auto& event : sandbox.events(id))
      if (event.has_notice() && contains(event.notice().message(), "template runs on TCG"))
        said_tcg = event.notice().message();
    CHECK_MESSAGE(!said_tcg.empty(), "no notice that the restored job runs on TCG");
    // ... and why: what QEMU said when the KVM template's build failed.
    CHECK_MESSAGE(contains(said_tcg, "kvm_buf_set_msrs"), said_tcg);
  }
  // KVM was tried once (the first template build), then never again.
  auto log = read_wrapper_log(sandbox);
  CHECK(std::count(log.accels.begin(), log.accels.end(), "kvm") == 1);
  check_nothing_left(sandbox);
}

TEST_CASE("KVM explicit: QEMU aborts at once on KVM; the job fails at once, exit 125, naming "
          "KVM and the way out") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "kvm-explicit";
  KvmFailure failure = KvmFailure::abort_at_once;
  SUBCASE("its QMP socket listens until the abort") {}
  SUBCASE("before its QMP socket exists") { failure = KvmFailure::abort_before_socket; }
  auto wrapper = write_kvm_failure_wrapper(sandbox, failure);
  auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-ran"}));
  auto started = steady::now();
  auto runner = run_to_end(
    sandbox.run_args(job, "kvm", write_kvm_config(sandbox, wrapper, "kvm")), 120s);
  auto took = std::chrono::duration<double>(steady::now() - started).count();
  auto log = read_wrapper_log(sandbox);
  INFO("took " << took << " s\n" << runner.output() << "\n--- wrapper log:\n" << log.text);
  REQUIRE(runner.exited());

  // No fallback for an explicit choice: one KVM attempt.
  CHECK(log.accels == std::vector<std::string>{"kvm"});
  CHECK(runner.wait(0ms)->code == 125);
  // Decided when QEMU died, not at the boot timeout (240 s).
  CHECK(took < 15.0);
  auto result = sandbox.result(id);
  REQUIRE(result);
  REQUIRE(log.fault_at);
  std::optional<int64_t> result_us;
  for (const auto& event : sandbox.events(id))
    if (event.has_result())
      result_us = event.timestamp_us();
  REQUIRE(result_us);
  double decided_after = static_cast<double>(*result_us) / 1e6 - *log.fault_at;
  INFO("result " << decided_after << " s after the abort");
  CHECK(decided_after < 5.0);
  INFO("error: " << result->error());
  CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(contains(result->error(), "KVM"));
  CHECK((contains(lower(result->error()), "tcg") || contains(lower(result->error()), "auto")));
  CHECK(contains(runner.out() + runner.err(), "KVM"));
  for (const auto& notice : sandbox.notices(id))
    CHECK_FALSE(is_fallback_notice(notice));
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
