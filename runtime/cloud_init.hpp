#pragma once
// cloud-init NoCloud seed: meta-data and user-data, written into a `cidata` ISO.
#include <filesystem>
#include <string>

#include "runtime/error.hpp"

namespace solstice {

struct SeedSpec {
  std::string instance_id;
  std::string hostname;
  std::string user;                  // user created with passwordless sudo
  std::string authorized_key;        // OpenSSH public key line for `user`
  std::string host_key_private;      // OpenSSH private key (ed25519) for the guest
  std::string host_key_public;       // its OpenSSH public key line
  std::string extra_user_data;       // optional user-supplied #cloud-config
};

std::string make_meta_data(const SeedSpec& spec);
// A #cloud-config document (or, with extra_user_data, a MIME multipart whose first
// part is ours and second part is the user's).
std::string make_user_data(const SeedSpec& spec);
// Writes the seed ISO (volume label "cidata", files meta-data and user-data).
Result<void> write_seed_iso(const SeedSpec& spec, const std::filesystem::path& iso_path);

}  // namespace solstice
