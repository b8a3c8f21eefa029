// The OpenSSL error-queue workaround of the cluster's TLS connections.
#include <dlfcn.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "actors/host/cluster/cluster_support.hpp"

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

namespace solstice::cluster_cli {
bool follow_tls_read(SSL* ssl, const void* data, int size);  // peer_identity.cpp
}

// Also hands the coordinator's peer identities (peer_identity.cpp) every
// decrypted byte first: a connection it refuses reads as failed, and CAF closes it.
extern "C" int SSL_read(SSL* ssl, void* buffer, int size) {
  static auto next = next_symbol<int (*)(SSL*, void*, int)>("SSL_read");
  ERR_clear_error();
  int read = next(ssl, buffer, size);
  if (read > 0 && !solstice::cluster_cli::follow_tls_read(ssl, buffer, read))
    return -1;
  return read;
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

namespace solstice::cluster_cli {

void keep_openssl_error_queue_wrappers() {}

}  // namespace solstice::cluster_cli
