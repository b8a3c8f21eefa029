#include "runtime/base/metrics.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <mutex>
#include <vector>

namespace solstice {
namespace {

// A cumulative histogram in seconds; bucket bounds fixed at construction.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

  void observe(double seconds) {
    size_t i = 0;
    while (i < bounds_.size() && seconds > bounds_[i])
      ++i;
    ++counts_[i];
    sum_ += seconds;
    ++count_;
  }

  // `labels` are printed first in every line ("phase=\"boot\","), may be empty.
  void print(std::string& out, const std::string& name, const std::string& labels) const {
    uint64_t cumulative = 0;
    for (size_t i = 0; i <= bounds_.size(); ++i) {
      cumulative += counts_[i];
      std::string le = i < bounds_.size() ? number(bounds_[i]) : "+Inf";
      out += name + "_bucket{" + labels + "le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
    }
    const std::string plain = labels.empty() ? "" : "{" + labels.substr(0, labels.size() - 1) + "}";
    out += name + "_sum" + plain + " " + number(sum_) + "\n";
    out += name + "_count" + plain + " " + std::to_string(count_) + "\n";
  }

  static std::string number(double value) {
    char text[64];
    std::snprintf(text, sizeof text, "%.17g", value);
    return text;
  }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

const std::vector<double> job_buckets{1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200};
const std::vector<double> phase_buckets{0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600};

// Job statuses as metric labels, in the order they are printed.
// The last one also counts statuses it does not know.
constexpr std::array<std::pair<v1::JobStatus, const char*>, 6> statuses{{
  {v1::SUCCEEDED, "succeeded"},
  {v1::FAILED, "failed"},
  {v1::TIMED_OUT, "timed_out"},
  {v1::CANCELLED, "cancelled"},
  {v1::INVALID_INPUT, "invalid_input"},
  {v1::INFRASTRUCTURE_ERROR, "infrastructure_error"},
}};

struct State {
  std::array<std::atomic<uint64_t>, statuses.size()> jobs_by_status{};
  std::atomic<int64_t> jobs_running{0};
  std::atomic<int64_t> jobs_queued{0};
  std::atomic<int64_t> slots{0};
  std::atomic<int64_t> vms_running{0};
  std::atomic<uint64_t> boot_fallbacks{0};
  std::atomic<uint64_t> stdout_bytes{0};
  std::atomic<uint64_t> stderr_bytes{0};
  mutable std::mutex histograms_mutex;
  Histogram job_duration{job_buckets};
  std::map<std::string, Histogram> phase_duration;
};

State& state() {
  static State instance;
  return instance;
}

// A phase as a label value: every step is "step" (step names are the job's own
// text, one series each would grow without end), other names kept to [a-z0-9_].
std::string phase_label(const std::string& phase) {
  if (phase.rfind("step:", 0) == 0)
    return "step";
  std::string label = phase;
  for (auto& c : label)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
      c = '_';
  return label;
}

void add_metric(std::string& out, const char* name, const char* type, const char* help) {
  out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

}  // namespace

MetricsRegistry& metrics() {
  static MetricsRegistry registry;
  return registry;
}

void MetricsRegistry::job_started() { ++state().jobs_running; }

void MetricsRegistry::job_ended(const v1::JobResult& result) {
  auto& st = state();
  if (st.jobs_running > 0)
    --st.jobs_running;
  size_t index = statuses.size() - 1;  // anything unknown counts as infrastructure
  for (size_t i = 0; i < statuses.size(); ++i)
    if (statuses[i].first == result.status())
      index = i;
  ++st.jobs_by_status[index];
  std::lock_guard lock(st.histograms_mutex);
  if (result.started_at_us() != 0 && result.ended_at_us() >= result.started_at_us())
    st.job_duration.observe(double(result.ended_at_us() - result.started_at_us()) / 1e6);
  for (const auto& phase : result.phases())
    st.phase_duration.try_emplace(phase_label(phase.phase()), phase_buckets)
      .first->second.observe(double(phase.duration_ms()) / 1e3);
}

void MetricsRegistry::set_jobs_running(int64_t running) { state().jobs_running = running; }
void MetricsRegistry::set_jobs_queued(int64_t queued) { state().jobs_queued = queued; }
void MetricsRegistry::set_slots(int64_t slots) { state().slots = slots; }
void MetricsRegistry::vm_started() { ++state().vms_running; }
void MetricsRegistry::vm_stopped() { --state().vms_running; }
void MetricsRegistry::set_vms_running(int64_t running) { state().vms_running = running; }
void MetricsRegistry::boot_fallback() { ++state().boot_fallbacks; }

void MetricsRegistry::output_bytes(v1::OutputStream stream, uint64_t bytes) {
  (stream == v1::STDERR ? state().stderr_bytes : state().stdout_bytes) += bytes;
}

std::string MetricsRegistry::prometheus_text() const {
  auto& st = state();
  std::string out;
  add_metric(out, "solstice_jobs_total", "counter", "Jobs ended, by status.");
  for (size_t i = 0; i < statuses.size(); ++i)
    out += std::string("solstice_jobs_total{status=\"") + statuses[i].second + "\"} " +
           std::to_string(st.jobs_by_status[i].load()) + "\n";
  add_metric(out, "solstice_jobs_running", "gauge", "Jobs started and not ended yet.");
  out += "solstice_jobs_running " + std::to_string(st.jobs_running.load()) + "\n";
  add_metric(out, "solstice_jobs_queued", "gauge", "Jobs waiting in a coordinator's queue.");
  out += "solstice_jobs_queued " + std::to_string(st.jobs_queued.load()) + "\n";
  add_metric(out, "solstice_vms_running", "gauge", "VMs (QEMU processes) running.");
  out += "solstice_vms_running " + std::to_string(st.vms_running.load()) + "\n";
  add_metric(out, "solstice_vm_slots_free", "gauge", "VM slots of this process without a VM.");
  out += "solstice_vm_slots_free " +
         std::to_string(std::max<int64_t>(0, st.slots.load() - st.vms_running.load())) + "\n";
  add_metric(out, "solstice_boot_fallbacks_total", "counter",
             "Boots that fell back from KVM to TCG.");
  out += "solstice_boot_fallbacks_total " + std::to_string(st.boot_fallbacks.load()) + "\n";
  add_metric(out, "solstice_output_bytes_total", "counter",
             "Bytes of step output streamed, by stream.");
  out += "solstice_output_bytes_total{stream=\"stdout\"} " +
         std::to_string(st.stdout_bytes.load()) + "\n";
  out += "solstice_output_bytes_total{stream=\"stderr\"} " +
         std::to_string(st.stderr_bytes.load()) + "\n";
  std::lock_guard lock(st.histograms_mutex);
  add_metric(out, "solstice_job_duration_seconds", "histogram", "Job durations, start to result.");
  st.job_duration.print(out, "solstice_job_duration_seconds", "");
  add_metric(out, "solstice_phase_duration_seconds", "histogram",
             "Durations of a job's phases (prepare, boot_to_ssh, steps, ...).");
  for (const auto& [phase, histogram] : st.phase_duration)
    histogram.print(out, "solstice_phase_duration_seconds", "phase=\"" + phase + "\",");
  return out;
}

void MetricsRegistry::reset() {
  auto& st = state();
  for (auto& count : st.jobs_by_status)
    count = 0;
  st.jobs_running = st.jobs_queued = st.slots = st.vms_running = 0;
  st.boot_fallbacks = st.stdout_bytes = st.stderr_bytes = 0;
  std::lock_guard lock(st.histograms_mutex);
  st.job_duration = Histogram(job_buckets);
  st.phase_duration.clear();
}

}  // namespace solstice
