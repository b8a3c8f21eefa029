#include "actors/host/metrics_server.hpp"

#include <csignal>
#include <thread>

#include <pthread.h>

#include <httplib.h>
#include <spdlog/spdlog.h>

#include "runtime/base/metrics.hpp"

namespace solstice {

struct MetricsServer::Impl {
  httplib::Server server;
  std::thread thread;
  std::string address;
};

Result<std::unique_ptr<MetricsServer>> MetricsServer::start_if_asked(const std::string& listen) {
  if (listen.empty())
    return std::unique_ptr<MetricsServer>{};
  return start(listen);
}

Result<std::unique_ptr<MetricsServer>> MetricsServer::start(const std::string& listen) {
  const auto colon = listen.rfind(':');
  int port = -1;
  if (colon != std::string::npos && colon > 0) {
    try {
      size_t used = 0;
      port = std::stoi(listen.substr(colon + 1), &used);
      if (used != listen.size() - colon - 1)
        port = -1;
    } catch (const std::exception&) {
      port = -1;
    }
  }
  if (port < 0 || port > 65535)
    return fail("--metrics-listen \"" + listen + "\": expected HOST:PORT, e.g. 127.0.0.1:9464");
  std::string host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);  // [::1]:9464

  auto impl = std::make_unique<Impl>();
  impl->server.Get("/metrics", [](const httplib::Request&, httplib::Response& response) {
    response.set_content(metrics().prometheus_text(), "text/plain; version=0.0.4; charset=utf-8");
  });
  impl->server.Get("/healthz", [](const httplib::Request&, httplib::Response& response) {
    response.set_content("ok\n", "text/plain");
  });
  const int bound = port == 0 ? impl->server.bind_to_any_port(host)
                              : (impl->server.bind_to_port(host, port) ? port : -1);
  if (bound <= 0)
    return fail("--metrics-listen \"" + listen + "\": cannot listen there (a port in use, or an "
                "address not of this host)");
  impl->address = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
                  std::to_string(bound);
  impl->thread = std::thread([server = &impl->server] {
    // Ctrl-C and SIGTERM belong to the thread that waits for them, never this one.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    server->listen_after_bind();
  });
  spdlog::info("metrics on http://{}/metrics, health on http://{}/healthz", impl->address,
               impl->address);
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
}

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MetricsServer::~MetricsServer() {
  impl_->server.stop();
  if (impl_->thread.joinable())
    impl_->thread.join();
}

const std::string& MetricsServer::address() const { return impl_->address; }

}  // namespace solstice
