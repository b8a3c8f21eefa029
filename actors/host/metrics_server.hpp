#pragma once
// The HTTP endpoint of --metrics-listen HOST:PORT: GET /metrics answers the
// process's metrics (runtime/base/metrics) in the Prometheus text format, GET
// /healthz answers 200 "ok" while the process runs. It serves on a thread of its
// own, never on CAF's. The HTTP library (cpp-httplib) stays in the .cpp.
#include <memory>
#include <string>

#include "runtime/base/error.hpp"

namespace solstice {

class MetricsServer {
 public:
  // Binds HOST:PORT (port 0: any free port) and starts serving; an error names
  // the address and why (a bad address, a port in use).
  static Result<std::unique_ptr<MetricsServer>> start(const std::string& listen);
  // As start, but an empty `listen` (no --metrics-listen given) is no server: null.
  static Result<std::unique_ptr<MetricsServer>> start_if_asked(const std::string& listen);
  ~MetricsServer();  // stops serving and joins the thread

  // The address it serves on, "HOST:PORT" with the real port.
  const std::string& address() const;

  struct Impl;

 private:
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace solstice
