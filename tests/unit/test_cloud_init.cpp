// The NoCloud seed checked with cloud-init itself: its schema validator, its YAML
// loader and its own user-data processor and cloud-config merger.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/vm/cloud_init.hpp"
#include "tests/unit/seed_test_support.hpp"

namespace solstice {

using seed_test::read_file;
using seed_test::run_command;
using seed_test::shell_quote;
using seed_test::TempDir;
using seed_test::write_file;

namespace {

SeedSpec sample_spec() {
  auto job_key = generate_ed25519("job-key");
  auto host_key = generate_ed25519("host-key");
  REQUIRE(job_key);
  REQUIRE(host_key);
  SeedSpec spec;
  spec.instance_id = "job-42";
  spec.hostname = "runner-vm";
  spec.user = "runner";
  spec.authorized_key = job_key->public_line;
  spec.host_key_private = host_key->private_openssh;
  spec.host_key_public = host_key->public_line;
  return spec;
}

// The Python that runs cloud-init (its yaml and cloudinit modules live there).
std::string cloud_init_python() {
  auto shebang = run_command("head -n 1 \"$(command -v cloud-init)\"", false);
  REQUIRE(shebang.output.rfind("#!", 0) == 0);
  auto interpreter = shebang.output.substr(2);
  interpreter = interpreter.substr(0, interpreter.find_first_of(" \n"));
  return interpreter;
}

// Runs a Python snippet with cloud-init's interpreter; argv[1] is `input_path`.
seed_test::CommandResult run_python(const TempDir& dir, const std::string& script,
                                    const std::filesystem::path& input_path) {
  write_file(dir / "check.py", script);
  return run_command(shell_quote(cloud_init_python()) + " " + shell_quote((dir / "check.py").string()) + " " +
                     shell_quote(input_path.string()));
}

std::string value_of(const Result<std::string>& result) {
  REQUIRE_MESSAGE(result, (result ? "" : result.error().message));
  return *result;
}

std::string indented(const std::string& text, const std::string& indent) {
  std::string out;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) out += indent + line + "\n";
  return out;
}

// Prints the cloud-config cloud-init assembles from a user-data blob (multipart or
// not), after its merging, as JSON; plus the content types of the parts it saw.
constexpr const char* kProcessUserData = R"PY(
import json, os, sys, tempfile
from cloudinit import helpers, user_data
from cloudinit.handlers import CONTENT_START, CONTENT_END, cloud_config
work = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": work, "run_dir": work})
message = user_data.UserDataProcessor(paths).process(open(sys.argv[1], "rb").read())
handler = cloud_config.CloudConfigPartHandler(paths)
handler.cloud_fn = os.path.join(work, "cloud-config.txt")
handler.handle_part(None, CONTENT_START, None, None, None, None)
parts = []
for part in message.walk():
    if part.get_content_maintype() == "multipart":
        continue
    payload = part.get_payload(decode=True).decode()
    parts.append({"type": part.get_content_type(), "payload": payload})
    if part.get_content_type() == "text/cloud-config":
        handler.handle_part(None, part.get_content_type(), part.get_filename(), payload, None, dict(part))
handler.handle_part(None, CONTENT_END, None, None, None, None)
from cloudinit import util
print(json.dumps({"parts": parts, "config": util.load_yaml(open(handler.cloud_fn).read())}))
)PY";

}  // namespace

TEST_CASE("cloud-init seed: user-data has the fixed shape and passes cloud-init's schema") {
  TempDir dir;
  auto spec = sample_spec();
  auto user_data = value_of(make_user_data(spec));

  std::string expected = "#cloud-config\n"
                         "users:\n"
                         "  - name: runner\n"
                         "    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n"
                         "    shell: /bin/sh\n"
                         "    lock_passwd: true\n"
                         "    ssh_authorized_keys:\n"
                         "      - " + spec.authorized_key + "\n"
                         "ssh_pwauth: false\n"
                         "ssh_keys:\n"
                         "  ed25519_private: |\n" +
                         indented(spec.host_key_private, "    ") +
                         "  ed25519_public: " + spec.host_key_public + "\n";
  CHECK(user_data == expected);

  write_file(dir / "user-data", user_data);
  auto schema = run_command("cloud-init schema --config-file " + shell_quote((dir / "user-data").string()));
  CHECK_MESSAGE(schema.exit_code == 0, schema.output);
  CHECK(schema.output.find("Valid cloud-config") != std::string::npos);

  // cloud-init reads back exactly the values we put in.
  auto parsed = run_python(dir, R"PY(
import sys
from cloudinit import util
c = util.load_yaml(open(sys.argv[1]).read())
u = c["users"][0]
print(u["name"]); print(u["sudo"]); print(u["lock_passwd"]); print(c["ssh_pwauth"])
print(u["ssh_authorized_keys"][0]); print(c["ssh_keys"]["ed25519_public"])
sys.stdout.write(c["ssh_keys"]["ed25519_private"])
)PY",
                           dir / "user-data");
  REQUIRE_MESSAGE(parsed.exit_code == 0, parsed.output);
  CHECK(parsed.output == "runner\nALL=(ALL) NOPASSWD:ALL\nTrue\nFalse\n" + spec.authorized_key + "\n" +
                             spec.host_key_public + "\n" + spec.host_key_private);
}

TEST_CASE("cloud-init seed: without a host key there is no ssh_keys section") {
  TempDir dir;
  auto spec = sample_spec();
  spec.host_key_private.clear();
  spec.host_key_public.clear();
  auto user_data = value_of(make_user_data(spec));
  CHECK(user_data.find("ssh_keys:") == std::string::npos);
  write_file(dir / "user-data", user_data);
  auto schema = run_command("cloud-init schema --config-file " + shell_quote((dir / "user-data").string()));
  CHECK_MESSAGE(schema.exit_code == 0, schema.output);
}

TEST_CASE("cloud-init seed: meta-data is key: value and reads back as strings") {
  TempDir dir;
  auto spec = sample_spec();
  auto meta_data = value_of(make_meta_data(spec));
  CHECK(meta_data == "instance-id: job-42\nlocal-hostname: runner-vm\n");

  // Values YAML would read as numbers or booleans are quoted.
  spec.instance_id = "1234";
  spec.hostname = "on";
  meta_data = value_of(make_meta_data(spec));
  write_file(dir / "meta-data", meta_data);
  auto parsed = run_python(dir, R"PY(
import sys
from cloudinit import util
m = util.load_yaml(open(sys.argv[1]).read())
print(repr(m["instance-id"]), repr(m["local-hostname"]))
)PY",
                           dir / "meta-data");
  CHECK_MESSAGE(parsed.output == "'1234' 'on'\n", parsed.output);
}

namespace {
nlohmann::json processed_by_cloud_init(const TempDir& dir, const std::string& user_data) {
  write_file(dir / "user-data", user_data);
  auto processed = run_python(dir, kProcessUserData, dir / "user-data");
  REQUIRE_MESSAGE(processed.exit_code == 0, processed.output);
  auto parsed = nlohmann::json::parse(processed.output, nullptr, /*allow_exceptions=*/false);
  REQUIRE_MESSAGE(!parsed.is_discarded(), processed.output);
  return parsed;
}
}  // namespace

TEST_CASE("cloud-init seed: extra cloud-config becomes a second MIME part that adds but never replaces") {
  TempDir dir;
  auto spec = sample_spec();
  spec.extra_user_data = "#cloud-config\nusers:\n  - name: extra\nssh_pwauth: true\npackages: [curl]\n";
  auto user_data = value_of(make_user_data(spec));
  CHECK(user_data.rfind("Content-Type: multipart/mixed; boundary=", 0) == 0);
  auto result = processed_by_cloud_init(dir, user_data);
  INFO(result.dump());
  // Two parts, ours first, both cloud-config; the user's text unchanged.
  auto spec_without_extra = spec;
  spec_without_extra.extra_user_data.clear();
  REQUIRE(result["parts"].size() == 2);
  CHECK(result["parts"][0]["type"] == "text/cloud-config");
  CHECK(result["parts"][0]["payload"] == value_of(make_user_data(spec_without_extra)));
  CHECK(result["parts"][1]["type"] == "text/cloud-config");
  CHECK(result["parts"][1]["payload"] == spec.extra_user_data);
  // Merged by cloud-init: both users, our ssh_pwauth kept, the user's packages added.
  const auto& config = result["config"];
  REQUIRE(config["users"].size() == 2);
  CHECK(config["users"][0]["name"] == "runner");
  CHECK(config["users"][0]["ssh_authorized_keys"][0] == spec.authorized_key);
  CHECK(config["users"][1]["name"] == "extra");
  CHECK(config["ssh_pwauth"] == false);
  CHECK(config["packages"] == nlohmann::json::array({"curl"}));
  CHECK(config["ssh_keys"]["ed25519_public"] == spec.host_key_public);
  CHECK(config["ssh_keys"]["ed25519_private"] == spec.host_key_private);
}

TEST_CASE("cloud-init seed: an extra script becomes a text/x-shellscript part") {
  TempDir dir;
  auto spec = sample_spec();
  spec.extra_user_data = "#!/bin/sh\necho '--boundary-like-text' > /tmp/x\n";
  auto result = processed_by_cloud_init(dir, value_of(make_user_data(spec)));
  INFO(result.dump());
  REQUIRE(result["parts"].size() == 2);
  CHECK(result["parts"][1]["type"] == "text/x-shellscript");
  CHECK(result["parts"][1]["payload"] == spec.extra_user_data);
  CHECK(result["config"]["users"][0]["name"] == "runner");

  // A user part that contains our default boundary gets a different one.
  spec.extra_user_data = "#!/bin/sh\n--==solstice-seed-boundary==\n";
  auto again = processed_by_cloud_init(dir, value_of(make_user_data(spec)));
  REQUIRE(again["parts"].size() == 2);
  CHECK(again["parts"][1]["payload"] == spec.extra_user_data);

  // No final line break: the part is still exactly the user's text.
  spec.extra_user_data = "#!/bin/sh\ntrue";
  auto unterminated = processed_by_cloud_init(dir, value_of(make_user_data(spec)));
  REQUIRE(unterminated["parts"].size() == 2);
  CHECK(unterminated["parts"][1]["payload"] == spec.extra_user_data);

  spec.extra_user_data = "packages: [curl]\n";
  auto refused = make_user_data(spec);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message.find("\"packages: [curl]\\x0a\"") != std::string::npos);
  CHECK(refused.error().message.find("#cloud-config") != std::string::npos);
}

TEST_CASE("cloud-init seed: unsafe names and keys are refused, naming the value") {
  auto refused = [](auto change) {
    auto spec = sample_spec();
    change(spec);
    auto meta = make_meta_data(spec);
    auto user = make_user_data(spec);
    REQUIRE_FALSE(meta);
    REQUIRE_FALSE(user);
    CHECK(meta.error().message == user.error().message);
    return user.error().message;
  };
  CHECK(refused([](SeedSpec& s) { s.user = "Runner"; }).find("seed user \"Runner\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.user = "run ner"; }).find("\"run ner\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.user = "yes"; }).find("\"yes\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.user = "a:b"; }).find("\"a:b\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.user = ""; }).find("seed user is empty") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.hostname = "-vm"; }).find("seed hostname \"-vm\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.hostname = "a..b"; }).find("\"a..b\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.hostname = "under_score"; }).find("\"under_score\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.hostname = "x: y"; }).find("\"x: y\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.instance_id = "a/b"; }).find("seed instance_id \"a/b\"") !=
        std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.instance_id = "id\nx: 1"; }).find("\"id\\x0ax: 1\"") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.authorized_key += " #comment"; }).find("authorized_key") !=
        std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.authorized_key += "\nssh_pwauth: true"; }).find("authorized_key") !=
        std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.authorized_key = "- ssh-ed25519 AAAA"; }).find("\"- ssh-ed25519 AAAA\"") !=
        std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.host_key_public.clear(); }).find("together") != std::string::npos);
  CHECK(refused([](SeedSpec& s) { s.host_key_private = "not a key"; }).find("host_key_private") !=
        std::string::npos);
  CHECK(refused([](SeedSpec& s) {
          s.host_key_private.insert(s.host_key_private.find('\n') + 1, "x: y\n");
        }).find("host_key_private line 2") != std::string::npos);
}

TEST_CASE("cloud-init seed: the seed ISO carries meta-data and user-data under label cidata") {
  TempDir dir;
  auto spec = sample_spec();
  auto iso = dir / "seed.iso";
  auto written = write_seed_iso(spec, iso);
  REQUIRE_MESSAGE(written, (written ? "" : written.error().message));
  CHECK(seed_test::file_mode(iso) == 0600);

  auto label = run_command("blkid -p -o value -s LABEL " + shell_quote(iso.string()));
  CHECK(label.output == "cidata\n");
  for (const char* tree : {"-R", "-J"}) {
    INFO(tree);
    auto listing = run_command(std::string("isoinfo ") + tree + " -l -i " + shell_quote(iso.string()));
    CHECK(listing.output.find(" meta-data \n") != std::string::npos);
    CHECK(listing.output.find(" user-data \n") != std::string::npos);
    auto meta = run_command(std::string("isoinfo ") + tree + " -i " + shell_quote(iso.string()) + " -x /meta-data",
                            false);
    CHECK(meta.output == value_of(make_meta_data(spec)));
    auto user = run_command(std::string("isoinfo ") + tree + " -i " + shell_quote(iso.string()) + " -x /user-data",
                            false);
    CHECK(user.output == value_of(make_user_data(spec)));
  }

  auto bad = spec;
  bad.user = "Bad User";
  auto refused = write_seed_iso(bad, dir / "bad.iso");
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message.find("\"Bad User\"") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir / "bad.iso"));
}

}  // namespace solstice
