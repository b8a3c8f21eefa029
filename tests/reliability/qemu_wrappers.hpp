#pragma once
// Stand-ins for qemu-system-x86_64 that the reliability suite gives the runner as
// `qemu_binary`: shell scripts written into a sandbox that run the real QEMU, but
// fail the way a broken host does. How a host's KVM fails differs from machine to
// machine, so the tests make each shape themselves instead of relying on /dev/kvm.
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/reliability/harness.hpp"

namespace solstice::reliability {

// How a KVM attempt (argv with `-accel kvm`) fails. TCG attempts run the real QEMU.
enum class KvmFailure {
  // QEMU's assertion in kvm_buf_set_msrs, SIGABRT about 0.1 s after the start:
  // its QMP socket listens, but nothing answers a client before the abort.
  abort_at_once,
  // The same abort before the QMP socket exists.
  abort_before_socket,
  // The VM runs (on TCG) until the runner has connected to QMP; a second later
  // QEMU aborts (SIGABRT).
  abort_after_qmp_connect,
  // The VM runs (on TCG) until the runner has connected to QMP; a second later it
  // is stopped through a QMP monitor of the wrapper's own, as QEMU does on a KVM
  // internal error: the runner sees a STOP event and a QEMU that keeps running.
  stop_vm,
};

const char* describe(KvmFailure failure);

// Writes root/qemu-kvm-broken (mode 0755) failing as `failure` and returns its path.
std::filesystem::path write_kvm_failure_wrapper(const Sandbox& sandbox, KvmFailure failure);

// Writes root/qemu-qmp-proxy (mode 0755): the real QEMU, with its QMP socket moved
// to PATH.real and a proxy listening on PATH in front of it. The proxy's PID is
// written to proxy_pid_file(sandbox, job id); killing it closes the runner's QMP
// connection while QEMU runs on.
std::filesystem::path write_qmp_proxy_wrapper(const Sandbox& sandbox);
std::filesystem::path proxy_pid_file(const Sandbox& sandbox, const std::string& job_id);
// The proxy's PID once it runs (checked against its command line), else nullopt.
std::optional<pid_t> qmp_proxy_pid(const Sandbox& sandbox, const std::string& job_id);

// A plain file standing in for /dev/kvm (readable and writable), so that `auto`
// chooses KVM on any host.
std::filesystem::path write_fake_kvm_device(const Sandbox& sandbox);

// What a wrapper recorded in root/wrapper.log.
struct WrapperLog {
  std::vector<std::string> accels;  // one per QEMU start, in order: "kvm" or "tcg"
  // When the failure was made (seconds since the Unix epoch), if it was.
  std::optional<double> fault_at;
  std::string text;  // the whole log, for messages
};
WrapperLog read_wrapper_log(const Sandbox& sandbox);

// A runner configuration for these tests (bounded boot and power-down times).
// `extra` is merged in (e.g. qemu_binary, kvm_device, accel).
std::filesystem::path write_runner_config(const Sandbox& sandbox, const nlohmann::json& extra,
                                          const std::string& name = "runner-config.json");

}  // namespace solstice::reliability
