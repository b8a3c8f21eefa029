#include "runtime/host/cluster_cli.hpp"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <caf/actor_system.hpp>
#include <caf/after.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/publish.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/openssl/publish.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include "actors/coordinator.hpp"
#include "actors/runner_node.hpp"
#include "actors/runner_types.hpp"
#include "actors/terminal_printer.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/host/embedding.hpp"
#include "runtime/host/runner_host.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/runner_config.hpp"

// CAF 0.17's TLS layer (caf::openssl) calls SSL_get_error() after SSL_read,
// SSL_write, SSL_accept and SSL_connect without clearing OpenSSL's per-thread
// error queue first, and never drains it (its logging is compiled out). So once
// one TLS peer goes away or fails its handshake, the error it left behind makes
// the next read on any other connection of the same network thread look like a
// TLS failure, and CAF drops that healthy connection. These wrappers take
// precedence over libssl's symbols for the whole process (the executable
// exports them because libcaf_openssl refers to them) and start every call with
// an empty error queue, as OpenSSL requires.
namespace {

template <class Function>
Function next_symbol(const char* name) {
  return reinterpret_cast<Function>(::dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" int SSL_read(SSL* ssl, void* buffer, int size) {
  static auto next = next_symbol<int (*)(SSL*, void*, int)>("SSL_read");
  ERR_clear_error();
  return next(ssl, buffer, size);
}

extern "C" int SSL_write(SSL* ssl, const void* buffer, int size) {
  static auto next = next_symbol<int (*)(SSL*, const void*, int)>("SSL_write");
  ERR_clear_error();
  return next(ssl, buffer, size);
}

extern "C" int SSL_accept(SSL* ssl) {
  static auto next = next_symbol<int (*)(SSL*)>("SSL_accept");
  ERR_clear_error();
  return next(ssl);
}

extern "C" int SSL_connect(SSL* ssl) {
  static auto next = next_symbol<int (*)(SSL*)>("SSL_connect");
  ERR_clear_error();
  return next(ssl);
}

namespace solstice {

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// ------------------------------------------------------------ options

struct NetworkOptions {
  std::string cert, key, ca;
  bool insecure = false;
  unsigned connection_timeout_seconds = 10;

  bool tls() const { return !insecure; }
};

struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::string text() const {
    return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
           std::to_string(port);
  }
};

struct CoordinatorOptions {
  std::string listen;
  NetworkOptions net;
  unsigned queue_timeout_seconds = 3600;
  unsigned dispatch_timeout_seconds = 30;
};

struct NodeOptions {
  std::string join;
  NetworkOptions net;
  std::string name;
  unsigned slots = 0;
  unsigned memory_mib = 0;
  std::string config_file, state_dir, accel;
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

void add_network_options(CLI::App& app, NetworkOptions& net) {
  app.add_option("--cert", net.cert, "this peer's certificate (PEM), signed by the cluster's CA");
  app.add_option("--key", net.key, "the private key of --cert (PEM, not encrypted)");
  app.add_option("--ca", net.ca, "the cluster's CA certificate (PEM): peers must be signed by it");
  app.add_flag("--insecure", net.insecure,
               "plaintext and unauthenticated: no TLS (only on a network you trust)");
  app.add_option("--connection-timeout", net.connection_timeout_seconds,
                 "seconds without a heartbeat before a peer counts as lost (default 10)")
    ->check(CLI::Range(2u, 3600u));
}

Result<Endpoint> parse_endpoint(const std::string& text, const std::string& option) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
    return fail(option + " '" + text + "': expected HOST:PORT, e.g. 127.0.0.1:4711");
  Endpoint endpoint;
  endpoint.host = text.substr(0, colon);
  if (endpoint.host.size() > 2 && endpoint.host.front() == '[' && endpoint.host.back() == ']')
    endpoint.host = endpoint.host.substr(1, endpoint.host.size() - 2);
  auto port_text = text.substr(colon + 1);
  if (port_text.find_first_not_of("0123456789") != std::string::npos || port_text.size() > 5 ||
      std::stoul(port_text) > 65535)
    return fail(option + " '" + text + "': the port must be a number from 0 to 65535");
  endpoint.port = static_cast<uint16_t>(std::stoul(port_text));
  return endpoint;
}

// ------------------------------------------------------------ TLS files

template <class T, void (*Free)(T*)>
struct OpenSslDeleter {
  void operator()(T* x) const { Free(x); }
};
using X509Ptr = std::unique_ptr<X509, OpenSslDeleter<X509, X509_free>>;
using KeyPtr = std::unique_ptr<EVP_PKEY, OpenSslDeleter<EVP_PKEY, EVP_PKEY_free>>;
using StorePtr = std::unique_ptr<X509_STORE, OpenSslDeleter<X509_STORE, X509_STORE_free>>;
using StoreCtxPtr =
  std::unique_ptr<X509_STORE_CTX, OpenSslDeleter<X509_STORE_CTX, X509_STORE_CTX_free>>;

std::string openssl_error() {
  std::string text;
  while (auto code = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof buf);
    text += (text.empty() ? "" : "; ") + std::string{buf};
  }
  return text.empty() ? "unknown OpenSSL error" : text;
}

// Never prompt on the terminal for a passphrase.
int no_passphrase(char*, int, int, void*) { return -1; }

// CAF's TLS layer throws deep inside its network thread when a file is bad; check
// everything here first so the user gets a plain message instead.
Result<void> check_tls_files(const NetworkOptions& net) {
  if (net.insecure) {
    if (!net.cert.empty() || !net.key.empty() || !net.ca.empty())
      return fail("--insecure turns TLS off: leave out --cert, --key and --ca, or --insecure");
    return {};
  }
  if (net.cert.empty() || net.key.empty() || net.ca.empty())
    return fail("TLS needs --cert, --key and --ca (all PEM files); for plaintext on a trusted "
                "network give --insecure");
  auto open = [](const std::string& path) -> Result<FILE*> {
    FILE* file = std::fopen(path.c_str(), "re");
    if (!file)
      return fail(errno_message("cannot open " + path, errno));
    return file;
  };
  ERR_clear_error();
  auto cert_file = open(net.cert);
  if (!cert_file)
    return tl::unexpected(cert_file.error());
  X509Ptr cert{PEM_read_X509(*cert_file, nullptr, no_passphrase, nullptr)};
  std::fclose(*cert_file);
  if (!cert)
    return fail("--cert " + net.cert + " is not a PEM certificate: " + openssl_error());
  auto key_file = open(net.key);
  if (!key_file)
    return tl::unexpected(key_file.error());
  KeyPtr key{PEM_read_PrivateKey(*key_file, nullptr, no_passphrase, nullptr)};
  std::fclose(*key_file);
  if (!key)
    return fail("--key " + net.key + " is not an unencrypted PEM private key: " + openssl_error());
  if (X509_check_private_key(cert.get(), key.get()) != 1)
    return fail("--key " + net.key + " does not belong to --cert " + net.cert);
  StorePtr store{X509_STORE_new()};
  if (!store || X509_STORE_load_locations(store.get(), net.ca.c_str(), nullptr) != 1)
    return fail("--ca " + net.ca + " is not a PEM CA certificate: " + openssl_error());
  StoreCtxPtr ctx{X509_STORE_CTX_new()};
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), cert.get(), nullptr) != 1)
    return fail("cannot check --cert against --ca: " + openssl_error());
  if (X509_verify_cert(ctx.get()) != 1)
    return fail("--cert " + net.cert + " is not accepted by --ca " + net.ca + ": " +
                X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())) +
                " (peers trusting that CA would refuse it)");
  return {};
}

// ------------------------------------------------------------ actor system

struct ClusterConfig : caf::actor_system_config {
  explicit ClusterConfig(const NetworkOptions& net) {
    add_runner_types(*this);
    load<caf::io::middleman>();
    if (net.tls()) {
      load<caf::openssl::manager>();
      openssl_certificate = fs::absolute(net.cert).string();
      openssl_key = fs::absolute(net.key).string();
      openssl_cafile = fs::absolute(net.ca).string();
    }
    set("middleman.app-identifiers", std::vector<std::string>{cluster_protocol});
    // Heartbeats in both directions make a silent peer count as lost after the
    // connection timeout (CAF has both off by default).
    caf::timespan timeout = std::chrono::seconds(net.connection_timeout_seconds);
    caf::timespan heartbeat = std::min<caf::timespan>(1s, timeout / 4);
    set("middleman.heartbeat-interval", caf::timespan{heartbeat});
    set("middleman.connection-timeout", caf::timespan{timeout});
    set("scheduler.max-threads", 4);
  }
};

std::string connect_error_text(const caf::actor_system& sys, const caf::error& err,
                               const Endpoint& to, const NetworkOptions& net) {
  auto where = to.text();
  if (err == caf::sec::incompatible_application_ids)
    return where + " speaks another cluster protocol version (this runner speaks " +
           cluster_protocol + "): run the same solstice-runner version on both sides";
  if (err == caf::sec::unexpected_actor_messaging_interface)
    return where + " is a CAF application but not a compatible solstice-runner coordinator";
  if (err == caf::sec::no_actor_published_at_port)
    return "nothing is published at " + where;
  if (err == caf::sec::request_timeout)
    return "no handshake from " + where + " within the timeout (is it a solstice-runner "
                                          "coordinator, and reachable?)";
  if (err == caf::sec::disconnect_during_handshake)
    return where + " closed the connection during the handshake: " +
           (net.tls() ? "it refused our certificate (is it signed by the coordinator's CA?), "
                        "its certificate is not signed by --ca " + net.ca +
                          ", or it does not use TLS (--insecure)"
                      : "it probably requires TLS (give --cert, --key and --ca)");
  if (err == caf::sec::cannot_connect_to_node)
    return "cannot connect to " + where + ": " + sys.render(err);
  return "cannot reach the coordinator at " + where + ": " + sys.render(err);
}

// Connects to the coordinator at `to` (through TLS unless --insecure), waiting
// at most `timeout` for the connection and CAF's handshake.
Result<coordinator_actor> connect_to_coordinator(caf::actor_system& sys, const Endpoint& to,
                                                 const NetworkOptions& net,
                                                 std::chrono::milliseconds timeout) {
  auto manager = net.tls() ? sys.openssl_manager().actor_handle() : sys.middleman().actor_handle();
  caf::scoped_actor self{sys};
  Result<coordinator_actor> result = fail("no answer");
  self->request(manager, timeout, caf::connect_atom::value, to.host, to.port)
    .receive(
      [&](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>& ifs) {
        if (!ptr)
          result = fail("nothing is published at " + to.text());
        else if (!sys.assignable<coordinator_actor>(ifs))
          result = fail(connect_error_text(sys, caf::sec::unexpected_actor_messaging_interface,
                                           to, net));
        else
          result = caf::actor_cast<coordinator_actor>(std::move(ptr));
      },
      [&](caf::error& err) { result = fail(connect_error_text(sys, err, to, net)); });
  return result;
}

// ------------------------------------------------------------ signals

// Blocks the termination signals in this thread (and every thread it starts
// later), so they can be taken synchronously with next_signal().
class BlockedSignals {
 public:
  BlockedSignals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~BlockedSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  BlockedSignals(const BlockedSignals&) = delete;
  BlockedSignals& operator=(const BlockedSignals&) = delete;

  // The next pending termination signal, waiting at most `wait`; 0 if none.
  int next_signal(std::chrono::milliseconds wait) {
    timespec timeout{static_cast<time_t>(wait.count() / 1000),
                     static_cast<long>((wait.count() % 1000) * 1000000)};
    int sig = ::sigtimedwait(&set_, nullptr, &timeout);
    return sig > 0 ? sig : 0;
  }

 private:
  sigset_t set_{};
  sigset_t old_{};
};

void say(const char* format, const std::string& text) {
  std::fprintf(stderr, format, text.c_str());
  std::fflush(stderr);
}

// ------------------------------------------------------------ coordinator

int coordinator_command(const CoordinatorOptions& options) {
  auto listen = parse_endpoint(options.listen, "--listen");
  if (!listen) {
    say("solstice-runner: %s\n", listen.error().message);
    return exit_invalid_input;
  }
  if (auto ok = check_tls_files(options.net); !ok) {
    say("solstice-runner: %s\n", ok.error().message);
    return exit_invalid_input;
  }
  BlockedSignals signals;
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  coordinator_options settings;
  settings.queue_timeout = std::chrono::seconds(options.queue_timeout_seconds);
  settings.dispatch_timeout = std::chrono::seconds(options.dispatch_timeout_seconds);
  auto coordinator_handle = sys.spawn(coordinator, settings);
  const char* address = listen->host == "*" ? nullptr : listen->host.c_str();
  auto port = options.net.tls()
                ? caf::openssl::publish(coordinator_handle, listen->port, address, true)
                : caf::io::publish(coordinator_handle, listen->port, address, true);
  if (!port) {
    say("solstice-runner: cannot listen on %s\n", listen->text() + ": " + sys.render(port.error()));
    caf::anon_send_exit(coordinator_handle, caf::exit_reason::user_shutdown);
    return exit_infrastructure_error;
  }
  // The first line on stdout says where it listens (with the port chosen when
  // --listen gave port 0).
  Endpoint bound{listen->host, *port};
  std::printf("solstice-runner coordinator listening on %s (%s)\n", bound.text().c_str(),
              options.net.tls() ? ("TLS, peers must be signed by " + options.net.ca).c_str()
                                : "plaintext, --insecure");
  std::fflush(stdout);
  while (!signals.next_signal(1000ms)) {
  }
  say("solstice-runner: %s\n", "coordinator shutting down");
  caf::anon_send_exit(coordinator_handle, caf::exit_reason::user_shutdown);
  return 0;
}

// ------------------------------------------------------------ node

Result<v1::RunnerConfig> load_node_config(const NodeOptions& options) {
  return load_effective_config(options.config_file, options.state_dir, options.accel);
}

std::string default_node_name() {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0)
    std::snprintf(host, sizeof host, "node");
  return std::string{host} + "-" + std::to_string(::getpid());
}

uint32_t default_memory_budget_mib() {
  auto pages = ::sysconf(_SC_PHYS_PAGES);
  auto page_size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0)
    return 0;
  auto total_mib = static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size) >> 20;
  // Leave a quarter of the host's memory to the host.
  return static_cast<uint32_t>(total_mib * 3 / 4);
}

int node_command(const NodeOptions& options) {
  auto join = parse_endpoint(options.join, "--join");
  if (!join) {
    say("solstice-runner: %s\n", join.error().message);
    return exit_invalid_input;
  }
  if (auto ok = check_tls_files(options.net); !ok) {
    say("solstice-runner: %s\n", ok.error().message);
    return exit_invalid_input;
  }
  auto config = load_node_config(options);
  if (!config) {
    say("solstice-runner: %s\n", config.error().message);
    return exit_invalid_input;
  }
  // Whatever a node that died left in this state directory is cleaned first, the
  // way every embedding host does at its start.
  if (auto recovered = recover_abandoned_jobs_at_start(*config); !recovered)
    say("solstice-runner: recovery skipped: %s\n", recovered.error().message);
  else
    for (const auto& job : *recovered)
      say("solstice-runner: %s\n", job.description);
  node_offer offer;
  offer.name = options.name.empty() ? default_node_name() : options.name;
  offer.slots = options.slots ? options.slots : std::max(1u, config->max_concurrent_vms());
  offer.memory_mib = options.memory_mib ? options.memory_mib : default_memory_budget_mib();
  for (const auto& image : config->images())
    offer.labels[image.label()] = image.memory_mib() ? image.memory_mib() : 512;

  BlockedSignals signals;
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  job_launcher launcher = [config = *config](caf::actor_system& system, const v1::JobSpec& job,
                                             event_sink_actor events) -> Result<launched_job> {
    auto started = start_job(system, job, config, std::move(events));
    if (!started)
      return tl::unexpected(started.error());
    return launched_job{started->supervisor, started->recorder};
  };
  // Detached: the launcher validates each job (the disk image check runs
  // `qemu-img info`) inside the node's handler, which must not hold a thread of
  // the shared scheduler.
  auto node = sys.spawn<caf::detached>(runner_node, offer.name, offer.slots, launcher);
  caf::scoped_actor self{sys};
  self->monitor(node);
  auto node_down = false;

  // Stops the node: its jobs are cancelled (their VMs powered down); a second
  // signal, or two minutes, and it is killed.
  auto shut_down = [&] {
    say("solstice-runner: %s\n", "node shutting down: cancelling its jobs");
    self->send(node, stop_atom::value);
    auto deadline = std::chrono::steady_clock::now() + 2min;
    while (!node_down && std::chrono::steady_clock::now() < deadline) {
      self->receive([&](caf::down_msg& msg) { node_down |= msg.source == node.address(); },
                    caf::after(200ms) >> [] {});
      if (signals.next_signal(0ms))
        break;
    }
    if (!node_down)
      self->send_exit(node, caf::exit_reason::kill);
    return 0;
  };

  auto backoff = 500ms;
  const auto max_backoff = std::chrono::milliseconds(30s);
  const auto request_timeout = std::chrono::milliseconds(10s);
  for (;;) {
    auto coordinator_handle = connect_to_coordinator(sys, *join, options.net, request_timeout);
    std::string problem;
    if (!coordinator_handle) {
      problem = coordinator_handle.error().message;
    } else {
      self->request(*coordinator_handle, request_timeout, join_atom::value, offer, node)
        .receive([](ok_atom) {},
                 [&](caf::error& err) { problem = "the coordinator refused to let this node join: " + error_text(err); });
    }
    if (problem.empty()) {
      backoff = 500ms;
      std::printf("node %s joined the coordinator at %s: %u slot(s), memory budget %u MiB\n",
                  offer.name.c_str(), join->text().c_str(), offer.slots, offer.memory_mib);
      std::fflush(stdout);
      self->monitor(*coordinator_handle);
      auto lost = false;
      while (!lost) {
        std::string reason;
        self->receive(
          [&](caf::down_msg& msg) {
            if (msg.source == coordinator_handle->address()) {
              lost = true;
              reason = peer_loss_text(msg.reason);
            } else if (msg.source == node.address()) {
              node_down = true;
            }
          },
          caf::after(200ms) >> [] {});
        if (node_down) {
          say("solstice-runner: %s\n", "the node actor ended unexpectedly");
          return exit_infrastructure_error;
        }
        if (signals.next_signal(0ms))
          return shut_down();
        if (lost)
          say("solstice-runner: lost the coordinator (%s); this node's jobs are cancelled, "
              "reconnecting\n",
              reason);
      }
    } else {
      say("solstice-runner: %s\n", problem + "; retrying in " +
                                     std::to_string(backoff.count()) + " ms");
    }
    // Back off before the next attempt, still answering signals.
    auto until = std::chrono::steady_clock::now() + backoff;
    while (std::chrono::steady_clock::now() < until) {
      if (signals.next_signal(100ms))
        return shut_down();
    }
    backoff = std::min(backoff * 2, max_backoff);
  }
}

// ------------------------------------------------------------ submit

int submit_command(const SubmitOptions& options) {
  auto to = parse_endpoint(options.to, "--to");
  if (!to) {
    say("solstice-runner: %s\n", to.error().message);
    return exit_invalid_input;
  }
  if (auto ok = check_tls_files(options.net); !ok) {
    say("solstice-runner: %s\n", ok.error().message);
    return exit_invalid_input;
  }
  auto job = load_job_file(options.job_file);
  if (!job) {
    say("solstice-runner: %s\n", job.error().message);
    return exit_invalid_input;
  }
  if (job->id().empty())
    job->set_id(make_job_id());

  BlockedSignals signals;
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  auto coordinator_handle = connect_to_coordinator(sys, *to, options.net, 30s);
  if (!coordinator_handle) {
    say("solstice-runner: %s\n", coordinator_handle.error().message);
    return exit_infrastructure_error;
  }
  if (!options.json) {
    std::printf("job %s: %s\n  submitted to %s\n", job->id().c_str(),
                job->name().empty() ? "(unnamed)" : job->name().c_str(), to->text().c_str());
    std::fflush(stdout);
  }
  auto result = std::make_shared<std::optional<v1::JobResult>>();
  auto result_mutex = std::make_shared<std::mutex>();
  auto printer = sys.spawn<caf::detached>(
    terminal_printer, options.json, options.console, static_cast<uint32_t>(job->steps_size()),
    [result, result_mutex](const v1::JobResult& r) {
      std::lock_guard<std::mutex> lock{*result_mutex};
      *result = r;
    });
  caf::scoped_actor self{sys};
  self->monitor(printer);
  self->monitor(*coordinator_handle);
  std::string problem;
  auto invalid = false;
  self->request(*coordinator_handle, std::chrono::milliseconds(30s), submit_atom::value, *job,
                printer)
    .receive([](const std::string&) {},
             [&](caf::error& err) {
               invalid = err.category() == caf::atom("solstice");
               problem = "the coordinator did not take the job: " + error_text(err);
             });
  auto finish = [&](int code) {
    self->send_exit(printer, caf::exit_reason::user_shutdown);
    return code;
  };
  if (!problem.empty()) {
    say("solstice-runner: %s\n", problem);
    return finish(invalid ? exit_invalid_input : exit_infrastructure_error);
  }
  int interrupts = 0;
  for (;;) {
    auto printer_done = false;
    std::string lost;
    self->receive(
      [&](caf::down_msg& msg) {
        if (msg.source == printer.address())
          printer_done = true;
        else if (msg.source == coordinator_handle->address())
          lost = peer_loss_text(msg.reason);
      },
      caf::after(200ms) >> [] {});
    if (printer_done)
      break;
    if (!lost.empty()) {
      say("solstice-runner: lost the coordinator (%s) before the job ended; its result is "
          "unknown\n",
          lost);
      return finish(exit_infrastructure_error);
    }
    if (signals.next_signal(0ms)) {
      if (++interrupts == 1) {
        say("\nsolstice-runner: %s\n",
            "cancelling the job (interrupt again to stop waiting for it)");
        self->send(*coordinator_handle, cancel_atom::value, job->id());
      } else {
        say("\nsolstice-runner: %s\n",
            "no longer waiting; the coordinator cancels the job as this submitter goes away");
        return finish(exit_cancelled);
      }
    }
  }
  std::lock_guard<std::mutex> lock{*result_mutex};
  if (!*result) {
    say("solstice-runner: job %s ended without a result\n", job->id());
    return exit_infrastructure_error;
  }
  return exit_code_for(**result);
}

// ------------------------------------------------------------ status

std::string age_text(int64_t since_us) {
  if (since_us <= 0)
    return "-";
  auto seconds = std::max<int64_t>(0, (unix_now_us() - since_us) / 1000000);
  char buf[32];
  if (seconds < 120)
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(seconds));
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(seconds / 60),
                  static_cast<long long>(seconds % 60));
  return buf;
}

std::string format_status(const cluster_status& status, const Endpoint& at) {
  std::string out;
  char buf[512];
  uint32_t slots = 0, used = 0;
  for (const auto& node : status.nodes) {
    slots += node.offer.slots;
    used += node.slots_used;
  }
  std::snprintf(buf, sizeof buf,
                "coordinator %s: %zu node(s), %u of %u slot(s) in use, %zu queued, %zu running\n",
                at.text().c_str(), status.nodes.size(), used, slots, status.queued.size(),
                status.running.size());
  out += buf;
  out += "\nNODES\n";
  std::snprintf(buf, sizeof buf, "  %-24s %-7s %-17s %s\n", "NAME", "SLOTS", "MEMORY (MiB)",
                "LABELS");
  out += buf;
  for (const auto& node : status.nodes) {
    std::string labels;
    for (const auto& [label, memory] : node.offer.labels)
      labels += (labels.empty() ? "" : ", ") + label;
    auto memory = std::to_string(node.memory_used_mib) + "/" +
                  (node.offer.memory_mib ? std::to_string(node.offer.memory_mib) : "unlimited");
    auto slot_text = std::to_string(node.slots_used) + "/" + std::to_string(node.offer.slots);
    std::snprintf(buf, sizeof buf, "  %-24s %-7s %-17s %s\n", node.offer.name.c_str(),
                  slot_text.c_str(), memory.c_str(), labels.empty() ? "-" : labels.c_str());
    out += buf;
  }
  if (status.nodes.empty())
    out += "  (none)\n";
  out += "\nRUNNING\n";
  std::snprintf(buf, sizeof buf, "  %-24s %-20s %-24s %-21s %-8s %s\n", "JOB", "NAME", "NODE",
                "STATE", "ATTEMPT", "FOR");
  out += buf;
  for (const auto& job : status.running) {
    std::snprintf(buf, sizeof buf, "  %-24s %-20s %-24s %-21s %-8u %s\n", job.job_id.c_str(),
                  job.name.c_str(), job.node.c_str(), job.state.c_str(), job.attempt,
                  age_text(job.since_us).c_str());
    out += buf;
  }
  if (status.running.empty())
    out += "  (none)\n";
  out += "\nQUEUED\n";
  std::snprintf(buf, sizeof buf, "  %-24s %-20s %s\n", "JOB", "NAME", "WAITING");
  out += buf;
  for (const auto& job : status.queued) {
    std::snprintf(buf, sizeof buf, "  %-24s %-20s %s\n", job.job_id.c_str(), job.name.c_str(),
                  age_text(job.since_us).c_str());
    out += buf;
  }
  if (status.queued.empty())
    out += "  (none)\n";
  return out;
}

int status_command(const StatusOptions& options) {
  auto to = parse_endpoint(options.to, "--to");
  if (!to) {
    say("solstice-runner: %s\n", to.error().message);
    return exit_invalid_input;
  }
  if (auto ok = check_tls_files(options.net); !ok) {
    say("solstice-runner: %s\n", ok.error().message);
    return exit_invalid_input;
  }
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  auto coordinator_handle = connect_to_coordinator(sys, *to, options.net, 15s);
  if (!coordinator_handle) {
    say("solstice-runner: %s\n", coordinator_handle.error().message);
    return exit_infrastructure_error;
  }
  caf::scoped_actor self{sys};
  int code = 0;
  self->request(*coordinator_handle, std::chrono::milliseconds(15s), status_atom::value)
    .receive(
      [&](const cluster_status& status) {
        auto text = format_status(status, *to);
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      },
      [&](caf::error& err) {
        say("solstice-runner: the coordinator did not answer: %s\n", error_text(err));
        code = exit_infrastructure_error;
      });
  return code;
}

}  // namespace

void add_cluster_commands(CLI::App& app, std::optional<int>& exit_code) {
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
  coordinator_app->callback(
    [&exit_code, coordinator_options] { exit_code = coordinator_command(*coordinator_options); });

  auto node_options = std::make_shared<NodeOptions>();
  auto* node_app = app.add_subcommand(
    "node", "join a coordinator and run the jobs it dispatches, each in a fresh VM");
  node_app->add_option("--join", node_options->join, "the coordinator's HOST:PORT")->required();
  add_network_options(*node_app, node_options->net);
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
  node_app->callback([&exit_code, node_options] { exit_code = node_command(*node_options); });

  auto submit_options = std::make_shared<SubmitOptions>();
  auto* submit_app =
    app.add_subcommand("submit", "run a job on a cluster and stream its output, like `run`");
  submit_app->add_option("--to", submit_options->to, "the coordinator's HOST:PORT")->required();
  add_network_options(*submit_app, submit_options->net);
  submit_app->add_option("job", submit_options->job_file, "job file (job.json)")
    ->required()
    ->check(CLI::ExistingFile);
  submit_app->add_flag("--json", submit_options->json, "print every job event as one JSON line");
  submit_app->add_flag("--console", submit_options->console,
                       "show the guest's serial console while it boots");
  submit_app->callback(
    [&exit_code, submit_options] { exit_code = submit_command(*submit_options); });

  auto status_options = std::make_shared<StatusOptions>();
  auto* status_app =
    app.add_subcommand("status", "show a coordinator's nodes, slots, queued and running jobs");
  status_app->add_option("--to", status_options->to, "the coordinator's HOST:PORT")->required();
  add_network_options(*status_app, status_options->net);
  status_app->callback(
    [&exit_code, status_options] { exit_code = status_command(*status_options); });
}

}  // namespace solstice
