// cloud-init NoCloud seed. The YAML is written by hand in one fixed shape (the test
// guest reads it line by line), so every value is validated to be a plain scalar
// that YAML reads back as the same string; nothing is ever escaped into place.
#include "runtime/vm/cloud_init.hpp"

#include <algorithm>
#include <array>
#include <sstream>
#include <string_view>

#include "runtime/vm/iso9660.hpp"

namespace solstice {
namespace {

constexpr std::string_view kCloudConfigHeader = "#cloud-config";
constexpr std::string_view kPrivateKeyBegin = "-----BEGIN OPENSSH PRIVATE KEY-----";
constexpr std::string_view kPrivateKeyEnd = "-----END OPENSSH PRIVATE KEY-----";
// The user's cloud-config adds to ours (lists appended, new keys added) and can
// never replace what we set (the runner user, ssh_pwauth, the host key).
constexpr std::string_view kUserPartMergeType = "dict(no_replace,recurse_list)+list(append)+str()";

bool is_lower(char c) { return c >= 'a' && c <= 'z'; }
bool is_letter(char c) { return is_lower(c) || (c >= 'A' && c <= 'Z'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alnum(char c) { return is_letter(c) || is_digit(c); }
bool is_base64(char c) { return is_alnum(c) || c == '+' || c == '/' || c == '='; }

std::string shown(std::string_view value) {
  std::string out = "\"";
  for (unsigned char c : value) {
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out + "\"";
}

// Words YAML 1.1 (cloud-init's PyYAML) reads as booleans or null instead of strings.
bool is_yaml_keyword(std::string_view value) {
  static constexpr std::array<std::string_view, 11> kWords = {
      "y", "n", "yes", "no", "true", "false", "on", "off", "null", "~", ""};
  std::string lower(value);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](char c) { return static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c); });
  return std::find(kWords.begin(), kWords.end(), lower) != kWords.end();
}

// A value made only of letters, digits, '.', '_' and '-' is a YAML string as long as
// it starts with a letter (so it is no number, date or timestamp) and is no keyword;
// otherwise it is written double-quoted (its characters need no escaping).
std::string yaml_scalar(const std::string& value) {
  if (!value.empty() && is_letter(value.front()) && !is_yaml_keyword(value)) return value;
  return "\"" + value + "\"";
}

Result<void> check_instance_id(const std::string& id) {
  if (id.empty()) return fail("seed instance_id is empty");
  if (id.size() > 128) return fail("seed instance_id " + shown(id) + " is longer than 128 characters");
  for (char c : id) {
    if (!is_alnum(c) && c != '.' && c != '_' && c != '-')
      return fail("seed instance_id " + shown(id) + " may hold only letters, digits, '.', '_' and '-'");
  }
  return {};
}

// RFC 1123 host name (one or more dot-separated labels).
Result<void> check_hostname(const std::string& hostname) {
  std::string what = "seed hostname " + shown(hostname);
  if (hostname.empty()) return fail("seed hostname is empty");
  if (hostname.size() > 253) return fail(what + " is longer than 253 characters");
  std::size_t label_start = 0;
  while (label_start <= hostname.size()) {
    std::size_t dot = hostname.find('.', label_start);
    std::string_view label = std::string_view(hostname).substr(
        label_start, dot == std::string::npos ? std::string::npos : dot - label_start);
    if (label.empty() || label.size() > 63)
      return fail(what + " needs dot-separated labels of 1 to 63 characters");
    if (label.front() == '-' || label.back() == '-')
      return fail(what + " has a label that starts or ends with '-'");
    for (char c : label) {
      if (!is_alnum(c) && c != '-')
        return fail(what + " may hold only letters, digits, '-' and '.'");
    }
    if (dot == std::string::npos) break;
    label_start = dot + 1;
  }
  return {};
}

// A conservative POSIX login name that YAML reads as a plain string.
Result<void> check_user(const std::string& user) {
  std::string what = "seed user " + shown(user);
  if (user.empty()) return fail("seed user is empty");
  if (user.size() > 32) return fail(what + " is longer than 32 characters");
  if (!is_lower(user.front()) && user.front() != '_')
    return fail(what + " must start with a lower-case letter or '_'");
  for (char c : user) {
    if (!is_lower(c) && !is_digit(c) && c != '_' && c != '-')
      return fail(what + " may hold only lower-case letters, digits, '_' and '-'");
  }
  if (is_yaml_keyword(user)) return fail(what + " would be read by YAML as a boolean or null");
  return {};
}

// "type base64 [comment]" with a comment of plain words, so that the whole line is a
// plain YAML scalar (no ": ", no " #", no leading indicator).
Result<void> check_public_key_line(const std::string& line, const std::string& field) {
  std::string what = "seed " + field + " " + shown(line);
  if (line.empty()) return fail("seed " + field + " is empty");
  std::istringstream words(line);
  std::string type, key, comment_word;
  words >> type >> key;
  if (type.empty() || !is_letter(type.front()) ||
      !std::all_of(type.begin(), type.end(),
                   [](char c) { return is_alnum(c) || c == '-' || c == '@' || c == '.'; }))
    return fail(what + " does not start with a key type such as ssh-ed25519");
  if (key.empty() || !std::all_of(key.begin(), key.end(), is_base64))
    return fail(what + " has no base64 key after its type");
  while (words >> comment_word) {
    if (!std::all_of(comment_word.begin(), comment_word.end(), [](char c) {
          return is_alnum(c) || std::string_view("@._+=-").find(c) != std::string_view::npos;
        }))
      return fail(what + " has a comment with characters other than letters, digits and @._+=-");
  }
  // Exactly single spaces between words, nothing else (tabs, newlines, trailing blanks).
  for (std::size_t i = 0; i < line.size(); ++i) {
    if (line[i] == ' ' && (i == 0 || i + 1 == line.size() || line[i + 1] == ' '))
      return fail(what + " has leading, trailing or doubled spaces");
    if (line[i] != ' ' && static_cast<unsigned char>(line[i]) <= 0x20)
      return fail(what + " contains a control character or newline");
  }
  return {};
}

// The private key block goes verbatim into a YAML literal block, line by line.
Result<std::vector<std::string>> private_key_lines(const std::string& key) {
  std::vector<std::string> lines;
  std::istringstream in(key);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  if (lines.size() < 3 || lines.front() != kPrivateKeyBegin || lines.back() != kPrivateKeyEnd)
    return fail("seed host_key_private is not an OpenSSH private key (expected lines " +
                std::string(kPrivateKeyBegin) + " ... " + std::string(kPrivateKeyEnd) + ")");
  for (std::size_t i = 1; i + 1 < lines.size(); ++i) {
    if (lines[i].empty() || !std::all_of(lines[i].begin(), lines[i].end(), is_base64))
      return fail("seed host_key_private line " + std::to_string(i + 1) + " is not base64");
  }
  return lines;
}

Result<void> check_spec(const SeedSpec& spec) {
  if (auto ok = check_instance_id(spec.instance_id); !ok) return ok;
  if (auto ok = check_hostname(spec.hostname); !ok) return ok;
  if (auto ok = check_user(spec.user); !ok) return ok;
  if (auto ok = check_public_key_line(spec.authorized_key, "authorized_key"); !ok) return ok;
  if (spec.host_key_private.empty() != spec.host_key_public.empty())
    return fail("seed host key: host_key_private and host_key_public must be given together");
  if (!spec.host_key_public.empty()) {
    if (auto ok = check_public_key_line(spec.host_key_public, "host_key_public"); !ok) return ok;
    if (spec.host_key_public.rfind("ssh-ed25519 ", 0) != 0)
      return fail("seed host_key_public " + shown(spec.host_key_public.substr(0, 40)) +
                  " is not an ssh-ed25519 key (the seed carries an ed25519 host key)");
    if (auto lines = private_key_lines(spec.host_key_private); !lines) return fail(lines.error().message);
  }
  return {};
}

std::string our_cloud_config(const SeedSpec& spec) {
  std::string out;
  out += std::string(kCloudConfigHeader) + "\n";
  out += "users:\n";
  out += "  - name: " + spec.user + "\n";
  out += "    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n";
  out += "    shell: /bin/sh\n";
  out += "    lock_passwd: true\n";
  out += "    ssh_authorized_keys:\n";
  out += "      - " + spec.authorized_key + "\n";
  out += "ssh_pwauth: false\n";
  if (!spec.host_key_private.empty()) {
    out += "ssh_keys:\n";
    out += "  ed25519_private: |\n";
    const auto lines = private_key_lines(spec.host_key_private);  // checked by check_spec
    for (const auto& line : *lines) out += "    " + line + "\n";
    out += "  ed25519_public: " + spec.host_key_public + "\n";
  }
  return out;
}

// multipart/mixed with our cloud-config first, the user's part second.
std::string multipart(const std::string& ours, const std::string& theirs, const std::string& their_type) {
  std::string boundary = "==solstice-seed-boundary==";
  for (int attempt = 1; ours.find(boundary) != std::string::npos || theirs.find(boundary) != std::string::npos;
       ++attempt) {
    boundary = "==solstice-seed-boundary-" + std::to_string(attempt) + "==";
  }
  std::string out;
  out += "Content-Type: multipart/mixed; boundary=\"" + boundary + "\"\n";
  out += "MIME-Version: 1.0\n\n";
  out += "--" + boundary + "\n";
  out += "Content-Type: text/cloud-config; charset=\"us-ascii\"\n";
  out += "MIME-Version: 1.0\n";
  out += "Content-Transfer-Encoding: 7bit\n";
  out += "Content-Disposition: attachment; filename=\"solstice-runner.cfg\"\n\n";
  out += ours;
  out += "\n--" + boundary + "\n";
  out += "Content-Type: " + their_type + "; charset=\"utf-8\"\n";
  out += "MIME-Version: 1.0\n";
  out += "Content-Transfer-Encoding: 8bit\n";
  if (their_type == "text/cloud-config") out += "Merge-Type: " + std::string(kUserPartMergeType) + "\n";
  out += "Content-Disposition: attachment; filename=\"" +
         std::string(their_type == "text/cloud-config" ? "user.cfg" : "user-script") + "\"\n\n";
  // The line break before a boundary belongs to the boundary: one more keeps the
  // part's own last line break.
  out += theirs + "\n";
  out += "--" + boundary + "--\n";
  return out;
}

}  // namespace

Result<std::string> make_meta_data(const SeedSpec& spec) {
  if (auto ok = check_spec(spec); !ok) return fail(ok.error().message);
  return "instance-id: " + yaml_scalar(spec.instance_id) + "\n" +
         "local-hostname: " + yaml_scalar(spec.hostname) + "\n";
}

Result<std::string> make_user_data(const SeedSpec& spec) {
  if (auto ok = check_spec(spec); !ok) return fail(ok.error().message);
  std::string ours = our_cloud_config(spec);
  if (spec.extra_user_data.empty()) return ours;
  auto their_type = user_data_type(spec.extra_user_data);
  if (!their_type) return fail(their_type.error().message);
  return multipart(ours, spec.extra_user_data, *their_type);
}

Result<void> write_seed_iso(const SeedSpec& spec, const std::filesystem::path& iso_path) {
  auto meta_data = make_meta_data(spec);
  if (!meta_data) return fail(meta_data.error().message);
  auto user_data = make_user_data(spec);
  if (!user_data) return fail(user_data.error().message);
  return write_iso9660(iso_path, "cidata", {{"meta-data", *meta_data}, {"user-data", *user_data}});
}

Result<std::string> user_data_type(const std::string& user_data) {
  if (user_data.rfind(kCloudConfigHeader, 0) == 0) return std::string("text/cloud-config");
  if (user_data.rfind("#!", 0) == 0) return std::string("text/x-shellscript");
  return fail("user_data starting with " + shown(user_data.substr(0, 20)) +
              " is neither a cloud-config (first line \"#cloud-config\") nor a script (\"#!\")");
}

}  // namespace solstice
