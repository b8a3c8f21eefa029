#pragma once
// The cluster subcommands, one file each: coordinator_command.cpp,
// node_command.cpp, submit_command.cpp, status_command.cpp. Each returns the
// process's exit code.
#include <string>

#include "actors/host/cluster/cluster_support.hpp"

namespace solstice::cluster_cli {

struct CoordinatorOptions {
  std::string listen;
  NetworkOptions net;
  unsigned queue_timeout_seconds = 3600;
  unsigned dispatch_timeout_seconds = 30;
  std::string metrics_listen;  // HOST:PORT of /metrics and /healthz, "" none
};

struct NodeOptions {
  std::string join;
  NetworkOptions net;
  std::string name;
  unsigned slots = 0;
  unsigned memory_mib = 0;
  std::string config_file, state_dir, accel;
  std::string metrics_listen;  // HOST:PORT of /metrics and /healthz, "" none
};

struct SubmitOptions {
  std::string to;
  NetworkOptions net;
  std::string job_file;
  bool json = false;
  bool console = false;
};

struct StatusOptions {
  std::string to;
  NetworkOptions net;
};

int coordinator_command(const CoordinatorOptions& options);
int node_command(const NodeOptions& options);
int submit_command(const SubmitOptions& options);
int status_command(const StatusOptions& options);

}  // namespace solstice::cluster_cli
