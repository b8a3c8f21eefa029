#pragma once
// The first event of every job (JobStarted): what runs, where, on which runner.
#include "solstice.pb.h"

namespace solstice {

// `job` with its resolved `image`, on this host and this runner build.
v1::JobStarted job_started_for(const v1::JobSpec& job, const v1::ImageSpec& image);

}  // namespace solstice
