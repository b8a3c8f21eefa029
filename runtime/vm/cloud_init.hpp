#pragma once
// cloud-init NoCloud seed: meta-data and user-data, written into a `cidata` ISO.
#include <filesystem>
#include <string>

#include "runtime/base/error.hpp"

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

// Every field is checked before it goes into YAML: instance id, hostname, user name
// and keys must be plain, safe values; anything else fails with a message naming
// the field and the value. The host key pair is optional (both or neither).
Result<std::string> make_meta_data(const SeedSpec& spec);
// A #cloud-config document (or, with extra_user_data, a MIME multipart whose first
// part is ours and second part is the user's: text/cloud-config if it starts with
// "#cloud-config", text/x-shellscript if it starts with "#!", an error otherwise).
// The user's cloud-config is merged so that it adds to ours but never replaces it.
Result<std::string> make_user_data(const SeedSpec& spec);
// The MIME type the seed gives a job's user_data: "text/cloud-config" when it starts
// with "#cloud-config", "text/x-shellscript" with "#!"; anything else is an error
// naming the field and how the value starts (job validation uses it too).
Result<std::string> user_data_type(const std::string& user_data);
// Writes the seed ISO (volume label "cidata", files meta-data and user-data),
// created exclusively with mode 0600.
Result<void> write_seed_iso(const SeedSpec& spec, const std::filesystem::path& iso_path);

}  // namespace solstice
