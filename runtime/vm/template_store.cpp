#include "runtime/vm/template_store.hpp"

#include <sys/file.h>
#include <sys/stat.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <map>
#include <sstream>

#include <openssl/evp.h>

#include "runtime/base/child_process.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace fs = std::filesystem;

namespace {

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Written to a temporary name and renamed: a reader sees the old or the new file.
Result<void> write_text_atomic(const fs::path& path, const std::string& text, mode_t mode) {
  auto tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0)
    return fail(errno_message("cannot create " + tmp.string(), errno));
  bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  if (!written || ::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return fail(errno_message("cannot write " + path.string(), err));
  }
  return {};
}

std::string sha256_hex(const std::string& bytes) {
  unsigned char sum[EVP_MAX_MD_SIZE];
  unsigned size = 0;
  EVP_Digest(bytes.data(), bytes.size(), sum, &size, EVP_sha256(), nullptr);
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (unsigned i = 0; i < size; ++i) {
    text += digits[sum[i] >> 4];
    text += digits[sum[i] & 0xf];
  }
  return text;
}

std::string hex_of(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (unsigned char c : bytes) {
    text += digits[c >> 4];
    text += digits[c & 0xf];
  }
  return text;
}

std::string bytes_of_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

// Private directories, but searchable: QEMU's own user opens a clone's backing
// file (the frozen overlay) by its path.
Result<void> make_searchable_dir(const fs::path& dir) {
  if (auto ok = make_private_dir(dir); !ok)
    return ok;
  if (::chmod(dir.c_str(), 0711) != 0)
    return fail(errno_message("cannot set mode 0711 on " + dir.string(), errno));
  return {};
}

// The file's sha256 as the image cache knows it: its blobs are named by it.
std::optional<std::string> image_cache_sha256(const std::string& state_dir, const fs::path& file) {
  auto blobs = fs::path(state_dir) / "images" / "blobs";
  if (file.parent_path() != blobs)
    return std::nullopt;
  auto name = file.filename().string();
  if (name.size() != 64 || name.find_first_not_of("0123456789abcdef") != std::string::npos)
    return std::nullopt;
  return name;
}

std::optional<TemplateInfo> read_info(const fs::path& dir) {
  auto manifest = nlohmann::json::parse(read_text(dir / "manifest.json"), nullptr, false);
  if (!manifest.is_object())
    return std::nullopt;
  TemplateInfo info;
  info.dir = dir;
  info.id = manifest.value("id", std::string{});
  info.label = manifest.value("label", std::string{});
  info.inputs = manifest.value("inputs", nlohmann::json::object());
  info.built_at_us = manifest.value("built_at_us", int64_t{0});
  info.build_ms = manifest.value("build_ms", int64_t{0});
  info.state_bytes = manifest.value("state_bytes", uint64_t{0});
  info.identity_agent = manifest.value("identity_agent", false);
  info.identity_note = manifest.value("identity_note", std::string{});
  info.cloud_init_errors = manifest.value("cloud_init_errors", false);
  if (fs::exists(dir / "stale")) {
    info.stale = read_text(dir / "stale");
    if (info.stale.empty())
      info.stale = "marked stale";
  }
  return info;
}

}  // namespace

fs::path templates_dir(const std::string& state_dir) {
  return fs::path(state_dir) / "templates";
}

Result<std::string> cached_file_sha256(const std::string& state_dir, const fs::path& file) {
  if (auto known = image_cache_sha256(state_dir, file))
    return *known;
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    return fail(errno_message("cannot stat " + file.string(), errno));
  auto dir = templates_dir(state_dir) / "hashes";
  auto name = std::to_string(st.st_dev) + "-" + std::to_string(st.st_ino) + "-" +
              std::to_string(st.st_size) + "-" +
              std::to_string(int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec);
  auto remembered = read_text(dir / name);
  if (remembered.size() == 64)
    return remembered;
  auto sum = sha256_of_file(file);
  if (!sum)
    return sum;
  // Best effort: a read-only state dir only costs the next job a hash.
  if (make_searchable_dir(templates_dir(state_dir)) && make_private_dir(dir))
    (void)write_text_atomic(dir / name, *sum, 0600);
  return sum;
}

Result<std::string> qemu_version_of(const std::string& qemu_binary, const std::string& state_dir) {
  // The binary's identity: a QEMU upgraded in place (a new file) gives another key.
  std::string path = qemu_binary;
  if (path.find('/') == std::string::npos) {
    const char* env = ::getenv("PATH");
    std::stringstream dirs(env ? env : "/usr/bin:/bin");
    for (std::string dir; std::getline(dirs, dir, ':');)
      if (::access((fs::path(dir) / qemu_binary).c_str(), X_OK) == 0) {
        path = (fs::path(dir) / qemu_binary).string();
        break;
      }
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return fail(errno_message("cannot find QEMU " + qemu_binary, errno));
  // Remembered in the state dir under that identity, as the images' hashes are:
  // a job need not start QEMU once more to learn its version (~25 ms per run).
  const auto dir = templates_dir(state_dir) / "qemu-versions";
  const auto name = std::to_string(st.st_dev) + "-" + std::to_string(st.st_ino) + "-" +
                    std::to_string(st.st_size) + "-" +
                    std::to_string(int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec);
  if (!state_dir.empty()) {
    auto remembered = read_text(dir / name);
    if (!remembered.empty() && remembered.size() < 256 && remembered.find('\n') == std::string::npos)
      return remembered;
  }
  auto child = ChildProcess::spawn({path, "--version"});
  if (!child)
    return fail(child.error().message);
  auto status = child->wait_for(std::chrono::seconds(10));
  if (!status || status->signaled || status->code != 0)
    return fail(qemu_binary + " --version failed");
  std::string out;
  char buf[512];
  ssize_t n;
  while ((n = ::read(child->stdout_fd(), buf, sizeof buf)) > 0)
    out.append(buf, static_cast<size_t>(n));
  out = out.substr(0, out.find('\n'));
  if (out.empty())
    return fail(qemu_binary + " --version printed nothing");
  // Best effort, as for the hashes.
  if (!state_dir.empty() && make_searchable_dir(templates_dir(state_dir)) && make_private_dir(dir))
    (void)write_text_atomic(dir / name, out, 0600);
  return out;
}

std::string template_unsupported(const v1::JobSpec& job, const v1::ImageSpec& image) {
  if (image.firmware() == "uefi")
    return "UEFI images boot cold (their variables store is not part of a template)";
  if (!job.user_data().empty())
    return "the job brings its own user-data, which only a cold boot applies";
  return "";
}

Result<TemplateKey> template_key_for(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                     const std::string& accel) {
  TemplateKey key;
  auto& in = key.inputs;
  in["format"] = template_format;
  in["label"] = image.label();
  for (auto [name, path] : {std::pair{"disk", image.disk()}, std::pair{"kernel", image.kernel()},
                            std::pair{"initrd", image.initrd()}}) {
    if (path.empty())
      continue;
    auto sum = cached_file_sha256(config.state_dir(), path);
    if (!sum)
      return fail("cannot identify the image's " + std::string(name) + ": " + sum.error().message);
    in[std::string(name) + "_sha256"] = *sum;
  }
  in["disk_format"] = image.disk_format();
  in["boot_mode"] = static_cast<int>(image.boot_mode());
  in["kernel_append"] = image.kernel_append();
  in["firmware"] = image.firmware();
  in["user"] = image.user().empty() ? "runner" : image.user();
  in["machine"] = image.machine().empty() ? "pc" : image.machine();
  in["accel"] = accel;
  in["vcpus"] = image.vcpus() ? image.vcpus() : 1;
  in["memory_mib"] = image.memory_mib() ? image.memory_mib() : 512;
  auto binary = config.qemu_binary().empty() ? std::string{"qemu-system-x86_64"} : config.qemu_binary();
  auto version = qemu_version_of(binary, config.state_dir());
  if (!version)
    return fail(version.error().message);
  in["qemu"] = *version;
  key.id = sha256_hex(in.dump()).substr(0, 24);
  return key;
}

// ------------------------------------------------------------------ lock

TemplateLock::TemplateLock(TemplateLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

TemplateLock& TemplateLock::operator=(TemplateLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0)
      ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

TemplateLock::~TemplateLock() {
  if (fd_ >= 0)
    ::close(fd_);  // releases the flock
}

Result<TemplateLock> TemplateLock::acquire(const std::string& state_dir, const std::string& id) {
  if (auto ok = make_searchable_dir(templates_dir(state_dir)); !ok)
    return tl::unexpected(ok.error());
  auto path = templates_dir(state_dir) / (id + ".lock");
  TemplateLock lock;
  lock.fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (lock.fd_ < 0)
    return fail(errno_message("cannot open " + path.string(), errno));
  // Each open is its own lock: threads of one runner exclude each other too.
  while (::flock(lock.fd_, LOCK_EX) != 0)
    if (errno != EINTR)
      return fail(errno_message("cannot lock " + path.string(), errno));
  return lock;
}

// ------------------------------------------------------------------ store

fs::path TemplateStore::dir_of(const std::string& id) const {
  return templates_dir(state_dir_) / id;
}

std::optional<TemplateInfo> TemplateStore::find_ready(const std::string& id) const {
  auto dir = dir_of(id);
  auto info = read_info(dir);
  if (!info || info->id != id || !info->stale.empty())
    return std::nullopt;
  for (const char* file : {"state", "key", "seed.iso"})
    if (!fs::exists(dir / file))
      return std::nullopt;
  return info;
}

Result<v1::RestoreFrom> TemplateStore::restore_spec(const std::string& id) const {
  auto dir = dir_of(id);
  auto manifest = nlohmann::json::parse(read_text(dir / "manifest.json"), nullptr, false);
  if (!manifest.is_object())
    return fail("template " + id + ": unreadable manifest " + (dir / "manifest.json").string());
  v1::RestoreFrom from;
  from.set_template_id(id);
  from.set_state_file((dir / "state").string());
  if (fs::exists(dir / "overlay.qcow2"))
    from.set_frozen_overlay((dir / "overlay.qcow2").string());
  from.set_seed_iso((dir / "seed.iso").string());
  from.set_template_private_key(read_text(dir / "key"));
  from.set_template_public_key(read_text(dir / "key.pub"));
  from.set_template_host_key(bytes_of_hex(manifest.value("host_key_blob", std::string{})));
  from.set_identity_agent(manifest.value("identity_agent", false));
  from.set_cloud_init_errors(manifest.value("cloud_init_errors", false));
  if (from.template_private_key().empty() || from.template_host_key().empty())
    return fail("template " + id + ": its key or host key is missing");
  return from;
}

std::vector<TemplateInfo> TemplateStore::list() const {
  std::vector<TemplateInfo> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(templates_dir(state_dir_), ec)) {
    auto name = entry.path().filename().string();
    if (!entry.is_directory() || name.empty() || name[0] == '.' || name == "hashes")
      continue;
    if (auto info = read_info(entry.path()))
      out.push_back(std::move(*info));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return std::tie(a.label, a.id) < std::tie(b.label, b.id);
  });
  return out;
}

Result<void> TemplateStore::mark_stale(const std::string& id, const std::string& why) const {
  auto dir = dir_of(id);
  if (!fs::is_directory(dir))
    return {};
  return write_text_atomic(dir / "stale", why.empty() ? "marked stale" : why, 0600);
}

Result<void> TemplateStore::remove(const std::string& id) const {
  auto lock = TemplateLock::acquire(state_dir_, id);
  if (!lock)
    return tl::unexpected(lock.error());
  std::error_code ec;
  fs::remove_all(dir_of(id), ec);
  if (ec)
    return fail("cannot remove " + dir_of(id).string() + ": " + ec.message());
  fs::remove(templates_dir(state_dir_) / (id + ".lock"), ec);
  fs::remove(templates_dir(state_dir_) / (id + ".failed"), ec);
  return {};
}

Result<fs::path> TemplateStore::make_build_dir(const std::string& id) const {
  static std::atomic<unsigned> counter{0};
  if (auto ok = make_searchable_dir(templates_dir(state_dir_)); !ok)
    return tl::unexpected(ok.error());
  // The caller holds the template's lock: any other build directory of this id is
  // what a killed runner left.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(templates_dir(state_dir_), ec))
    if (entry.path().filename().string().rfind(".build-" + id + "-", 0) == 0)
      fs::remove_all(entry.path(), ec);
  auto dir = templates_dir(state_dir_) /
             (".build-" + id + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  fs::remove_all(dir, ec);
  if (auto ok = make_searchable_dir(dir); !ok)
    return tl::unexpected(ok.error());
  return dir;
}

Result<void> TemplateStore::note_failed_build(const std::string& id, const std::string& why) const {
  if (auto ok = make_searchable_dir(templates_dir(state_dir_)); !ok)
    return ok;
  nlohmann::json record = {{"at_us", unix_now_us()}, {"error", why}};
  return write_text_atomic(templates_dir(state_dir_) / (id + ".failed"), record.dump() + "\n", 0600);
}

std::optional<std::string> TemplateStore::recent_failed_build(const std::string& id,
                                                              int64_t within_us) const {
  auto record = nlohmann::json::parse(read_text(templates_dir(state_dir_) / (id + ".failed")),
                                      nullptr, false);
  if (!record.is_object())
    return std::nullopt;
  auto age_us = unix_now_us() - record.value("at_us", int64_t{0});
  if (age_us < 0 || age_us > within_us)
    return std::nullopt;
  return "its build failed " + std::to_string(age_us / 1000000) + " s ago (tried again " +
         std::to_string((within_us - age_us) / 1000000 + 1) + " s from now, or at once by "
         "solstice-runner template build): " + record.value("error", std::string{});
}

Result<TemplateInfo> TemplateStore::publish(const fs::path& build_dir, const TemplateKey& key,
                                            const std::string& label, int64_t build_ms,
                                            const TemplateGuestFacts& guest) const {
  std::error_code ec;
  auto overlay = build_dir / "overlay.qcow2";
  // Frozen: nothing writes to a clone's backing file again.
  if (fs::exists(overlay) && ::chmod(overlay.c_str(), 0444) != 0)
    return fail(errno_message("cannot freeze " + overlay.string(), errno));
  // QEMU's user had the build directory's group while the template booted; from now
  // on it may only reach the frozen overlay through it (a clone's QEMU gets the seed's
  // group again, as every VM does). The key pair never leaves the host: runner only.
  if (::chmod(build_dir.c_str(), 0711) != 0)
    return fail(errno_message("cannot set mode 0711 on " + build_dir.string(), errno));
  for (const char* secret : {"key", "key.pub", "seed.iso", "state"})
    if (fs::exists(build_dir / secret) && ::chmod((build_dir / secret).c_str(), 0600) != 0)
      return fail(errno_message("cannot set mode 0600 on " + (build_dir / secret).string(), errno));
  auto host_key = read_text(build_dir / "host_key.blob");
  nlohmann::json manifest = {
    {"id", key.id},
    {"label", label},
    {"inputs", key.inputs},
    {"built_at_us", unix_now_us()},
    {"build_ms", build_ms},
    {"state_bytes", fs::file_size(build_dir / "state", ec)},
    {"host_key_blob", hex_of(host_key)},
    {"identity_agent", guest.identity_agent},
    {"identity_note", guest.identity_note},
    {"cloud_init_errors", guest.cloud_init_errors},
  };
  if (auto ok = write_text_atomic(build_dir / "manifest.json", manifest.dump(2) + "\n", 0644); !ok)
    return tl::unexpected(ok.error());
  fs::remove(build_dir / "host_key.blob", ec);
  auto target = dir_of(key.id);
  // An older (stale) template of this id moves aside first: clones that run on it
  // keep their open files, and the new one appears in one rename.
  if (fs::exists(target)) {
    auto old = templates_dir(state_dir_) / (".old-" + key.id + "-" + std::to_string(::getpid()));
    fs::remove_all(old, ec);
    fs::rename(target, old, ec);
    if (ec)
      return fail("cannot replace " + target.string() + ": " + ec.message());
    fs::remove_all(old, ec);
  }
  fs::rename(build_dir, target, ec);
  if (ec)
    return fail("cannot publish the template as " + target.string() + ": " + ec.message());
  fs::remove(templates_dir(state_dir_) / (key.id + ".failed"), ec);
  auto info = read_info(target);
  if (!info)
    return fail("template " + key.id + ": its manifest cannot be read back");
  return *info;
}

}  // namespace solstice
