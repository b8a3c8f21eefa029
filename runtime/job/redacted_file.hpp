#pragma once
// A file written from a raw byte stream with every secret replaced by "***" (a
// streaming Redactor, so a secret split between two appends is hidden too). The
// job's console.log is one: written from QEMU's raw serial capture.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/error.hpp"
#include "runtime/job/redactor.hpp"

namespace solstice {

class RedactedFile {
 public:
  // Opens `path` for appending (created with mode 0600 when missing). With
  // max_bytes (console_max_bytes for console.log) the file stops at that size: what
  // would pass it is left out and one marker line, naming `limit_key`, ends the file.
  static Result<RedactedFile> open(const std::filesystem::path& path,
                                   std::vector<std::string> secrets, uint64_t max_bytes = 0,
                                   std::string limit_key = {});
  RedactedFile(RedactedFile&& other) noexcept;
  RedactedFile& operator=(RedactedFile&&) = delete;
  RedactedFile(const RedactedFile&) = delete;
  ~RedactedFile();  // finish()es

  // Writes what is final of `bytes` (a possible start of a secret is held back).
  Result<void> append(std::string_view bytes);
  // End of the stream: writes what was held back, closes. Later calls do nothing.
  Result<void> finish();

  const std::filesystem::path& path() const { return path_; }

 private:
  RedactedFile(int fd, std::filesystem::path path, std::vector<std::string> secrets)
      : fd_(fd), path_(std::move(path)), redactor_(std::move(secrets)) {}
  Result<void> write_all(const std::string& text);
  // write_all within max_bytes_, then the marker once.
  Result<void> write_bounded(const std::string& text);

  int fd_ = -1;
  std::filesystem::path path_;
  Redactor redactor_;
  uint64_t max_bytes_ = 0;  // 0: no bound
  uint64_t size_ = 0;
  bool truncated_ = false;
  std::string limit_key_;
};

}  // namespace solstice
