#include "runtime/vm/image_cache.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "runtime/base/clock.hpp"
#include "runtime/job/json_input.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/image_download.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using json_input::shown;

fs::path blobs_dir(const v1::RunnerConfig& config) { return image_cache_dir(config) / "blobs"; }
fs::path labels_dir(const v1::RunnerConfig& config) { return image_cache_dir(config) / "labels"; }
fs::path partial_dir(const v1::RunnerConfig& config) { return image_cache_dir(config) / "partial"; }
fs::path label_file(const v1::RunnerConfig& config, const std::string& label) {
  return labels_dir(config) / (label + ".json");
}

// Creates `dir` (and parents, private) with `mode`: blobs must be reachable by
// QEMU's user, labels and partial downloads need not. Never 0700 in between: a VM
// of another job may be opening a blob at that moment.
Result<void> make_dir(const fs::path& dir, mode_t mode) {
  if (auto made = make_missing_dirs(dir); !made) return made;
  if (::chmod(dir.c_str(), mode) != 0) return fail(errno_message("cannot set the mode of " + dir.string(), errno));
  return {};
}

Result<void> make_cache_dirs(const v1::RunnerConfig& config) {
  // The state directory is searchable by others (see qemu_user); the cache and its
  // blobs are too, so QEMU's user can open a blob by its name, but not list them.
  for (const auto& [dir, mode] : {std::pair{image_cache_dir(config), mode_t{0711}},
                                  std::pair{blobs_dir(config), mode_t{0711}},
                                  std::pair{labels_dir(config), mode_t{0700}},
                                  std::pair{partial_dir(config), mode_t{0700}}}) {
    if (auto made = make_dir(dir, mode); !made) return made;
  }
  return {};
}

// Writes `text` to `path` through a temporary file and a rename: whole or not at all.
Result<void> write_atomically(const fs::path& path, const std::string& text) {
  const fs::path temporary = path.string() + "." + std::to_string(::getpid()) + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      std::error_code ignored;
      fs::remove(temporary, ignored);
      return fail("cannot write " + temporary.string());
    }
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temporary.c_str());
    return fail(errno_message("cannot rename " + temporary.string() + " to " + path.string(), err));
  }
  return {};
}

json to_json(const CachedImage& image) {
  return {{"label", image.label},       {"sha256", image.sha256},          {"format", image.format},
          {"url", image.url},           {"firmware", image.firmware},      {"size", image.size},
          {"pulled_at_us", image.pulled_at_us}, {"last_used_us", image.last_used_us}};
}

Result<void> save_label(const v1::RunnerConfig& config, const CachedImage& image) {
  return write_atomically(label_file(config, image.label), to_json(image).dump(2) + "\n");
}

Result<CachedImage> load_label(const v1::RunnerConfig& config, const fs::path& path) {
  auto text = read_small_file(path, 1u << 20);
  if (!text) return fail(text.error().message);
  auto document = parse_json_text(*text, path.string());
  if (!document) return fail(document.error().message);
  CachedImage image;
  try {
    image.label = document->at("label").get<std::string>();
    image.sha256 = document->at("sha256").get<std::string>();
    image.format = document->at("format").get<std::string>();
    image.url = document->value("url", "");
    image.firmware = document->value("firmware", "");
    image.size = document->value("size", uint64_t{0});
    image.pulled_at_us = document->value("pulled_at_us", int64_t{0});
    image.last_used_us = document->value("last_used_us", int64_t{0});
  } catch (const json::exception& e) {
    return fail(path.string() + ": not a label record of the image cache: " + e.what());
  }
  if (auto sha = normalize_sha256(image.sha256, path.string() + ": sha256"); !sha) return fail(sha.error().message);
  image.blob = blobs_dir(config) / image.sha256;
  return image;
}

// A qcow2 whose header names a backing file would make QEMU open a host file of the
// image's choosing: a downloaded image must stand alone.
Result<void> check_no_backing_file(const fs::path& path, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(errno_message(what + ": cannot open", errno));
  unsigned char header[16] = {};
  const ssize_t got = ::pread(fd, header, sizeof header, 0);
  ::close(fd);
  if (got != sizeof header || std::memcmp(header, "QFI\xfb", 4) != 0) return {};
  uint64_t backing_offset = 0;
  for (int i = 8; i < 16; ++i) backing_offset = (backing_offset << 8) | header[i];
  if (backing_offset != 0) {
    return fail(what + ": the qcow2 image names a backing file; a downloaded image must be self-contained "
                "(qemu-img convert -O qcow2 makes one)");
  }
  return {};
}

// What QEMU will see: the format by its header, no backing file, and qemu-img can open it.
Result<std::string> check_image_file(const fs::path& path, const std::string& what) {
  auto format = detect_disk_format(path, what);
  if (!format) return fail(format.error().message);
  if (auto alone = check_no_backing_file(path, what); !alone) return fail(alone.error().message);
  if (auto usable = check_disk_image(path, *format, what); !usable) return fail(usable.error().message);
  return *format;
}

// Partial downloads of runners that died (their PID is gone) are removed.
void remove_stale_partials(const v1::RunnerConfig& config) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(partial_dir(config), ec)) {
    const std::string name = entry.path().filename().string();
    const auto dot = name.find('.');
    const pid_t pid = dot == std::string::npos ? 0 : static_cast<pid_t>(std::atol(name.c_str() + dot + 1));
    if (pid <= 0 || (::kill(pid, 0) != 0 && errno == ESRCH)) fs::remove(entry.path(), ec);
  }
}

// Downloads into partial/ and moves the verified image to blobs/<sha256>.
Result<void> fetch_blob(const v1::RunnerConfig& config, const PullRequest& request, const fs::path& blob) {
  const fs::path partial = partial_dir(config) / (request.sha256 + "." + std::to_string(::getpid()) + ".part");
  const int fd = ::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return fail(errno_message("cannot create " + partial.string(), errno));
  auto downloaded = download_to_fd(request.url, fd, request.label, request.progress);
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  // Every way out below but the last removes the partial file.
  auto refuse = [&](const std::string& message) {
    ::unlink(partial.c_str());
    return fail(message);
  };
  if (!downloaded) return refuse(downloaded.error().message);
  if (!synced) return refuse(errno_message("cannot write " + partial.string(), errno));
  if (downloaded->sha256 != request.sha256) {
    return refuse("sha256 mismatch for " + request.url + ": expected " + request.sha256 + ", got " +
                  downloaded->sha256 + " (" + std::to_string(downloaded->bytes) +
                  " bytes); nothing was stored in the image cache");
  }
  if (auto format = check_image_file(partial, "the image downloaded from " + request.url); !format) {
    return refuse(format.error().message + "; nothing was stored in the image cache");
  }
  if (::chmod(partial.c_str(), 0644) != 0 || ::rename(partial.c_str(), blob.c_str()) != 0) {
    return refuse(errno_message("cannot store the image as " + blob.string(), errno));
  }
  return {};
}

}  // namespace

fs::path image_cache_dir(const v1::RunnerConfig& config) { return fs::path(config.state_dir()) / "images"; }

Result<void> check_image_label(const std::string& label, const std::string& what) {
  const bool fine = !label.empty() && label.size() <= 128 && label[0] != '.' && label[0] != '-' &&
                    std::all_of(label.begin(), label.end(), [](char c) {
                      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                             c == '_' || c == '-' || c == '.';
                    });
  if (fine) return {};
  return fail(what + " " + shown(label) + ": a label is 1 to 128 letters, digits, '.', '_' or '-', "
              "not starting with '.' or '-'");
}

Result<std::string> normalize_sha256(const std::string& hex, const std::string& what) {
  std::string lower;
  for (char c : hex) lower += static_cast<char>(c >= 'A' && c <= 'F' ? c - 'A' + 'a' : c);
  const bool fine = lower.size() == 64 && std::all_of(lower.begin(), lower.end(), [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
  });
  if (!fine) return fail(what + " " + shown(hex) + ": must be 64 hex digits (sha256sum prints them)");
  return lower;
}

Result<void> check_firmware(const std::string& firmware, const std::string& what) {
  if (firmware.empty() || firmware == "bios" || firmware == "uefi") return {};
  return fail(what + " " + shown(firmware) + ": must be \"bios\" or \"uefi\" (empty: bios)");
}

std::string default_label_for_url(const std::string& url) {
  std::string path = url.substr(0, url.find_first_of("?#"));
  std::string name = path.substr(path.find_last_of('/') + 1);
  name = name.substr(0, name.find('.'));
  return name;
}

Result<CachedImage> pull_image(const v1::RunnerConfig& config, const PullRequest& given) {
  PullRequest request = given;
  auto sha = normalize_sha256(request.sha256, "sha256");
  if (!sha) return fail(sha.error().message);
  request.sha256 = *sha;
  if (auto ok = check_image_label(request.label, "label"); !ok) return fail(ok.error().message);
  if (auto ok = check_firmware(request.firmware, "firmware"); !ok) return fail(ok.error().message);
  if (request.url.rfind("http://", 0) != 0 && request.url.rfind("https://", 0) != 0) {
    return fail("url " + shown(request.url) + ": only http:// and https:// URLs can be pulled");
  }
  if (auto made = make_cache_dirs(config); !made) return fail(made.error().message);
  remove_stale_partials(config);
  const fs::path blob = blobs_dir(config) / request.sha256;
  std::error_code ec;
  if (!fs::exists(blob, ec)) {
    if (auto fetched = fetch_blob(config, request, blob); !fetched) return fail(fetched.error().message);
  }
  CachedImage image;
  image.label = request.label;
  image.sha256 = request.sha256;
  image.url = request.url;
  image.firmware = request.firmware;
  image.blob = blob;
  auto format = detect_disk_format(blob, "cached image");
  if (!format) return fail(format.error().message);
  image.format = *format;
  image.size = fs::file_size(blob, ec);
  image.pulled_at_us = unix_now_us();
  if (auto previous = find_cached_image(config, request.label); previous && previous->sha256 == image.sha256) {
    image.last_used_us = previous->last_used_us;
  }
  if (auto saved = save_label(config, image); !saved) return fail(saved.error().message);
  return image;
}

Result<std::vector<CachedImage>> list_cached_images(const v1::RunnerConfig& config) {
  std::vector<CachedImage> images;
  std::error_code ec;
  if (!fs::exists(labels_dir(config), ec)) return images;
  for (const auto& entry : fs::directory_iterator(labels_dir(config), ec)) {
    if (entry.path().extension() != ".json") continue;
    auto image = load_label(config, entry.path());
    if (!image) return fail(image.error().message);
    images.push_back(std::move(*image));
  }
  if (ec) return fail("cannot list " + labels_dir(config).string() + ": " + ec.message());
  std::sort(images.begin(), images.end(), [](const auto& a, const auto& b) { return a.label < b.label; });
  return images;
}

Result<CachedImage> find_cached_image(const v1::RunnerConfig& config, const std::string& label) {
  if (auto ok = check_image_label(label, "label"); !ok) return fail(ok.error().message);
  const fs::path path = label_file(config, label);
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return fail("label " + shown(label) + ": not in the image cache " + image_cache_dir(config).string() +
                " (solstice-runner image list shows what is there)");
  }
  return load_label(config, path);
}

Result<void> remove_cached_image(const v1::RunnerConfig& config, const std::string& label) {
  auto image = find_cached_image(config, label);
  if (!image) return fail(image.error().message);
  if (::unlink(label_file(config, label).c_str()) != 0) {
    return fail(errno_message("cannot remove " + label_file(config, label).string(), errno));
  }
  auto others = list_cached_images(config);
  const bool shared = others && std::any_of(others->begin(), others->end(),
                                            [&](const CachedImage& other) { return other.sha256 == image->sha256; });
  // A VM running on the blob keeps it open: removing the name does not disturb it.
  if (!shared && ::unlink(image->blob.c_str()) != 0 && errno != ENOENT) {
    return fail(errno_message("cannot remove " + image->blob.string(), errno));
  }
  return {};
}

std::string verify_cached_image(const CachedImage& image) {
  auto sum = sha256_of_file(image.blob);
  if (!sum) return sum.error().message;
  if (*sum != image.sha256) return "sha256 mismatch: expected " + image.sha256 + ", got " + *sum;
  if (auto format = check_image_file(image.blob, "cached image"); !format) return format.error().message;
  return {};
}

void mark_image_used(const v1::RunnerConfig& config, const std::string& label) {
  if (!check_image_label(label, "label")) return;
  std::error_code ec;
  if (!fs::exists(label_file(config, label), ec)) return;
  auto image = load_label(config, label_file(config, label));
  if (!image) return;
  image->last_used_us = unix_now_us();
  (void)save_label(config, *image);
}

Result<std::string> sha256_of_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(errno_message("cannot open " + path.string(), errno));
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> digest(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(digest.get(), EVP_sha256(), nullptr);
  std::vector<char> buffer(1 << 20);
  for (;;) {
    const ssize_t got = ::read(fd, buffer.data(), buffer.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int err = errno;
      ::close(fd);
      return fail(errno_message("cannot read " + path.string(), err));
    }
    if (got == 0) break;
    EVP_DigestUpdate(digest.get(), buffer.data(), static_cast<size_t>(got));
  }
  ::close(fd);
  unsigned char sum[EVP_MAX_MD_SIZE];
  unsigned size = 0;
  EVP_DigestFinal_ex(digest.get(), sum, &size);
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (unsigned i = 0; i < size; ++i) {
    text += digits[sum[i] >> 4];
    text += digits[sum[i] & 0xf];
  }
  return text;
}

void apply_image_cache(v1::RunnerConfig& config) {
  std::error_code ec;
  for (auto& image : *config.mutable_images()) {
    if (image.url().empty() || !image.disk().empty()) continue;
    auto sha = normalize_sha256(image.sha256(), "sha256");
    if (!sha) continue;  // validate_runner_config says why
    const fs::path blob = blobs_dir(config) / *sha;
    if (fs::exists(blob, ec)) image.set_disk(blob.string());
  }
  auto cached = list_cached_images(config);
  if (!cached) return;
  for (const auto& entry : *cached) {
    const bool configured = std::any_of(config.images().begin(), config.images().end(),
                                        [&](const v1::ImageSpec& image) { return image.label() == entry.label; });
    if (configured) continue;
    auto* image = config.add_images();
    image->set_label(entry.label);
    image->set_disk(entry.blob.string());
    image->set_disk_format(entry.format);
    image->set_firmware(entry.firmware);
  }
}

Result<void> pull_if_missing(v1::RunnerConfig& config, const std::string& label, bool progress) {
  for (auto& image : *config.mutable_images()) {
    if (image.label() != label || image.url().empty() || !image.disk().empty()) continue;
    PullRequest request{image.url(), image.sha256(), image.label(), image.firmware(), progress};
    if (progress) std::fprintf(stderr, "pulling image %s from %s\n", label.c_str(), image.url().c_str());
    auto pulled = pull_image(config, request);
    if (!pulled) return fail("image " + shown(label) + " (pulled on first use): " + pulled.error().message);
    image.set_disk(pulled->blob.string());
    image.set_disk_format(pulled->format);
  }
  return {};
}

}  // namespace solstice
