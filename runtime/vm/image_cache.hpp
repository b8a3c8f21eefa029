#pragma once
// The image cache in the state directory: base images downloaded by URL, stored
// by their sha256 and named by labels that jobs use as `runs_on`.
//
//   state_dir/images/blobs/<sha256>      the images (mode 0644: QEMU's user reads them)
//   state_dir/images/labels/<label>.json  label -> sha256, format, url, firmware, times
//   state_dir/images/partial/             downloads in progress (<sha256>.<pid>.part)
//
// A download is written to partial/ and renamed into blobs/ only after its sha256
// and its format have been checked: blobs/ never holds an unverified image.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

struct CachedImage {
  std::string label;
  std::string sha256;    // 64 lowercase hex digits
  std::string format;    // "qcow2" or "raw"
  std::string url;       // where it was pulled from
  std::string firmware;  // "bios" or "uefi" (or "" = bios)
  uint64_t size = 0;     // bytes of the blob
  int64_t pulled_at_us = 0;
  int64_t last_used_us = 0;  // 0: never used by a job
  std::filesystem::path blob;
};

// state_dir/images
std::filesystem::path image_cache_dir(const v1::RunnerConfig& config);

// A label names a file: 1-128 of [A-Za-z0-9._-], not starting with '.' or '-'.
Result<void> check_image_label(const std::string& label, const std::string& what);
// 64 hex digits (any case) -> lowercase; errors name `what`.
Result<std::string> normalize_sha256(const std::string& hex, const std::string& what);
// "bios", "uefi" or "" (bios); errors name `what`.
Result<void> check_firmware(const std::string& firmware, const std::string& what);

// The label a pull gets when none is given: the URL's file name without its
// extensions ("debian-12-genericcloud-amd64" for .../debian-12-genericcloud-amd64.qcow2).
std::string default_label_for_url(const std::string& url);

struct PullRequest {
  std::string url;
  std::string sha256;    // expected
  std::string label;     // required (see default_label_for_url)
  std::string firmware;  // recorded with the label
  bool progress = false; // a progress bar on stderr
};

// Downloads `request.url` (http or https), checks its sha256 and that QEMU reads it
// as a self-contained qcow2 or raw image, stores it and registers the label
// (replacing what the label named before). A wrong sha256 leaves nothing in the
// cache and says which was expected and which arrived. An image already cached
// under that sha256 is not downloaded again.
Result<CachedImage> pull_image(const v1::RunnerConfig& config, const PullRequest& request);

// Every label in the cache, sorted by label.
Result<std::vector<CachedImage>> list_cached_images(const v1::RunnerConfig& config);
// One label; an error names it when the cache does not have it.
Result<CachedImage> find_cached_image(const v1::RunnerConfig& config, const std::string& label);
// Removes the label, and its blob when no other label uses it.
Result<void> remove_cached_image(const v1::RunnerConfig& config, const std::string& label);
// Hashes the blob again and asks qemu-img whether it is still a usable image: ""
// when it is, else what is wrong (a different sha256, a missing blob, ...).
std::string verify_cached_image(const CachedImage& image);
// Notes that a job starts on `label` now (best effort: the cache may be read-only).
void mark_image_used(const v1::RunnerConfig& config, const std::string& label);

// The sha256 of a file as 64 lowercase hex digits.
Result<std::string> sha256_of_file(const std::filesystem::path& path);

// Brings the cache into `config`: a configured image with a url and no disk gets
// the cached blob of its sha256 as its disk (when it is cached); every cached
// label that the config does not name becomes an image of its own.
void apply_image_cache(v1::RunnerConfig& config);

// The configured image `label` has a url and is not cached yet: pulls it (the
// first use of the label) and points its disk at the blob. Nothing to do (no
// error) for any other label.
Result<void> pull_if_missing(v1::RunnerConfig& config, const std::string& label, bool progress);

}  // namespace solstice
