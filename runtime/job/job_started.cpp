#include "runtime/job/job_started.hpp"

#include <limits.h>
#include <unistd.h>

#include "runtime/base/version.hpp"

namespace solstice {

v1::JobStarted job_started_for(const v1::JobSpec& job, const v1::ImageSpec& image) {
  v1::JobStarted started;
  started.set_name(job.name());
  started.set_runs_on(job.runs_on());
  started.set_image(job.image().empty() ? image.disk() : job.image());
  char host[HOST_NAME_MAX + 1] = {};
  if (::gethostname(host, sizeof host - 1) == 0)
    started.set_host(host);
  started.set_runner_version(runner_version());
  started.set_runner_commit(runner_commit());
  started.set_step_count(static_cast<uint32_t>(job.steps_size()));
  return started;
}

}  // namespace solstice
