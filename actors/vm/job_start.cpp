// How a job's VM starts: booted cold, or restored from a template of its image
// (README "Fast starts"). With `snapshots: auto` a job whose image has no template
// yet builds it first (a cold boot, once per image and VM shape) and then restores;
// a failed restore marks the template stale and boots cold. The result's `start`
// and a notice say which start the job got.
#include <chrono>

#include <caf/exit_reason.hpp>
#include <caf/send.hpp>

#include "actors/runner_types.hpp"
#include "actors/vm/job_supervisor.hpp"
#include "actors/vm/job_supervisor_parts.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/template_store.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice::supervision {

namespace {

using phase = job_phase;

// A start slot is asked for again this often; it frees as a guest gets ready.
constexpr auto start_poll_interval = std::chrono::milliseconds(50);
// Held no longer than this: a clone stuck in its start holds back the others
// only so long (alone, a restored start takes a few seconds even on TCG).
constexpr auto start_hold_limit = std::chrono::seconds(20);
// Once the guest is ready the start ends with the job's first output (its first
// exec's session is open then: on TCG a PAM session and a shell, 0.3-0.4 s of
// the emulated CPU), or this long after, whichever comes first.
constexpr auto start_tail = std::chrono::seconds(1);

std::string shape_of(const v1::ImageSpec& image, const std::string& accel) {
  return std::to_string(image.vcpus() ? image.vcpus() : 1) + " vcpus, " +
         std::to_string(image.memory_mib() ? image.memory_mib() : 512) + " MiB, " + accel;
}

void end_keeper(supervisor_pointer self) {
  auto& st = self->state;
  if (st.keeper)
    self->send_exit(st.keeper, caf::exit_reason::user_shutdown);
  st.keeper = nullptr;
}

void boot_cold(supervisor_pointer self, const std::string& note) {
  auto& st = self->state;
  st.image.clear_restore_from();
  st.result.set_start("cold");
  st.result.set_start_note(note);
  // A plain cold start (or the user's own choice) is said by the result alone.
  if (!note.empty() && note != "snapshots off")
    notice(self, "start: cold boot (" + note + ")");
  start_attempt(self);
}

void restore(supervisor_pointer self, v1::ImageSpec image, const std::string& note) {
  auto& st = self->state;
  st.image = std::move(image);
  // A clone runs on what its template ran on (TCG when "auto" found KVM unusable).
  // (One small file read, like mark_stale's write.)
  TemplateStore store(st.config.state_dir());
  const auto wanted = resolve_accel(st.config.accel(), st.config.kvm_device());
  std::string accel;
  if (auto info = store.find_ready(st.image.restore_from().template_id()); info && info->inputs.is_object())
    accel = info->inputs.value("accel", std::string{});
  if (!accel.empty())
    st.config.set_accel(accel);
  st.result.set_start("restored");
  st.result.set_start_note(note);
  notice(self, "start: restored from template " + st.image.restore_from().template_id() +
                 (note.empty() ? std::string{} : " (" + note + ")"));
  if (wanted == "kvm" && accel == "tcg") {
    const auto& why = st.image.restore_from().kvm_unusable_reason();
    notice(self, "the template runs on TCG, which is slower: KVM could not run this guest when "
                 "the template was built" +
                   (why.empty() ? std::string{" (`solstice-runner template build --accel kvm` says why)"}
                                : ": " + why));
  }
  start_when_free(self);
}

// The keeper answered; anything but a job still waiting for its template ignores it.
bool still_waiting(supervisor_pointer self, const char* what) {
  if (self->state.phase == phase::templating)
    return true;
  unexpected(self, what);
  return false;
}

void build_template(supervisor_pointer self, const std::string& accel) {
  auto& st = self->state;
  notice(self, "no template yet for image '" + st.image.label() + "' (" + shape_of(st.image, accel) +
                 "): building it first — a cold boot once; later jobs restore it");
  self->request(st.keeper, caf::infinite, template_atom::value, st.image, st.config, accel, true)
    .then(
      [=](v1::ImageSpec& image, bool built) {
        if (!still_waiting(self, "template built"))
          return;
        end_keeper(self);
        restore(self, std::move(image), built ? "template built first" : "template built by another job");
      },
      [=](caf::error& err) {
        if (!still_waiting(self, "template build failed"))
          return;
        end_keeper(self);
        notice(self, "the template could not be built: " + error_text(err));
        boot_cold(self, "template build failed");
      });
}

}  // namespace

void choose_start(supervisor_pointer self) {
  auto& st = self->state;
  if (st.config.snapshots() == "off")
    return boot_cold(self, "snapshots off");
  if (!st.factory.templates)
    return boot_cold(self, "");
  if (auto why = template_unsupported(st.job, st.image); !why.empty())
    return boot_cold(self, why);
  st.phase = phase::templating;
  auto accel = resolve_accel(st.config.accel(), st.config.kvm_device());
  st.keeper = st.factory.templates(self->system());
  self->request(st.keeper, caf::infinite, template_atom::value, st.image, st.config, accel, false)
    .then(
      [=](v1::ImageSpec& image, bool) {
        if (!still_waiting(self, "template found"))
          return;
        if (!image.has_restore_from())
          return build_template(self, accel);
        end_keeper(self);
        restore(self, std::move(image), "");
      },
      [=](caf::error& err) {
        if (!still_waiting(self, "template lookup failed"))
          return;
        end_keeper(self);
        notice(self, "cannot look for a template: " + error_text(err));
        boot_cold(self, "no template");
      });
}

void start_when_free(supervisor_pointer self) {
  auto& st = self->state;
  const auto limit = max_concurrent_starts_of(st.config);
  if (limit == 0)
    return start_attempt(self);
  auto slot = VmSlot::try_acquire(st.config.state_dir(), limit, VmSlot::start_pool);
  if (!slot) {  // the limit is for speed: without it the job still runs
    notice(self, "starting without a start slot: " + slot.error().message);
    return start_attempt(self);
  }
  if (slot->has_value()) {
    st.start_slot = std::move(*slot);
    st.start_tail_token = 0;  // an earlier attempt's tail timer is not this slot's
    st.start_hold_token = st.next_token++;
    self->delayed_send(self, start_hold_limit, timeout_atom::value, st.start_hold_token);
    return start_attempt(self);
  }
  if (!st.said_waiting_to_start) {
    st.said_waiting_to_start = true;
    notice(self, "waiting to start: " + std::to_string(limit) +
                   " restored jobs are starting on this host (max_concurrent_starts)");
  }
  st.phase = phase::start_queue;
  st.start_token = st.next_token++;
  self->delayed_send(self, start_poll_interval, timeout_atom::value, st.start_token);
}

void start_nearly_done(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.start_slot)
    return;
  st.start_tail_token = st.next_token++;
  self->delayed_send(self, start_tail, timeout_atom::value, st.start_tail_token);
}

void start_done(supervisor_pointer self) { self->state.start_slot.reset(); }

bool restore_failed(supervisor_pointer self, const caf::error& err) {
  auto& st = self->state;
  if (!st.image.has_restore_from())
    return false;
  st.start_slot.reset();  // a cold boot is not a restored start
  auto id = st.image.restore_from().template_id();
  end_phase(self, "prepare");
  end_phase(self, boot_phase_name(st));
  end_phase(self, "identity");
  end_phase(self, "ssh_ready");
  auto why = error_text(err);
  // Never restored again: the next job that needs it builds a new one.
  if (auto marked = TemplateStore(st.config.state_dir()).mark_stale(id, why); !marked)
    notice(self, "cannot mark template " + id + " stale: " + marked.error().message);
  notice(self, "restoring template " + id + " failed: " + why +
                 "; the template is marked stale and the job boots cold");
  st.image.clear_restore_from();
  retire_attempt(self, [=] {
    auto& st = self->state;
    st.phase = phase::booting;
    st.result.set_start("cold");
    st.result.set_start_note("restore failed: " + error_text(err));
    start_attempt(self);
  });
  return true;
}

}  // namespace solstice::supervision
