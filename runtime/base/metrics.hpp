#pragma once
// The process's metrics, for the Prometheus endpoint (--metrics-listen): jobs by
// status, job and phase durations, VMs running, slots free, boot fallbacks and
// output bytes. Updated from actors on CAF threads: counters are atomics, the
// per-phase histograms sit behind one small mutex held only to add a number, so
// nothing here blocks. The HTTP server (actors/host/metrics_server) reads it on
// its own thread.
#include <atomic>
#include <cstdint>
#include <string>

#include "solstice.pb.h"

namespace solstice {

class MetricsRegistry {
 public:
  // A job began (its first event) / ended (its result: status, durations).
  void job_started();
  void job_ended(const v1::JobResult& result);
  // Jobs a coordinator holds: it sets the gauges instead of counting.
  void set_jobs_running(int64_t running);
  void set_jobs_queued(int64_t queued);

  // VM slots this process may use (max_concurrent_vms, a node's --slots, the
  // sum over a coordinator's nodes); free = slots - VMs running.
  void set_slots(int64_t slots);
  void vm_started();
  void vm_stopped();
  void set_vms_running(int64_t running);

  void boot_fallback();
  void output_bytes(v1::OutputStream stream, uint64_t bytes);

  // Everything in the Prometheus text exposition format (version 0.0.4).
  std::string prometheus_text() const;

  // Back to zero (tests).
  void reset();
};

// The one registry of this process.
MetricsRegistry& metrics();

// Counts one running VM while it lives (held by the actor that owns the QEMU).
class RunningVmCount {
 public:
  RunningVmCount() { metrics().vm_started(); }
  ~RunningVmCount() { metrics().vm_stopped(); }
  RunningVmCount(const RunningVmCount&) = delete;
  RunningVmCount& operator=(const RunningVmCount&) = delete;
};

}  // namespace solstice
