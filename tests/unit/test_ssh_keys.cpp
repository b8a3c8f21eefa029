// Ephemeral keys checked with OpenSSH's own ssh-keygen and with dropbearconvert
// (the test guest converts the host key with it).
#include <doctest/doctest.h>

#include "runtime/ssh/ssh_keys.hpp"
#include "tests/unit/seed_test_support.hpp"

namespace solstice {

using seed_test::file_mode;
using seed_test::run_command;
using seed_test::shell_quote;
using seed_test::TempDir;

namespace {

SshKeyPair generate(const std::string& comment) {
  auto key = generate_ed25519(comment);
  REQUIRE_MESSAGE(key, (key ? "" : key.error().message));
  return *key;
}

std::string without_comment(const std::string& public_line) {
  auto second_space = public_line.find(' ', public_line.find(' ') + 1);
  return public_line.substr(0, second_space);
}

}  // namespace

TEST_CASE("ssh keys: ssh-keygen derives the same public key from the private key") {
  TempDir dir;
  auto key = generate("job-key");
  auto path = dir / "id_ed25519";
  REQUIRE(write_private_key(key, path));

  auto derived = run_command("ssh-keygen -y -f " + shell_quote(path.string()), /*merge_stderr=*/false);
  REQUIRE(derived.exit_code == 0);
  // ssh-keygen -y prints "type base64 comment"; the comment comes from the private key.
  CHECK(derived.output == key.public_line + "\n");
  CHECK(key.public_line.rfind("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", 0) == 0);
  CHECK(key.public_line.substr(key.public_line.rfind(' ') + 1) == "job-key");

  auto listed = run_command("ssh-keygen -l -f " + shell_quote(path.string()), false);
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.output.find(" " + fingerprint_sha256(key.public_blob) + " job-key (ED25519)") != std::string::npos);
}

TEST_CASE("ssh keys: fingerprint matches ssh-keygen -l of the public line") {
  TempDir dir;
  auto key = generate("");
  CHECK(key.public_line == without_comment(key.public_line));  // no trailing comment
  seed_test::write_file(dir / "key.pub", key.public_line + "\n");
  auto listed = run_command("ssh-keygen -l -E sha256 -f " + shell_quote((dir / "key.pub").string()), false);
  REQUIRE(listed.exit_code == 0);
  auto fingerprint = fingerprint_sha256(key.public_blob);
  CHECK(listed.output.rfind("256 " + fingerprint + " ", 0) == 0);
  CHECK(fingerprint.size() == std::string("SHA256:").size() + 43);  // 32 bytes, unpadded base64
  CHECK(fingerprint.find('=') == std::string::npos);
}

TEST_CASE("ssh keys: public blob is the wire form of the public line") {
  auto key = generate("c");
  // string "ssh-ed25519" then string of 32 key bytes.
  REQUIRE(key.public_blob.size() == 4 + 11 + 4 + 32);
  CHECK(key.public_blob.substr(0, 4) == std::string("\0\0\0\x0b", 4));
  CHECK(key.public_blob.substr(4, 11) == "ssh-ed25519");
  CHECK(key.public_blob.substr(15, 4) == std::string("\0\0\0\x20", 4));
  TempDir dir;
  seed_test::write_file(dir / "blob", key.public_blob);
  auto encoded = run_command("base64 -w0 " + shell_quote((dir / "blob").string()), false);
  CHECK(key.public_line == "ssh-ed25519 " + encoded.output + " c");
}

TEST_CASE("ssh keys: private key file format is what OpenSSH writes") {
  auto key = generate("job-key");
  const std::string begin = "-----BEGIN OPENSSH PRIVATE KEY-----\n";
  const std::string end = "-----END OPENSSH PRIVATE KEY-----\n";
  REQUIRE(key.private_openssh.rfind(begin, 0) == 0);
  REQUIRE(key.private_openssh.size() > begin.size() + end.size());
  CHECK(key.private_openssh.substr(key.private_openssh.size() - end.size()) == end);
  std::istringstream body(key.private_openssh.substr(begin.size()));
  std::vector<std::string> lines;
  for (std::string line; std::getline(body, line);) lines.push_back(line);
  lines.pop_back();  // END line
  for (std::size_t i = 0; i + 1 < lines.size(); ++i) CHECK(lines[i].size() == 70);
  CHECK(lines.back().size() <= 70);
}

TEST_CASE("ssh keys: dropbearconvert accepts the private key") {
  TempDir dir;
  auto key = generate("host-key");
  auto openssh_path = dir / "host_ed25519";
  auto dropbear_path = dir / "host_ed25519.dropbear";
  REQUIRE(write_private_key(key, openssh_path));
  auto converted = run_command("dropbearconvert openssh dropbear " + shell_quote(openssh_path.string()) + " " +
                               shell_quote(dropbear_path.string()));
  CHECK_MESSAGE(converted.exit_code == 0, converted.output);
  CHECK(std::filesystem::file_size(dropbear_path) > 0);
  // And back: the converted key still yields the same public key.
  auto back_path = dir / "back";
  auto back = run_command("dropbearconvert dropbear openssh " + shell_quote(dropbear_path.string()) + " " +
                          shell_quote(back_path.string()));
  REQUIRE(back.exit_code == 0);
  auto derived = run_command("ssh-keygen -y -f " + shell_quote(back_path.string()), false);
  CHECK(without_comment(derived.output.substr(0, derived.output.find('\n'))) == without_comment(key.public_line));
}

TEST_CASE("ssh keys: private key file is 0600 and never overwritten") {
  TempDir dir;
  auto key = generate("k");
  auto path = dir / "key";
  REQUIRE(write_private_key(key, path));
  CHECK(file_mode(path) == 0600);
  CHECK(seed_test::read_file(path) == key.private_openssh);

  auto other = generate("other");
  auto again = write_private_key(other, path);
  REQUIRE_FALSE(again);
  CHECK(again.error().message.find(path.string()) != std::string::npos);
  CHECK(seed_test::read_file(path) == key.private_openssh);

  // A symlink in the way is refused too, and its target left alone.
  auto target = dir / "target";
  seed_test::write_file(target, "untouched");
  std::filesystem::create_symlink(target, dir / "link");
  CHECK_FALSE(write_private_key(key, dir / "link"));
  CHECK(seed_test::read_file(target) == "untouched");

  auto missing_dir = write_private_key(key, dir / "no-such-dir" / "key");
  CHECK_FALSE(missing_dir);
}

TEST_CASE("ssh keys: every key is fresh") {
  auto first = generate("a");
  auto second = generate("a");
  CHECK(first.public_blob != second.public_blob);
  CHECK(first.private_openssh != second.private_openssh);
  CHECK(fingerprint_sha256(first.public_blob) != fingerprint_sha256(second.public_blob));
}

TEST_CASE("ssh keys: a comment with a newline is refused") {
  auto key = generate_ed25519("two\nlines");
  REQUIRE_FALSE(key);
  CHECK(key.error().message.find("two\nlines") != std::string::npos);
}

}  // namespace solstice
