#pragma once
// Ephemeral ed25519 key pairs, generated with OpenSSL, in OpenSSH formats.
#include <filesystem>
#include <string>
#include <string_view>

#include "runtime/base/error.hpp"

namespace solstice {

struct SshKeyPair {
  std::string private_openssh;  // "-----BEGIN OPENSSH PRIVATE KEY-----..." (unencrypted)
  std::string public_line;      // "ssh-ed25519 AAAA... comment"
  std::string public_blob;      // SSH wire-format public key (what a server presents)
};

Result<SshKeyPair> generate_ed25519(const std::string& comment);

// Writes the private key with mode 0600 (created exclusively; never world-readable
// even for an instant).
Result<void> write_private_key(const SshKeyPair& key, const std::filesystem::path& path);

// "SHA256:..." as ssh-keygen -l prints it.
std::string fingerprint_sha256(const std::string& public_blob);

// Standard base64 (with padding, no line breaks), by OpenSSL.
std::string base64_encode(std::string_view bytes);

}  // namespace solstice
