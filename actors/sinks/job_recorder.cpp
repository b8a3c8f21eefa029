#include "actors/sinks/job_recorder.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>

#include "runtime/base/logging.hpp"

namespace solstice {

namespace {

bool write_file(const std::string& path, const std::string& text) {
  auto tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return false;
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ok = ::fsync(fd) == 0 && ok;
  ::close(fd);
  return ok && ::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

event_sink_actor::behavior_type
job_recorder(event_sink_actor::stateful_pointer<job_recorder_state> self,
             std::shared_ptr<EventLog> log, std::string job_dir) {
  self->state.log = std::move(log);
  self->state.job_dir = std::move(job_dir);
  return {
    [=](event_atom, const v1::JobEvent& event) {
      auto& st = self->state;
      if (auto ok = st.log->append(event); !ok && !st.write_failed) {
        st.write_failed = true;
        log_job(spdlog::level::err, event.job_id(), "cannot record events: {}",
                ok.error().message);
      }
      if (event.has_result()) {
        // The events' style: zero values printed (a succeeded job's exit_code 0).
        if (!write_file(st.job_dir + "/result.json", message_to_json(event.result(), true)))
          log_job(spdlog::level::err, event.job_id(), "cannot write {}/result.json", st.job_dir);
        self->quit();
      }
    },
  };
}

}  // namespace solstice
