// The image cache's rules without a network: labels, sha256 and firmware values,
// the label a URL gives, a config's url images, and what the cache adds to a config.
#include <doctest/doctest.h>

#include "runtime/job/runner_config.hpp"
#include "runtime/vm/image_cache.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
using solstice::test::TempDir;
namespace fs = std::filesystem;

TEST_CASE("image cache: labels, sha256 and firmware are checked and named") {
  CHECK(check_image_label("debian-12.generic_cloud", "label"));
  CHECK(check_image_label("../etc", "--label").error().message ==
        "--label \"../etc\": a label is 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'");
  CHECK_FALSE(check_image_label("", "label"));
  CHECK_FALSE(check_image_label("a/b", "label"));
  CHECK_FALSE(check_image_label(std::string(129, 'a'), "label"));
  CHECK(normalize_sha256(std::string(64, 'A'), "sha256").value() == std::string(64, 'a'));
  CHECK(normalize_sha256("abc", "--sha256").error().message ==
        "--sha256 \"abc\": must be 64 hex digits (sha256sum prints them)");
  CHECK_FALSE(normalize_sha256(std::string(64, 'g'), "sha256"));
  CHECK(check_firmware("", "firmware"));
  CHECK(check_firmware("uefi", "firmware"));
  CHECK(check_firmware("efi", "firmware").error().message == "firmware \"efi\": must be \"bios\" or \"uefi\" (empty: bios)");
  CHECK(default_label_for_url("https://example.org/x/debian-12-genericcloud-amd64.qcow2") == "debian-12-genericcloud-amd64");
  CHECK(default_label_for_url("http://h/a/noble.img?sig=1") == "noble");
}

TEST_CASE("image cache: a config's url image needs a sha256, and is not usable before it is pulled") {
  TempDir dir;
  const std::string sha(64, '1');
  auto error_for = [&](const std::string& text) {
    auto config = load_runner_config(dir.write("runner.json", text));
    REQUIRE_FALSE(config.has_value());
    return config.error().message;
  };
  const std::string file = (dir.path / "runner.json").string();
  CHECK(error_for(R"({"images": [{"label": "a", "url": "https://h/a.qcow2"}]})") ==
        file + ": images[0].sha256 \"\": must be 64 hex digits (sha256sum prints them) (a url needs the sha256 of the image)");
  CHECK(error_for(R"({"images": [{"label": "a", "url": "ftp://h/a.qcow2", "sha256": ")" + sha + R"("}]})") ==
        file + ": images[0].url \"ftp://h/a.qcow2\": only http:// and https:// URLs can be pulled");
  CHECK(error_for(R"({"images": [{"label": "a", "disk": "/a", "firmware": "efi"}]})") ==
        file + ": images[0].firmware \"efi\": must be \"bios\" or \"uefi\" (empty: bios)");

  auto config = load_runner_config(dir.write("ok.json", R"({"state_dir": "state", "images": [{"label": "cloud",
      "url": "https://h/cloud.qcow2", "sha256": ")" + sha + R"("}]})"));
  REQUIRE_MESSAGE(config.has_value(), (config ? "" : config.error().message));
  apply_image_cache(*config);  // nothing cached: the disk stays empty
  CHECK(config->images(0).disk().empty());
  v1::JobSpec job;
  job.set_runs_on("cloud");
  CHECK(resolve_image(job, *config).error().message.find("not pulled into the image cache yet") != std::string::npos);

  // Once the blob of that sha256 is in the cache, the label uses it.
  const fs::path blob = image_cache_dir(*config) / "blobs" / sha;
  fs::create_directories(blob.parent_path());
  dir.write(fs::relative(blob, dir.path).string(), std::string("QFI\xfb", 4) + std::string(60, '\0'));
  apply_image_cache(*config);
  CHECK(config->images(0).disk() == blob.string());
}
