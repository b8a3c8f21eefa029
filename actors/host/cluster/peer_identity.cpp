// Cluster roles from certificates, and which certificate speaks for which peer.
//
// The field: each certificate carries exactly one role as a subjectAltName URI,
// `solstice:role/node`, `solstice:role/submitter`, `solstice:role/operator` or
// `solstice:role/coordinator`, and its name as the subject's CN. Clients check
// that what they connected to holds a coordinator's certificate. A SAN URI, because the CA signs it with the
// rest (a holder cannot change it), it needs no private OID (an extended key
// usage would), `openssl req -addext subjectAltName=URI:...` writes it and
// `openssl x509 -text` shows it. A certificate with no role URI, or several,
// may do nothing.
//
// Which certificate sent a message: CAF 0.17's TLS layer (caf::openssl) keeps
// each connection's SSL object to itself and gives an actor only the sender's
// node id — a number the peer itself claims in its BASP handshake, and one a
// peer could also claim in a "routed" message or a forged down message. So the
// coordinator watches its accepted TLS connections where the bytes pass: the
// process's SSL_read (the executable's symbol takes precedence over libssl's
// for libcaf_openssl, see openssl_error_queue.cpp) hands every decrypted byte
// of a connection to this file's BASP reader first. The reader binds the node
// id a connection's handshake claims to that connection's verified peer
// certificate, and closes the connection (before CAF sees the bytes) when it
// claims our own node id, or one another certificate already holds, claims a
// second one, sends anything but its handshake first, routes a message through
// us (star topology: peers only talk to the coordinator), or names another
// node as the source of a monitor or down message. What remains is that every
// message the coordinator's actors get from a remote sender came over the
// connection whose certificate owns the sender's node id: identify_peer() maps
// the node id back to that certificate's role and name, per message.
#include <dlfcn.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <caf/binary_serializer.hpp>
#include <caf/node_id.hpp>

#include <spdlog/spdlog.h>

#include "actors/host/cluster/cluster_support.hpp"

namespace solstice::cluster_cli {
namespace {

constexpr const char* role_uri_prefix = "solstice:role/";

// BASP (CAF 0.17.6, caf/io/basp/header.hpp): a 32-byte header, integers in
// network byte order: operation (1), padding (2), flags (1), payload length
// (4), operation data (8), source actor (8), destination actor (8).
constexpr size_t basp_header_size = 32;
enum basp_operation : uint8_t {
  server_handshake = 0x00,
  client_handshake = 0x01,
  direct_message = 0x02,
  routed_message = 0x03,
  monitor_message = 0x04,
  down_message = 0x05,
  heartbeat = 0x06,
};
// Handshake, monitor and down payloads are a node id or two (and an error): small.
constexpr uint32_t max_small_payload = 4096;

using bytes = std::vector<char>;

// One accepted TLS connection, as the BASP reader follows it.
struct connection {
  std::optional<peer_identity> identity;  // of its verified certificate
  std::string why_no_identity;
  bool checked_certificate = false;
  bool closed = false;                    // refused: every later read fails
  bytes node_id;                          // claimed in its handshake
  // Reader state: the header being read, then its payload.
  bytes header;
  uint8_t operation = 0;
  uint64_t payload_left = 0;
  bytes payload;                          // kept for small payloads only
};

struct registry {
  std::mutex mutex;
  bool enabled = false;
  // A client (node, submitter, status, follow): the peer it connects to must
  // hold a coordinator's certificate; why the last one did not.
  bool expect_coordinator = false;
  std::string coordinator_refusal;
  bytes own_node_id;
  std::map<const SSL*, connection> connections;
};

// Never destroyed: SSL_free may run while the process exits.
registry& peers() {
  static auto* instance = new registry;
  return *instance;
}

bytes serialized(caf::actor_system& sys, const caf::node_id& node) {
  bytes out;
  caf::binary_serializer sink{sys, out};
  if (auto err = sink(const_cast<caf::node_id&>(node)))
    return {};
  return out;
}

std::string text_of(ASN1_STRING* value) {
  unsigned char* utf8 = nullptr;
  int size = ASN1_STRING_to_UTF8(&utf8, value);
  if (size < 0)
    return {};
  std::string text{reinterpret_cast<char*>(utf8), static_cast<size_t>(size)};
  OPENSSL_free(utf8);
  return text;
}

std::string peer_text(const connection& c) {
  return c.identity ? role_text(c.identity->role) + " " + c.identity->name
                    : "a peer without a role (" + c.why_no_identity + ")";
}

uint64_t read_be(const char* data, size_t size) {
  uint64_t value = 0;
  for (size_t i = 0; i < size; ++i)
    value = value << 8 | static_cast<uint8_t>(data[i]);
  return value;
}

// A whole small payload of `c`'s current message: "" if fine, else why the
// connection is refused. Called with the registry locked.
std::string check_small_payload(registry& r, const SSL* ssl, connection& c) {
  if (c.operation == client_handshake) {
    const auto& claimed = c.payload;
    if (claimed == r.own_node_id)
      return "its handshake claims the coordinator's own node id";
    if (!c.node_id.empty() && c.node_id != claimed)
      return "it claims a second node id";
    for (const auto& [other_ssl, other] : r.connections) {
      if (other_ssl == ssl || other.closed || other.node_id != claimed)
        continue;
      bool same = other.identity && c.identity && other.identity->role == c.identity->role &&
                  other.identity->name == c.identity->name;
      if (!same)
        return "it claims the node id of " + peer_text(other);
    }
    c.node_id = claimed;
    return "";
  }
  // monitor / down: the payload starts with the source node id.
  if (c.payload.size() < c.node_id.size() ||
      !std::equal(c.node_id.begin(), c.node_id.end(), c.payload.begin()))
    return "its monitor or down message names another node as its source";
  return "";
}

// The next header of `c` is complete: "" if it may pass, else why not.
std::string check_header(connection& c) {
  c.operation = static_cast<uint8_t>(c.header[0]);
  c.payload_left = read_be(c.header.data() + 4, 4);
  c.payload.clear();
  switch (c.operation) {
    case client_handshake:
    case monitor_message:
    case down_message:
      if (c.payload_left > max_small_payload)
        return "an oversized handshake, monitor or down message";
      if (c.operation != client_handshake && c.node_id.empty())
        return "a message before its handshake";
      return "";
    case direct_message:
      return c.node_id.empty() ? "a message before its handshake" : "";
    case heartbeat:
      return "";
    case routed_message:
      return "it routes a message through the coordinator";
    case server_handshake:
      return "it sent a server handshake";
    default:
      return "";  // CAF drops a malformed message itself
  }
}

// Follows `size` decrypted bytes of `c`: "" while all is well, else why the
// connection is refused. Called with the registry locked.
std::string follow(registry& r, const SSL* ssl, connection& c, const char* data, size_t size) {
  while (size > 0) {
    if (c.payload_left == 0 && c.header.size() < basp_header_size) {
      auto take = std::min(size, basp_header_size - c.header.size());
      c.header.insert(c.header.end(), data, data + take);
      data += take;
      size -= take;
      if (c.header.size() < basp_header_size)
        return "";
      if (auto why = check_header(c); !why.empty())
        return why;
      if (c.payload_left > 0)
        continue;
    } else {
      auto take = static_cast<size_t>(std::min<uint64_t>(size, c.payload_left));
      bool small = c.operation == client_handshake || c.operation == monitor_message ||
                   c.operation == down_message;
      if (small)
        c.payload.insert(c.payload.end(), data, data + take);
      data += take;
      size -= take;
      c.payload_left -= take;
      if (c.payload_left > 0)
        return "";
      if (small)
        if (auto why = check_small_payload(r, ssl, c); !why.empty())
          return why;
    }
    // A message is complete (header only, or header and payload).
    if (c.operation == client_handshake && c.payload.empty())
      return "an empty handshake";
    c.header.clear();
  }
  return "";
}

void check_certificate(SSL* ssl, connection& c) {
  c.checked_certificate = true;
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (!cert || SSL_get_verify_result(ssl) != X509_V_OK) {
    c.why_no_identity = "no verified certificate";
    return;
  }
  auto identity = certificate_identity(cert);
  if (!identity)
    c.why_no_identity = identity.error().message;
  else
    c.identity = *identity;
}

}  // namespace

Result<peer_identity> certificate_identity(X509* cert) {
  std::string name;
  X509_NAME* subject = X509_get_subject_name(cert);
  int index = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
  if (index >= 0)
    name = text_of(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index)));
  if (name.empty())
    return fail("the certificate has no subject CN (its name)");
  std::vector<std::string> roles;
  auto* alt_names = static_cast<GENERAL_NAMES*>(
    X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  for (int i = 0; alt_names && i < sk_GENERAL_NAME_num(alt_names); ++i) {
    const GENERAL_NAME* entry = sk_GENERAL_NAME_value(alt_names, i);
    if (entry->type != GEN_URI)
      continue;
    auto uri = text_of(entry->d.uniformResourceIdentifier);
    if (uri.rfind(role_uri_prefix, 0) == 0)
      roles.push_back(uri.substr(std::strlen(role_uri_prefix)));
  }
  GENERAL_NAMES_free(alt_names);
  if (roles.size() != 1)
    return fail("certificate '" + name + "' carries " + std::to_string(roles.size()) +
                " role URIs (" + role_uri_prefix +
                "node, submitter, operator or coordinator); it needs one");
  if (roles[0] == "node")
    return peer_identity{peer_role::node, name};
  if (roles[0] == "submitter")
    return peer_identity{peer_role::submitter, name};
  if (roles[0] == "operator")
    return peer_identity{peer_role::operator_role, name};
  if (roles[0] == "coordinator")
    return peer_identity{peer_role::coordinator, name};
  return fail("certificate '" + name + "' has the unknown role '" + roles[0] + "'");
}

Result<peer_identity> certificate_file_identity(const std::string& pem_path) {
  FILE* file = std::fopen(pem_path.c_str(), "re");
  if (!file)
    return fail("cannot open " + pem_path);
  X509* cert = PEM_read_X509(file, nullptr, nullptr, nullptr);
  std::fclose(file);
  if (!cert)
    return fail(pem_path + " is not a PEM certificate");
  auto identity = certificate_identity(cert);
  X509_free(cert);
  return identity;
}

peer_identifier watch_peer_identities(caf::actor_system& sys) {
  auto& r = peers();
  {
    std::lock_guard<std::mutex> lock{r.mutex};
    r.enabled = true;
    r.own_node_id = serialized(sys, sys.node());
  }
  return [&sys](const caf::node_id& node) -> std::optional<peer_identity> {
    auto wanted = serialized(sys, node);
    auto& r = peers();
    std::lock_guard<std::mutex> lock{r.mutex};
    for (const auto& [ssl, c] : r.connections)
      if (!c.closed && !wanted.empty() && c.node_id == wanted && c.identity)
        return c.identity;
    return std::nullopt;
  };
}

void expect_coordinator_certificate() {
  auto& r = peers();
  std::lock_guard<std::mutex> lock{r.mutex};
  r.expect_coordinator = true;
  r.coordinator_refusal.clear();
}

std::string coordinator_certificate_refusal() {
  auto& r = peers();
  std::lock_guard<std::mutex> lock{r.mutex};
  return r.coordinator_refusal;
}

namespace {

// A client's connection: its peer's certificate must say coordinator. Called
// with the registry locked; false: refuse the connection.
bool follow_client_read(registry& r, SSL* ssl) {
  if (!r.expect_coordinator)
    return true;
  auto& c = r.connections[ssl];
  if (!c.checked_certificate)
    check_certificate(ssl, c);
  if (c.closed)
    return false;
  if (c.identity && c.identity->role == peer_role::coordinator)
    return true;
  c.closed = true;
  r.coordinator_refusal =
    c.identity ? "its certificate '" + c.identity->name + "' has the " +
                   role_text(c.identity->role) + " role, not coordinator (" + role_uri_prefix +
                   "coordinator)"
               : "its certificate carries no coordinator role (" + c.why_no_identity + ")";
  spdlog::warn("closed the connection to {}: not a coordinator", peer_text(c));
  return false;
}

}  // namespace

// Called by the process's SSL_read (openssl_error_queue.cpp) after every read
// that returned bytes; false: refuse the connection.
bool follow_tls_read(SSL* ssl, const void* data, int size) {
  auto& r = peers();
  if (size <= 0)
    return true;
  if (!SSL_is_server(ssl)) {
    std::lock_guard<std::mutex> lock{r.mutex};
    return follow_client_read(r, ssl);
  }
  std::lock_guard<std::mutex> lock{r.mutex};
  if (!r.enabled)
    return true;
  auto& c = r.connections[ssl];
  if (c.closed)
    return false;
  if (!c.checked_certificate)
    check_certificate(ssl, c);
  auto why = follow(r, ssl, c, static_cast<const char*>(data), static_cast<size_t>(size));
  if (why.empty())
    return true;
  c.closed = true;
  spdlog::warn("closed the connection of {}: {}", peer_text(c), why);
  return false;
}

}  // namespace solstice::cluster_cli

// The connection's SSL object ends: forget it (its address may be reused).
extern "C" void SSL_free(SSL* ssl) {
  static auto next = reinterpret_cast<void (*)(SSL*)>(::dlsym(RTLD_NEXT, "SSL_free"));
  {
    auto& r = solstice::cluster_cli::peers();
    std::lock_guard<std::mutex> lock{r.mutex};
    r.connections.erase(ssl);
  }
  next(ssl);
}
