#include "runtime/vm/vm_slots.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <utility>

#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

VmSlot::VmSlot(VmSlot&& other) noexcept
  : fd_(std::exchange(other.fd_, -1)), index_(other.index_) {}

VmSlot& VmSlot::operator=(VmSlot&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0)
      ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    index_ = other.index_;
  }
  return *this;
}

VmSlot::~VmSlot() {
  if (fd_ >= 0)
    ::close(fd_);  // closing drops the lock
}

Result<std::optional<VmSlot>> VmSlot::try_acquire(const std::filesystem::path& state_dir,
                                                  unsigned max, const char* pool) {
  auto dir = state_dir / pool;
  if (auto ok = make_private_dir(dir); !ok)
    return tl::unexpected(ok.error());
  for (unsigned i = 0; i < max; ++i) {
    auto path = dir / (std::to_string(i) + ".lock");
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
      return fail(errno_message("cannot open slot " + path.string(), errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      VmSlot slot;
      slot.fd_ = fd;
      slot.index_ = i;
      return std::optional<VmSlot>{std::move(slot)};
    }
    int err = errno;
    ::close(fd);
    if (err != EWOULDBLOCK)
      return fail(errno_message("cannot lock slot " + path.string(), err));
  }
  return std::optional<VmSlot>{};
}

}  // namespace solstice
