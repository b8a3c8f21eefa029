#pragma once
// The host-wide limit on VMs running at once, shared by every runner process that
// uses the same state directory: slot N is held by an exclusive flock on
// state_dir/slots/N.lock, so a slot is freed even when its holder is SIGKILLed.
#include <filesystem>
#include <optional>

#include "runtime/base/error.hpp"

namespace solstice {

class VmSlot {
 public:
  VmSlot() = default;
  VmSlot(VmSlot&& other) noexcept;
  VmSlot& operator=(VmSlot&& other) noexcept;
  VmSlot(const VmSlot&) = delete;
  VmSlot& operator=(const VmSlot&) = delete;
  ~VmSlot();

  unsigned index() const { return index_; }
  bool held() const { return fd_ >= 0; }

  // Takes a free slot of `max` without waiting; nullopt when all are taken.
  static Result<std::optional<VmSlot>> try_acquire(const std::filesystem::path& state_dir,
                                                   unsigned max);

 private:
  int fd_ = -1;
  unsigned index_ = 0;
};

}  // namespace solstice
