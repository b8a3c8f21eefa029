#pragma once
// The cluster subcommands, one file each: coordinator_command.cpp,
// node_command.cpp, submit_command.cpp, follow_command.cpp, status_command.cpp;
// their AMQP forms in amqp_node_command.cpp and amqp_submit_command.cpp (what a
// node is, for either intake: node_setup.cpp). Each returns the process's exit code.
#include <functional>
#include <optional>
#include <string>

#include <caf/scoped_actor.hpp>

#include "actors/cluster/runner_node.hpp"
#include "actors/host/cluster/cluster_support.hpp"
#include "runtime/amqp/amqp_client.hpp"

namespace solstice::cluster_cli {

struct CoordinatorOptions {
  std::string listen;
  NetworkOptions net;
  unsigned queue_timeout_seconds = 3600;
  unsigned dispatch_timeout_seconds = 30;
  std::string metrics_listen;  // HOST:PORT of /metrics and /healthz, "" none
};

// --amqp URL and how to log in; an empty url: not on AMQP.
struct AmqpOptions {
  std::string url, password_file, ca, cert, key;
  amqp::Names names;
};

struct NodeOptions {
  std::string join;
  AmqpOptions amqp;
  NetworkOptions net;
  std::string name;
  unsigned slots = 0;
  unsigned memory_mib = 0;
  std::string config_file, state_dir, accel;
  std::string metrics_listen;  // HOST:PORT of /metrics and /healthz, "" none
  bool cold = false;           // every job boots cold (snapshots: off)
  std::string amqp_events_format = "protobuf";  // or "json": messages of events on AMQP
};

struct SubmitOptions {
  std::string to;
  AmqpOptions amqp;
  bool detach = false;
  NetworkOptions net;
  std::string job_file;
  bool json = false;
  bool console = false;
};

struct FollowOptions {
  std::string coordinator;
  NetworkOptions net;
  std::string job_id;
  bool json = false;
};

struct StatusOptions {
  std::string to;
  AmqpOptions amqp;
  NetworkOptions net;
};

// A node's effective configuration and what it offers (node_setup.cpp).
struct PreparedNode {
  v1::RunnerConfig config;
  node_offer offer;
};

// Loads the configuration and cleans up what a node that died left in its state
// directory.
Result<PreparedNode> prepare_node(const NodeOptions& options);

// The runner_node actor that runs the node's jobs (detached). With
// `replace_records` a job whose id has a finished record here replaces it (a
// job the broker delivers again is the same job).
runner_node_actor spawn_runner_node(caf::actor_system& sys, const PreparedNode& node,
                                    bool replace_records);

// --amqp-* options on `app`.
void add_amqp_options(CLI::App& app, AmqpOptions& amqp);

// The endpoint of `--amqp`: URL checked, password read (never from the command line).
Result<amqp::Endpoint> amqp_endpoint(const AmqpOptions& options);

int coordinator_command(const CoordinatorOptions& options);
int node_command(const NodeOptions& options);
int submit_command(const SubmitOptions& options);
int amqp_node_command(const NodeOptions& options);
int amqp_submit_command(const SubmitOptions& options);

// The job of `submit` (either intake), ready to leave this host: read and checked,
// its uploads packed into it (a remote node reads no file of ours), an id given.
// The error names the job file.
Result<v1::JobSpec> submittable_job(const std::string& job_file);
int status_command(const StatusOptions& options);
int follow_command(const FollowOptions& options);

// How show_job prints: like `run` (--json, --console; the step count if known, else 0).
struct Printing {
  bool json = false;
  bool console = false;
  uint32_t step_count = 0;
};

// What asking the coordinator for a job's events gave: "" or why not, and
// whether that is the user's to fix (exit 2).
struct Attached {
  std::string problem;
  bool invalid = false;
};

// Shows a job on the terminal until its result, for submit and follow
// (submit_command.cpp): `attach` asks the coordinator to send the job's events to
// the printer. Returns the exit code: the job's, or why the wait ended otherwise
// (the coordinator lost; an interrupt, which with `interrupt_cancels` first
// cancels the job and gives up at the second, and otherwise only stops following).
int show_job(caf::actor_system& sys, const coordinator_actor& coordinator,
             const std::string& job_id, const Printing& printing, BlockedSignals& signals,
             bool interrupt_cancels,
             const std::function<Attached(caf::scoped_actor&, const event_sink_actor&)>& attach);

}  // namespace solstice::cluster_cli
