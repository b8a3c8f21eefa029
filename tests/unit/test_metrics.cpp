// The metrics registry's text exposition: counters by status, cumulative
// histogram buckets with _sum and _count, one "step" series for every step,
// gauges that follow VMs started and stopped.
#include <doctest/doctest.h>

#include <string>

#include "runtime/base/metrics.hpp"

using namespace solstice;

namespace {

bool has_line(const std::string& text, const std::string& line) {
  return ("\n" + text).find("\n" + line + "\n") != std::string::npos;
}

}  // namespace

TEST_CASE("metrics: a job's result fills the counters and histograms") {
  metrics().reset();
  metrics().set_slots(3);
  metrics().job_started();
  metrics().job_started();
  {
    RunningVmCount vm;
    auto text = metrics().prometheus_text();
    CHECK(has_line(text, "solstice_vms_running 1"));
    CHECK(has_line(text, "solstice_vm_slots_free 2"));
  }
  v1::JobResult result;
  result.set_status(v1::FAILED);
  result.set_started_at_us(1'000'000);
  result.set_ended_at_us(8'500'000);  // 7.5 s
  auto* boot = result.add_phases();
  boot->set_phase("boot_to_ssh");
  boot->set_duration_ms(4000);
  for (const char* step : {"step:build \"all\"", "step:test"}) {
    auto* phase = result.add_phases();
    phase->set_phase(step);
    phase->set_duration_ms(200);
  }
  metrics().job_ended(result);
  metrics().output_bytes(v1::STDERR, 12);
  metrics().boot_fallback();

  const auto text = metrics().prometheus_text();
  INFO(text);
  CHECK(has_line(text, "# TYPE solstice_jobs_total counter"));
  CHECK(has_line(text, "solstice_jobs_total{status=\"failed\"} 1"));
  CHECK(has_line(text, "solstice_jobs_total{status=\"succeeded\"} 0"));
  CHECK(has_line(text, "solstice_jobs_total{status=\"invalid_input\"} 0"));
  CHECK(has_line(text, "solstice_jobs_running 1"));
  CHECK(has_line(text, "solstice_vms_running 0"));
  CHECK(has_line(text, "solstice_vm_slots_free 3"));
  CHECK(has_line(text, "solstice_boot_fallbacks_total 1"));
  CHECK(has_line(text, "solstice_output_bytes_total{stream=\"stderr\"} 12"));
  CHECK(has_line(text, "solstice_output_bytes_total{stream=\"stdout\"} 0"));
  // 7.5 s: not in le=5, in le=10 and every bucket above (cumulative).
  CHECK(has_line(text, "solstice_job_duration_seconds_bucket{le=\"5\"} 0"));
  CHECK(has_line(text, "solstice_job_duration_seconds_bucket{le=\"10\"} 1"));
  CHECK(has_line(text, "solstice_job_duration_seconds_bucket{le=\"+Inf\"} 1"));
  CHECK(has_line(text, "solstice_job_duration_seconds_sum 7.5"));
  CHECK(has_line(text, "solstice_job_duration_seconds_count 1"));
  CHECK(has_line(text, "solstice_phase_duration_seconds_count{phase=\"boot_to_ssh\"} 1"));
  // Both steps in one series; a step's own name (quotes and all) is no label.
  CHECK(has_line(text, "solstice_phase_duration_seconds_count{phase=\"step\"} 2"));
  CHECK(text.find("build") == std::string::npos);
  metrics().reset();
}
