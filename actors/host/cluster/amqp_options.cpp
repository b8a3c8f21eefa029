// The --amqp options of `node` and `submit`, and the endpoint they make.
#include <CLI/CLI.hpp>

#include "actors/host/cluster/cluster_commands.hpp"

namespace solstice::cluster_cli {

void add_amqp_options(CLI::App& app, AmqpOptions& amqp) {
  app.add_option("--amqp", amqp.url,
                 "the AMQP broker: amqp://USER@HOST:PORT/VHOST or amqps://... (no password: "
                 "SOLSTICE_AMQP_PASSWORD or --amqp-password-file)");
  app.add_option("--amqp-password-file", amqp.password_file,
                 "file whose first line is the AMQP password");
  app.add_option("--amqp-ca", amqp.ca, "amqps: the broker's CA certificate (PEM)");
  app.add_option("--amqp-cert", amqp.cert, "amqps: this client's certificate (PEM)");
  app.add_option("--amqp-key", amqp.key, "amqps: the private key of --amqp-cert (PEM)");
  auto& n = amqp.names;
  app.add_option("--amqp-jobs-exchange", n.jobs_exchange, "direct exchange jobs are published to")
    ->capture_default_str();
  app.add_option("--amqp-jobs-queue", n.jobs_queue, "queue nodes take jobs from")
    ->capture_default_str();
  app.add_option("--amqp-dead-letter-queue", n.dead_letter_queue,
                 "queue of messages that are not valid jobs")
    ->capture_default_str();
  app.add_option("--amqp-events-exchange", n.events_exchange,
                 "topic exchange of job events (key job.<id>)")
    ->capture_default_str();
  app.add_option("--amqp-results-exchange", n.results_exchange,
                 "topic exchange of job results (key job.<id>)")
    ->capture_default_str();
  app.add_option("--amqp-results-queue", n.results_queue,
                 "durable queue bound to every result (\"\": none)")
    ->capture_default_str();
}

Result<amqp::Endpoint> amqp_endpoint(const AmqpOptions& options) {
  if (auto ok = amqp::check_url(options.url); !ok)
    return tl::unexpected(ok.error());
  auto password = amqp::password_from(options.password_file);
  if (!password)
    return tl::unexpected(password.error());
  if (options.cert.empty() != options.key.empty())
    return fail("--amqp-cert and --amqp-key go together");
  return amqp::Endpoint{options.url, *password, options.ca, options.cert, options.key};
}

}  // namespace solstice::cluster_cli
