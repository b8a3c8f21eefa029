#include "actors/host/cluster_cli.hpp"

#include <memory>

#include <CLI/CLI.hpp>

#include "actors/host/cluster/cluster_commands.hpp"

// The commands themselves live in actors/host/cluster/, one file each.
namespace solstice {

using namespace cluster_cli;

void add_cluster_commands(CLI::App& app, std::optional<int>& exit_code) {
  keep_openssl_error_queue_wrappers();
  auto coordinator_options = std::make_shared<CoordinatorOptions>();
  auto* coordinator_app = app.add_subcommand(
    "coordinator", "take jobs over the network and dispatch them to runner nodes");
  coordinator_app
    ->add_option("--listen", coordinator_options->listen,
                 "HOST:PORT to listen on (port 0: any free port, printed on start)")
    ->required();
  add_network_options(*coordinator_app, coordinator_options->net);
  coordinator_app->add_option("--queue-timeout", coordinator_options->queue_timeout_seconds,
                              "seconds a job may wait for a node before it fails (default 3600)");
  coordinator_app->add_option("--metrics-listen", coordinator_options->metrics_listen,
                              "HOST:PORT to serve Prometheus metrics (/metrics) and /healthz on");
  coordinator_app->callback(
    [&exit_code, coordinator_options] { exit_code = coordinator_command(*coordinator_options); });

  auto node_options = std::make_shared<NodeOptions>();
  auto* node_app = app.add_subcommand(
    "node", "run jobs in fresh VMs: those a coordinator dispatches (--join) or those of an "
            "AMQP queue (--amqp)");
  auto* join = node_app->add_option("--join", node_options->join, "the coordinator's HOST:PORT");
  add_network_options(*node_app, node_options->net);
  add_amqp_options(*node_app, node_options->amqp);
  join->excludes(node_app->get_option("--amqp"));
  node_app
    ->add_option("--amqp-events-format", node_options->amqp_events_format,
                 "how events go on the bus: protobuf (length-delimited JobEvent, "
                 "application/x-protobuf) or json (JSON Lines, application/x-ndjson)")
    ->check(CLI::IsMember({"protobuf", "json"}))
    ->capture_default_str();
  node_app->add_option("--name", node_options->name, "node name (default: host name and PID)");
  node_app->add_option("--slots", node_options->slots,
                       "jobs at once (default: max_concurrent_vms of the configuration)");
  node_app->add_option("--memory-mib", node_options->memory_mib,
                       "memory budget for all VMs in MiB (default: 3/4 of the host's memory)");
  node_app->add_option("--config", node_options->config_file,
                       "runner configuration (protobuf JSON of RunnerConfig)");
  node_app->add_option("--state-dir", node_options->state_dir,
                       "where job records and VM work files live");
  node_app->add_option("--accel", node_options->accel, "accelerator: auto, kvm or tcg")
    ->check(CLI::IsMember({"auto", "kvm", "tcg"}));
  node_app->add_flag("--cold", node_options->cold,
                     "boot every job's VM cold, never from a template (as snapshots: off does)");
  node_app->add_option("--metrics-listen", node_options->metrics_listen,
                       "HOST:PORT to serve Prometheus metrics (/metrics) and /healthz on");
  node_app->callback([&exit_code, node_options] { exit_code = node_command(*node_options); });

  auto submit_options = std::make_shared<SubmitOptions>();
  auto* submit_app =
    app.add_subcommand("submit", "run a job on a cluster and stream its output, like `run`");
  auto* to = submit_app->add_option("--to", submit_options->to, "the coordinator's HOST:PORT");
  add_network_options(*submit_app, submit_options->net);
  add_amqp_options(*submit_app, submit_options->amqp);
  to->excludes(submit_app->get_option("--amqp"));
  submit_app->add_flag("--detach", submit_options->detach,
                       "with --amqp: publish the job, print its id and return");
  submit_app->add_option("job", submit_options->job_file, "job file (job.json)")
    ->required()
    ->check(CLI::ExistingFile);
  submit_app->add_flag("--json", submit_options->json, "print every job event as one JSON line");
  submit_app->add_flag("--console", submit_options->console,
                       "show the guest's serial console while it boots");
  submit_app->callback(
    [&exit_code, submit_options] { exit_code = submit_command(*submit_options); });

  auto follow_options = std::make_shared<FollowOptions>();
  auto* follow_app = app.add_subcommand(
    "follow", "show a queued or running job of a coordinator from now on, like `submit`, and "
              "exit with its exit code");
  follow_app->add_option("--coordinator", follow_options->coordinator, "the coordinator's HOST:PORT")
    ->required();
  add_network_options(*follow_app, follow_options->net);
  follow_app->add_option("job_id", follow_options->job_id, "the job's id (as submit printed it)")
    ->required();
  follow_app->add_flag("--json", follow_options->json, "print every job event as one JSON line");
  follow_app->callback(
    [&exit_code, follow_options] { exit_code = follow_command(*follow_options); });

  auto status_options = std::make_shared<StatusOptions>();
  auto* status_app =
    app.add_subcommand("status", "show a coordinator's nodes, slots, queued and running jobs");
  auto* status_to =
    status_app->add_option("--to", status_options->to, "the coordinator's HOST:PORT");
  add_network_options(*status_app, status_options->net);
  add_amqp_options(*status_app, status_options->amqp);
  status_to->excludes(status_app->get_option("--amqp"));
  status_app->callback(
    [&exit_code, status_options] { exit_code = status_command(*status_options); });
}

}  // namespace solstice
