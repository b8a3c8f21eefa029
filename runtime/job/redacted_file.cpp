#include "runtime/job/redacted_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

namespace solstice {

Result<RedactedFile> RedactedFile::open(const std::filesystem::path& path,
                                        std::vector<std::string> secrets, uint64_t max_bytes,
                                        std::string limit_key) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return fail(errno_message("cannot open " + path.string(), errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    int error = errno;
    ::close(fd);
    return fail(errno_message("cannot stat " + path.string(), error));
  }
  RedactedFile file(fd, path, std::move(secrets));
  file.max_bytes_ = max_bytes;
  file.size_ = static_cast<uint64_t>(info.st_size);
  file.limit_key_ = std::move(limit_key);
  return file;
}

RedactedFile::RedactedFile(RedactedFile&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)),
      redactor_(std::move(other.redactor_)), max_bytes_(other.max_bytes_), size_(other.size_),
      truncated_(other.truncated_), limit_key_(std::move(other.limit_key_)) {}

RedactedFile::~RedactedFile() { (void)finish(); }

Result<void> RedactedFile::write_all(const std::string& text) {
  size_t written = 0;
  while (written < text.size()) {
    auto n = ::write(fd_, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return fail(errno_message("cannot write " + path_.string(), errno));
    written += static_cast<size_t>(n);
  }
  return {};
}

Result<void> RedactedFile::write_bounded(const std::string& text) {
  if (truncated_)
    return {};
  if (max_bytes_ == 0 || size_ + text.size() <= max_bytes_) {
    size_ += text.size();
    return write_all(text);
  }
  truncated_ = true;
  const auto room = static_cast<size_t>(max_bytes_ > size_ ? max_bytes_ - size_ : 0);
  const std::string marker = "\n[solstice-runner: " + path_.filename().string() +
                             " truncated here: it reached " +
                             (limit_key_.empty() ? std::string("its limit") : limit_key_) + " (" +
                             std::to_string(max_bytes_) + " bytes); the rest is not kept]\n";
  size_ += room + marker.size();
  return write_all(text.substr(0, room) + marker);
}

Result<void> RedactedFile::append(std::string_view bytes) {
  if (fd_ < 0)
    return fail("internal: " + path_.string() + " is closed");
  return write_bounded(redactor_.feed(bytes));
}

Result<void> RedactedFile::finish() {
  if (fd_ < 0)
    return {};
  auto written = write_bounded(redactor_.flush());
  ::close(fd_);
  fd_ = -1;
  return written;
}

}  // namespace solstice
