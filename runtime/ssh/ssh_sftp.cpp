// SFTP: uploads (from memory or a file, then chmod) and downloads (to a
// temporary name, then renamed), failing when the server makes no progress.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "runtime/ssh/ssh_connection.hpp"
#include "runtime/ssh/ssh_session.hpp"

namespace solstice {

using namespace ssh_internal;

namespace {

// Why an SFTP read or write failed: a stalled transfer, or the server's error.
std::string transfer_failure(Connection& ssh, int rc) {
  return rc == kDeadlinePassed
           ? "no progress for " + milliseconds_text(kTransferStallTimeout)
           : ssh.sftp_error();
}

// Writes all of `data` to an SFTP handle, handling partial writes.
Result<void> sftp_write_all(Connection& ssh, LIBSSH2_SFTP_HANDLE* handle,
                            std::string_view data, const std::string& remote_path) {
  while (!data.empty()) {
    ssize_t written = 0;
    int rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&]() -> int {
      written = libssh2_sftp_write(handle, data.data(), data.size());
      return written < 0 ? static_cast<int>(written) : 0;
    });
    if (rc != 0)
      return fail("writing " + remote_path + " on " + ssh.peer + " failed: " +
                  transfer_failure(ssh, rc));
    data.remove_prefix(static_cast<size_t>(written));
  }
  return {};
}

// Shared by upload() and upload_file(): `produce` fills the buffer and returns the
// number of bytes (0 at the end) or an error.
Result<void> upload_stream(Connection& ssh, const std::string& remote_path, int mode,
                           size_t total_size,
                           const std::function<Result<size_t>(std::vector<char>&)>& produce) {
  auto sftp = ssh.sftp_session();
  if (!sftp) return fail(sftp.error().message);
  int rc = 0;
  auto* handle = ssh.driver(Clock::now() + kTransferStallTimeout)
                     .open<LIBSSH2_SFTP_HANDLE>(
                         [&] {
                           return libssh2_sftp_open_ex(
                               *sftp, remote_path.data(),
                               static_cast<unsigned>(remote_path.size()),
                               LIBSSH2_FXF_WRITE | LIBSSH2_FXF_CREAT | LIBSSH2_FXF_TRUNC, mode,
                               LIBSSH2_SFTP_OPENFILE);
                         },
                         rc);
  if (!handle)
    return fail("cannot create " + remote_path + " on " + ssh.peer + ": " +
                (rc == kDeadlinePassed ? std::string("timed out") : ssh.sftp_error()));
  // Small files need no big buffer.
  std::vector<char> buffer(std::clamp<size_t>(total_size, 1, kSftpBufferSize));
  for (;;) {
    auto produced = produce(buffer);
    if (!produced) {
      ssh.close_sftp_handle(handle);
      return fail(produced.error().message);
    }
    if (*produced == 0) break;
    auto written =
        sftp_write_all(ssh, handle, std::string_view(buffer.data(), *produced), remote_path);
    if (!written) {
      ssh.close_sftp_handle(handle);
      return written;
    }
  }
  rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&] {
    return libssh2_sftp_close_handle(handle);
  });
  if (rc != 0)
    return fail("closing " + remote_path + " on " + ssh.peer + " failed: " + ssh.sftp_error());
  // The server's umask may have stripped bits from the mode given at open.
  LIBSSH2_SFTP_ATTRIBUTES attributes{};
  attributes.flags = LIBSSH2_SFTP_ATTR_PERMISSIONS;
  attributes.permissions = static_cast<unsigned long>(mode);
  rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&] {
    return libssh2_sftp_stat_ex(*sftp, remote_path.data(),
                                static_cast<unsigned>(remote_path.size()), LIBSSH2_SFTP_SETSTAT,
                                &attributes);
  });
  if (rc != 0) {
    char octal[16];
    std::snprintf(octal, sizeof octal, "%04o", static_cast<unsigned>(mode));
    return fail("chmod " + std::string(octal) + " " + remote_path + " on " + ssh.peer +
                " failed: " + ssh.sftp_error());
  }
  return {};
}

}  // namespace

Result<void> SshSession::upload(const std::string& content, const std::string& remote_path,
                                int mode) {
  if (!impl_ || !impl_->session) return fail("upload of " + remote_path + " on a closed SSH session");
  size_t offset = 0;
  return upload_stream(*impl_, remote_path, mode, content.size(),
                       [&](std::vector<char>& buffer) -> Result<size_t> {
    size_t count = std::min(buffer.size(), content.size() - offset);
    std::memcpy(buffer.data(), content.data() + offset, count);
    offset += count;
    return count;
  });
}

Result<void> SshSession::upload_file(const std::filesystem::path& local,
                                     const std::string& remote_path, int mode) {
  if (!impl_ || !impl_->session) return fail("upload of " + remote_path + " on a closed SSH session");
  int fd = ::open(local.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(errno_message("cannot open " + local.string() + " for upload", errno));
  struct stat info {};
  const size_t size = ::fstat(fd, &info) == 0 ? static_cast<size_t>(info.st_size) : kSftpBufferSize;
  auto result =
      upload_stream(*impl_, remote_path, mode, size, [&](std::vector<char>& buffer) -> Result<size_t> {
        for (;;) {
          ssize_t n = ::read(fd, buffer.data(), buffer.size());
          if (n >= 0) return static_cast<size_t>(n);
          if (errno != EINTR) return fail(errno_message("reading " + local.string(), errno));
        }
      });
  ::close(fd);
  return result;
}

Result<void> SshSession::download(const std::string& remote_path,
                                  const std::filesystem::path& local, uint64_t max_bytes) {
  if (!impl_ || !impl_->session)
    return fail("download of " + remote_path + " on a closed SSH session");
  Impl& ssh = *impl_;
  auto sftp = ssh.sftp_session();
  if (!sftp) return fail(sftp.error().message);
  int rc = 0;
  auto* handle = ssh.driver(Clock::now() + kTransferStallTimeout)
                     .open<LIBSSH2_SFTP_HANDLE>(
                         [&] {
                           return libssh2_sftp_open_ex(*sftp, remote_path.data(),
                                                       static_cast<unsigned>(remote_path.size()),
                                                       LIBSSH2_FXF_READ, 0, LIBSSH2_SFTP_OPENFILE);
                         },
                         rc);
  if (!handle)
    return fail("cannot download " + remote_path + " from " + ssh.peer + ": " +
                (rc == kDeadlinePassed ? std::string("timed out") : ssh.sftp_error()));

  // Written under a temporary name and renamed, so `local` is whole or absent.
  std::filesystem::path directory = local.has_parent_path() ? local.parent_path() : ".";
  std::string temporary = (directory / ("." + local.filename().string() + ".partial-XXXXXX")).string();
  int fd = ::mkostemp(temporary.data(), O_CLOEXEC);
  if (fd < 0) {
    ssh.close_sftp_handle(handle);
    return fail(errno_message("cannot create a file next to " + local.string(), errno));
  }
  auto abandon = [&](std::string message) {
    ::close(fd);
    ::unlink(temporary.c_str());
    ssh.close_sftp_handle(handle);
    return fail(std::move(message));
  };
  std::vector<char> buffer(kSftpBufferSize);
  uint64_t total = 0;
  for (;;) {
    ssize_t received = 0;
    rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&]() -> int {
      received = libssh2_sftp_read(handle, buffer.data(), buffer.size());
      return received < 0 ? static_cast<int>(received) : 0;
    });
    if (rc != 0)
      return abandon("reading " + remote_path + " from " + ssh.peer + " failed: " +
                     transfer_failure(ssh, rc));
    if (received == 0) break;
    total += static_cast<uint64_t>(received);
    if (total > max_bytes)  // stopped here: never more than max_bytes on the host's disk
      return abandon(std::string(download_too_large) + remote_path + " from " + ssh.peer +
                     " has more than " + std::to_string(max_bytes) + " bytes");
    const char* data = buffer.data();
    size_t left = static_cast<size_t>(received);
    while (left > 0) {
      ssize_t n = ::write(fd, data, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return abandon(errno_message("writing " + temporary, errno));
      data += n;
      left -= static_cast<size_t>(n);
    }
  }
  if (::fchmod(fd, 0644) != 0 || ::close(fd) != 0) {
    int error = errno;
    ::unlink(temporary.c_str());
    ssh.close_sftp_handle(handle);
    return fail(errno_message("finishing " + temporary, error));
  }
  ssh.close_sftp_handle(handle);
  if (::rename(temporary.c_str(), local.c_str()) != 0) {
    int error = errno;
    ::unlink(temporary.c_str());
    return fail(errno_message("cannot move the download of " + remote_path + " to " + local.string(),
                              error));
  }
  return {};
}

}  // namespace solstice
