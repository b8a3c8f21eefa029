// Ephemeral ed25519 keys: OpenSSL makes the key, the OpenSSH encodings are written
// here (the formats are small and fixed: RFC 8709 for the public blob, OpenSSH's
// PROTOCOL.key for the private key file).
#include "runtime/ssh/ssh_keys.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <memory>

namespace solstice {
namespace {

constexpr std::string_view kKeyType = "ssh-ed25519";
constexpr std::size_t kEd25519KeyBytes = 32;
constexpr std::size_t kPemLineWidth = 70;  // what ssh-keygen writes
constexpr std::size_t kCipherBlockSize = 8;  // padding unit for cipher "none"

// A string that wipes its bytes when it goes away: it holds private key material.
struct SecretBuffer {
  std::string bytes;
  SecretBuffer() = default;
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;
  ~SecretBuffer() {
    if (!bytes.empty()) OPENSSL_cleanse(bytes.data(), bytes.size());
  }
};

std::string openssl_error(const std::string& what) {
  unsigned long code = ERR_get_error();
  if (code == 0) return what + " failed";
  std::array<char, 256> text{};
  ERR_error_string_n(code, text.data(), text.size());
  ERR_clear_error();
  return what + " failed: " + text.data();
}

void append_u32(std::string& out, std::uint32_t value) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((value >> shift) & 0xff));
}

// SSH wire "string": 32-bit big-endian length, then the bytes.
void append_ssh_string(std::string& out, std::string_view bytes) {
  append_u32(out, static_cast<std::uint32_t>(bytes.size()));
  out.append(bytes);
}


std::string public_blob_of(std::string_view raw_public) {
  std::string blob;
  append_ssh_string(blob, kKeyType);
  append_ssh_string(blob, raw_public);
  return blob;
}

// The unencrypted "openssh-key-v1" container, base64 in 70-column lines.
void encode_private_key(std::string_view raw_public, std::string_view raw_private_seed,
                        const std::string& comment, std::uint32_t check, std::string& pem_out) {
  SecretBuffer secret_section;
  std::string& section = secret_section.bytes;
  append_u32(section, check);
  append_u32(section, check);  // the two check ints match when decryption worked
  append_ssh_string(section, kKeyType);
  append_ssh_string(section, raw_public);
  {
    SecretBuffer private_field;  // OpenSSH stores seed || public key
    private_field.bytes.append(raw_private_seed);
    private_field.bytes.append(raw_public);
    append_ssh_string(section, private_field.bytes);
  }
  append_ssh_string(section, comment);
  for (char pad = 1; section.size() % kCipherBlockSize != 0; ++pad) section.push_back(pad);

  SecretBuffer container;
  std::string& out = container.bytes;
  out.append("openssh-key-v1", sizeof("openssh-key-v1"));  // with its NUL
  append_ssh_string(out, "none");  // cipher
  append_ssh_string(out, "none");  // kdf
  append_ssh_string(out, "");      // kdf options
  append_u32(out, 1);              // number of keys
  append_ssh_string(out, public_blob_of(raw_public));
  append_ssh_string(out, section);

  SecretBuffer encoded;
  encoded.bytes = base64_encode(out);
  pem_out.clear();
  pem_out.reserve(encoded.bytes.size() + encoded.bytes.size() / kPemLineWidth + 80);  // no regrowth copies left behind
  pem_out += "-----BEGIN OPENSSH PRIVATE KEY-----\n";
  for (std::size_t at = 0; at < encoded.bytes.size(); at += kPemLineWidth) {
    pem_out.append(encoded.bytes, at, kPemLineWidth);
    pem_out.push_back('\n');
  }
  pem_out += "-----END OPENSSH PRIVATE KEY-----\n";
}

bool comment_is_single_line(const std::string& comment) {
  for (char c : comment) {
    if (c == '\n' || c == '\r' || c == '\0') return false;
  }
  return true;
}

}  // namespace

Result<SshKeyPair> generate_ed25519(const std::string& comment) {
  if (!comment_is_single_line(comment))
    return fail("SSH key comment \"" + comment + "\" must be a single line without NUL bytes");
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"),
                                                          &EVP_PKEY_free);
  if (!key) return fail(openssl_error("generating an ed25519 key"));

  std::string raw_public(kEd25519KeyBytes, '\0');
  std::size_t public_length = raw_public.size();
  if (EVP_PKEY_get_raw_public_key(key.get(), reinterpret_cast<unsigned char*>(raw_public.data()),
                                  &public_length) != 1 ||
      public_length != kEd25519KeyBytes)
    return fail(openssl_error("reading the ed25519 public key"));

  SecretBuffer raw_private;
  raw_private.bytes.assign(kEd25519KeyBytes, '\0');
  std::size_t private_length = raw_private.bytes.size();
  if (EVP_PKEY_get_raw_private_key(key.get(), reinterpret_cast<unsigned char*>(raw_private.bytes.data()),
                                   &private_length) != 1 ||
      private_length != kEd25519KeyBytes)
    return fail(openssl_error("reading the ed25519 private key"));

  std::uint32_t check = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&check), sizeof check) != 1)
    return fail(openssl_error("drawing the private key check number"));

  SshKeyPair pair;
  pair.public_blob = public_blob_of(raw_public);
  pair.public_line = std::string(kKeyType) + " " + base64_encode(pair.public_blob);
  if (!comment.empty()) pair.public_line += " " + comment;
  encode_private_key(raw_public, raw_private.bytes, comment, check, pair.private_openssh);
  return pair;
}

Result<void> write_private_key(const SshKeyPair& key, const std::filesystem::path& path) {
  // O_EXCL: never follow or reuse what is already there; 0600 from the first instant.
  int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return fail(errno_message("creating private key file " + path.string(), errno));
  const std::string& text = key.private_openssh;
  std::size_t written = 0;
  while (written < text.size()) {
    ssize_t n = ::write(fd, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      ::unlink(path.c_str());
      return fail(errno_message("writing private key file " + path.string(), err));
    }
    written += static_cast<std::size_t>(n);
  }
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(path.c_str());
    return fail(errno_message("closing private key file " + path.string(), err));
  }
  return {};
}

std::string fingerprint_sha256(const std::string& public_blob) {
  std::array<unsigned char, SHA256_DIGEST_LENGTH> digest{};
  SHA256(reinterpret_cast<const unsigned char*>(public_blob.data()), public_blob.size(), digest.data());
  std::string encoded = base64_encode(std::string_view(reinterpret_cast<const char*>(digest.data()), digest.size()));
  while (!encoded.empty() && encoded.back() == '=') encoded.pop_back();
  return "SHA256:" + encoded;
}

std::string base64_encode(std::string_view bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  int length = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                               reinterpret_cast<const unsigned char*>(bytes.data()),
                               static_cast<int>(bytes.size()));
  out.resize(static_cast<std::size_t>(length));
  return out;
}

}  // namespace solstice
