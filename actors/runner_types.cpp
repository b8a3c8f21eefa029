#include "actors/runner_types.hpp"

#include <caf/actor_system_config.hpp>
#include <caf/message.hpp>

#include "actors/actors.hpp"

namespace solstice {

namespace {

const char* errc_name(uint8_t code) {
  switch (static_cast<runner_errc>(code)) {
    case runner_errc::invalid_input: return "invalid_input";
    case runner_errc::prepare_failed: return "prepare_failed";
    case runner_errc::qemu_failed: return "qemu_failed";
    case runner_errc::qmp_failed: return "qmp_failed";
    case runner_errc::ssh_failed: return "ssh_failed";
    case runner_errc::console_failed: return "console_failed";
    case runner_errc::cancelled: return "cancelled";
    case runner_errc::kvm_unusable: return "kvm_unusable";
    case runner_errc::not_released: return "not_released";
    case runner_errc::limit_exceeded: return "limit_exceeded";
    case runner_errc::node_unavailable: return "node_unavailable";
  }
  return "unknown";
}

}  // namespace

void use_sleeping_scheduler(caf::actor_system_config& cfg, size_t threads) {
  cfg.set("scheduler.max-threads", threads);
  cfg.set("scheduler.policy", caf::atom("sharing"));
}

void add_runner_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<v1::JobSpec>("solstice.v1.JobSpec");
  cfg.add_message_type<v1::ImageSpec>("solstice.v1.ImageSpec");
  cfg.add_message_type<v1::RunnerConfig>("solstice.v1.RunnerConfig");
  cfg.add_message_type<v1::JobEvent>("solstice.v1.JobEvent");
  cfg.add_message_type<v1::JobResult>("solstice.v1.JobResult");
  cfg.add_message_type<v1::StepResult>("solstice.v1.StepResult");
  cfg.add_message_type<v1::OutputChunk>("solstice.v1.OutputChunk");
  cfg.add_message_type<v1::VmHandle>("solstice.v1.VmHandle");
  cfg.add_message_type<v1::ProcessExit>("solstice.v1.ProcessExit");
  cfg.add_message_type<v1::QmpEvent>("solstice.v1.QmpEvent");
  cfg.add_message_type<event_sink_actor>("solstice.event_sink_actor");
  cfg.add_message_type<guest_shell_actor>("solstice.guest_shell_actor");
  cfg.add_message_type<job_supervisor_actor>("solstice.job_supervisor_actor");
  // Cluster (coordinator and runner nodes).
  cfg.add_message_type<node_offer>("solstice.node_offer");
  cfg.add_message_type<cluster_job_info>("solstice.cluster_job_info");
  cfg.add_message_type<cluster_node_info>("solstice.cluster_node_info");
  cfg.add_message_type<cluster_status>("solstice.cluster_status");
  cfg.add_message_type<runner_node_actor>("solstice.runner_node_actor");
  cfg.add_message_type<coordinator_actor>("solstice.coordinator_actor");
  cfg.add_error_category(caf::atom("solstice"),
                         [](uint8_t code, caf::atom_value, const caf::message& context) {
                           std::string out = errc_name(code);
                           if (context.match_elements<std::string>())
                             out += ": " + context.get_as<std::string>(0);
                           return out;
                         });
}

std::string error_text(const caf::error& err) {
  if (!err)
    return "no error";
  if (err.category() == caf::atom("solstice") && err.context().match_elements<std::string>())
    return err.context().get_as<std::string>(0);
  return caf::to_string(err);
}

}  // namespace solstice
