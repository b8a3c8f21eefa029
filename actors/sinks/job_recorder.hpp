#pragma once
#include <memory>
#include <string>

#include "actors/actors.hpp"
#include "runtime/job/event_log.hpp"

namespace solstice {

struct job_recorder_state {
  static inline const char* name = "job_recorder";
  job_recorder_state() = default;
  std::shared_ptr<EventLog> log;
  std::string job_dir;
  // The first write error, reported once on stderr (the job goes on).
  bool write_failed = false;
};

// An event sink that keeps the job's record in its directory: every event as a
// JSON line in events.jsonl, and the result in result.json. Quits after the result.
// Spawn it detached (it writes files).
event_sink_actor::behavior_type
job_recorder(event_sink_actor::stateful_pointer<job_recorder_state> self,
             std::shared_ptr<EventLog> log, std::string job_dir);

}  // namespace solstice
