#pragma once
// The host-wide limit on VMs running at once, shared by every runner process that
// uses the same state directory: slot N is held by an exclusive flock on
// state_dir/slots/N.lock, so a slot is freed even when its holder is SIGKILLed.
// The limit on restored jobs starting at once (max_concurrent_starts) is a second
// pool of the same kind, state_dir/start-slots/.
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

  // Takes a free slot of `max` in the pool `pool` without waiting; nullopt when
  // all are taken.
  static Result<std::optional<VmSlot>> try_acquire(const std::filesystem::path& state_dir,
                                                   unsigned max, const char* pool = vm_pool);
  static constexpr const char* vm_pool = "slots";
  static constexpr const char* start_pool = "start-slots";

 private:
  int fd_ = -1;
  unsigned index_ = 0;
};

}  // namespace solstice
