#include "tests/integration/guest_fixture.hpp"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <system_error>

#include <nlohmann/json.hpp>

#include "runtime/vm/cloud_init.hpp"

namespace solstice::testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

fs::path test_guest_directory() {
#ifdef SOLSTICE_TEST_GUEST_DIR
  return SOLSTICE_TEST_GUEST_DIR;
#else
  return "test-guest";
#endif
}

Result<TestGuestInfo> load_test_guest(const fs::path& directory) {
  fs::path manifest = directory / "guest.json";
  if (!fs::exists(manifest))
    return fail("the test guest is not built: " + manifest.string() +
                " does not exist. Build it with: deploy/test-guest/build.sh " + directory.string() +
                " (or configure with -DSOLSTICE_TEST_GUEST_DIR=<a built guest directory>)");
  std::ifstream in(manifest);
  nlohmann::json json = nlohmann::json::parse(in, nullptr, false);
  if (json.is_discarded() || !json.is_object())
    return fail(manifest.string() + " is not a JSON object; rebuild the test guest");
  TestGuestInfo info;
  info.directory = directory;
  try {
    info.disk = directory / json.at("disk").get<std::string>();
    info.disk_format = json.value("disk_format", "raw");
    info.kernel = directory / json.at("kernel").get<std::string>();
    info.initrd = directory / json.at("initrd").get<std::string>();
    info.cmdline = json.value("cmdline", "console=ttyS0");
    info.machine = json.value("machine", "pc");
    info.memory_mib = json.value("memory_mib", 256u);
    info.user_default = json.value("user_default", "runner");
    if (json.contains("markers"))
      info.sshd_started_marker = json["markers"].value("sshd_started", "");
  } catch (const nlohmann::json::exception& error) {
    return fail(manifest.string() + " lacks a field the tests need: " + error.what());
  }
  for (const fs::path& file : {info.disk, info.kernel, info.initrd})
    if (!fs::exists(file))
      return fail("the test guest in " + directory.string() + " is incomplete: " + file.string() +
                  " is missing; rebuild it with deploy/test-guest/build.sh " + directory.string());
  return info;
}

Result<TempDir> TempDir::make(const std::string& prefix) {
  std::string pattern = (fs::temp_directory_path() / (prefix + "XXXXXX")).string();
  if (!::mkdtemp(pattern.data()))
    return fail(errno_message("cannot create a temporary directory " + pattern, errno));
  // Searchable: a root runner's QEMU runs as qemu_user and must reach its state dir.
  if (::chmod(pattern.c_str(), 0711) != 0)
    return fail(errno_message("cannot chmod 0711 " + pattern, errno));
  TempDir dir;
  dir.path_ = pattern;
  return dir;
}

TempDir& TempDir::operator=(TempDir&& other) noexcept {
  if (this != &other) {
    if (!path_.empty()) {
      std::error_code ignored;
      fs::remove_all(path_, ignored);
    }
    path_ = std::exchange(other.path_, {});
  }
  return *this;
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

std::string read_available(int fd) {
  std::string text;
  if (fd < 0) return text;
  char buffer[4096];
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n > 0) {
      text.append(buffer, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return text;  // EOF, EAGAIN or error
  }
}

std::string file_tail(const fs::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::stringstream content;
  content << in.rdbuf();
  std::string text = content.str();
  return text.size() > max_bytes ? text.substr(text.size() - max_bytes) : text;
}

namespace {

std::string random_suffix() {
  std::random_device device;
  std::uniform_int_distribution<unsigned> digit(0, 15);
  std::string text;
  for (int i = 0; i < 12; ++i) text += "0123456789abcdef"[digit(device)];
  return text;
}

// Runs a short tool to completion; its stderr goes into the error.
Result<void> run_tool(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  SpawnOptions options;
  options.capture_stdout = false;
  auto child = ChildProcess::spawn(argv, options);
  if (!child) return fail(child.error().message);
  auto status = child->wait_for(timeout);
  std::string stderr_text = read_available(child->stderr_fd());
  if (!status) {
    child->kill(SIGKILL);
    child->wait_for(5s);
    return fail(argv[0] + " did not finish within " + std::to_string(timeout.count()) + " ms");
  }
  if (status->signaled || status->code != 0)
    return fail(argv[0] + " failed (" + status->describe() + "): " + stderr_text);
  return {};
}

}  // namespace

Result<std::unique_ptr<Guest>> Guest::boot(const GuestOptions& options) {
  auto info = load_test_guest();
  if (!info) return fail(info.error().message);
  auto work = TempDir::make("solstice-guest-");
  if (!work) return fail(work.error().message);

  std::unique_ptr<Guest> guest(new Guest());
  guest->info_ = *info;
  guest->work_ = std::move(*work);

  auto user_key = generate_ed25519("solstice-test-user");
  if (!user_key) return fail("user key: " + user_key.error().message);
  auto host_key = generate_ed25519("solstice-test-host");
  if (!host_key) return fail("host key: " + host_key.error().message);
  guest->user_key_ = *user_key;
  guest->host_key_ = *host_key;

  SeedSpec seed;
  seed.instance_id = "solstice-test-" + random_suffix();
  seed.hostname = "solstice-test";
  seed.user = info->user_default;
  seed.authorized_key = user_key->public_line;
  seed.host_key_private = host_key->private_openssh;
  seed.host_key_public = host_key->public_line;
  if (auto written = write_seed_iso(seed, guest->seed_iso()); !written)
    return fail("seed ISO: " + written.error().message);

  VmSpec spec;
  spec.qemu_binary = options.qemu_binary;
  spec.machine = info->machine;
  spec.accel = Accel::tcg;
  spec.cpu = "max";
  spec.memory_mib = info->memory_mib;
  spec.seed_iso = guest->seed_iso();
  spec.qmp_socket = guest->qmp_socket();
  spec.console_log = guest->console_log();
  spec.boot = options.boot;
  if (options.overlay) {
    if (auto made = run_tool({"qemu-img", "create", "-q", "-f", "qcow2", "-F", info->disk_format,
                              "-b", fs::absolute(info->disk).string(), guest->overlay().string()},
                             30s);
        !made)
      return fail("cannot create the overlay: " + made.error().message);
    spec.disk = guest->overlay();
    spec.disk_format = "qcow2";
  } else {
    spec.disk = info->disk;
    spec.disk_format = info->disk_format;
    spec.snapshot = true;
  }
  if (options.boot == VmBoot::kernel) {
    spec.kernel = info->kernel;
    spec.initrd = info->initrd;
    spec.kernel_append = info->cmdline;
  }

  SpawnOptions spawn_options;
  spawn_options.capture_stdout = false;
  auto qemu = ChildProcess::spawn(build_qemu_argv(spec), spawn_options);
  if (!qemu) return fail("cannot start QEMU: " + qemu.error().message);
  guest->qemu_ = std::move(*qemu);

  auto qmp = QmpClient::connect(guest->qmp_socket(), options.qmp_timeout);
  if (!qmp) return fail("QMP: " + qmp.error().message + "\n" + guest->diagnostics());
  guest->qmp_ = std::move(*qmp);

  auto usernet = guest->qmp_.human_command("info usernet");
  if (!usernet) return fail("QMP info usernet: " + usernet.error().message);
  auto port = parse_usernet_host_port(*usernet, 22);
  if (!port) return fail("SSH port: " + port.error().message);

  guest->target_.host = "127.0.0.1";
  guest->target_.port = *port;
  guest->target_.user = info->user_default;
  guest->target_.private_key = user_key->private_openssh;
  guest->target_.public_key = user_key->public_line;
  guest->target_.expected_host_key = host_key->public_blob;
  return guest;
}

Result<SshSession> Guest::wait_for_ssh(std::chrono::milliseconds timeout) {
  auto ready = SshSession::wait_until_ready(target_, std::chrono::steady_clock::now() + timeout,
                                            50ms, [this] { return !qemu_.running(); });
  if (!ready) {
    std::string why_stopped;
    if (auto status = qemu_.try_wait())
      why_stopped = "QEMU exited (" + status->describe() + ") before SSH was ready: ";
    return fail(why_stopped + ready.error().message + "\n" + diagnostics());
  }
  return ready;
}

Result<ExitStatus> Guest::power_off_and_wait(std::chrono::milliseconds timeout) {
  if (auto sent = qmp_.execute("system_powerdown"); !sent)
    return fail("system_powerdown: " + sent.error().message);
  auto status = qemu_.wait_for(timeout);
  if (!status)
    return fail("QEMU did not exit within " + std::to_string(timeout.count()) +
                " ms of system_powerdown\n" + diagnostics());
  return *status;
}

std::string Guest::diagnostics() {
  qemu_stderr_ += read_available(qemu_.stderr_fd());
  std::string text = "--- console (" + console_log().string() + ", tail) ---\n" +
                     file_tail(console_log()) + "\n--- QEMU stderr ---\n" + qemu_stderr_;
  if (auto status = qemu_.try_wait()) text += "\n--- QEMU exited: " + status->describe();
  return text;
}

void Guest::shut_down() {
  if (qemu_.pid() <= 0 || !qemu_.running()) return;
  if (qmp_.fd() >= 0) {
    if (qmp_.execute("system_powerdown", nlohmann::json::object(), 2s) && qemu_.wait_for(5s))
      return;
    qmp_.execute("quit", nlohmann::json::object(), 2s);
    if (qemu_.wait_for(3s)) return;
  }
  qemu_.kill(SIGKILL);
  qemu_.wait_for(5s);
}

Guest::~Guest() { shut_down(); }

std::vector<std::string> processes_mentioning(const std::string& needle) {
  std::vector<std::string> found;
  DIR* proc = ::opendir("/proc");
  if (!proc)
    return found;
  while (auto* entry = ::readdir(proc)) {
    std::string name = entry->d_name;
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    std::ifstream in(std::filesystem::path("/proc") / name / "cmdline", std::ios::binary);
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (auto& c : cmdline)
      if (c == '\0')
        c = ' ';
    if (cmdline.find(needle) != std::string::npos)
      found.push_back(name + ": " + cmdline);
  }
  ::closedir(proc);
  return found;
}

}  // namespace solstice::testing
