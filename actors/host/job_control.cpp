#include "actors/host/job_control.hpp"

#include <chrono>

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>

#include "runtime/job/job_records.hpp"

namespace solstice {

namespace {

constexpr std::chrono::milliseconds cancel_poll{250};

caf::behavior cancel_watcher(caf::event_based_actor* self, job_supervisor_actor supervisor,
                             std::filesystem::path job_dir) {
  self->monitor(supervisor);
  self->set_down_handler([=](caf::down_msg&) { self->quit(); });
  self->delayed_send(self, cancel_poll, tick_atom::value);
  return {
    [=](tick_atom) {
      if (take_cancel_request(job_dir))
        self->send(supervisor, cancel_atom::value);
      self->delayed_send(self, cancel_poll, tick_atom::value);
    },
  };
}

}  // namespace

void watch_cancel_requests(caf::actor_system& sys, job_supervisor_actor supervisor,
                           std::filesystem::path job_dir) {
  sys.spawn(cancel_watcher, std::move(supervisor), std::move(job_dir));
}

}  // namespace solstice
