// Checks of the TLS files a cluster peer is given, before CAF sees them.
#include <cerrno>
#include <cstdio>
#include <memory>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include "actors/host/cluster/cluster_support.hpp"

namespace solstice::cluster_cli {
namespace {

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

}  // namespace

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

}  // namespace solstice::cluster_cli
