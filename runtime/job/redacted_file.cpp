#include "runtime/job/redacted_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

namespace solstice {

Result<RedactedFile> RedactedFile::open(const std::filesystem::path& path,
                                        std::vector<std::string> secrets) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return fail(errno_message("cannot open " + path.string(), errno));
  return RedactedFile(fd, path, std::move(secrets));
}

RedactedFile::RedactedFile(RedactedFile&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)),
      redactor_(std::move(other.redactor_)) {}

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

Result<void> RedactedFile::append(std::string_view bytes) {
  if (fd_ < 0)
    return fail("internal: " + path_.string() + " is closed");
  return write_all(redactor_.feed(bytes));
}

Result<void> RedactedFile::finish() {
  if (fd_ < 0)
    return {};
  auto written = write_all(redactor_.flush());
  ::close(fd_);
  fd_ = -1;
  return written;
}

}  // namespace solstice
