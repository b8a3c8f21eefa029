#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <utility>

#include "runtime/job/job_file.hpp"
#include "runtime/job/runner_config.hpp"
#include "tests/unit/temp_dir.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using solstice::load_runner_config;
using solstice::load_test_guest_image;
using solstice::resolve_image;

namespace {

struct TempDir : solstice::test::TempDir {
  TempDir() : solstice::test::TempDir("solstice-runner-config-") {}
};

const std::string qcow2_bytes = std::string("QFI\xfb\0\0\0\3", 8) + std::string(504, '\0');
// One sector with an MBR boot signature: a raw disk the firmware can boot from.
const std::string raw_bytes = std::string(510, '\x55') + "\x55\xaa";

v1::JobSpec job_on(const std::string& label) {
  v1::JobSpec job;
  job.set_runs_on(label);
  job.add_steps()->set_script("true");
  return job;
}

}  // namespace

TEST_CASE("default runner config") {
  const auto config = solstice::default_runner_config();
  CHECK(config.qemu_binary() == "qemu-system-x86_64");
  CHECK(config.accel() == "auto");
  CHECK(config.default_job_timeout_seconds() == 3600);
  CHECK(config.boot_timeout_seconds() == 300);
  CHECK(config.powerdown_timeout_seconds() == 30);
  CHECK(config.max_concurrent_vms() == 2);
  // Restored starts at once: as many as the host has cores, unless the file says.
  CHECK_FALSE(config.has_max_concurrent_starts());
  CHECK(solstice::max_concurrent_starts_of(config) == std::max(1u, std::thread::hardware_concurrency()));
  CHECK(config.images_size() == 0);
  if (::geteuid() == 0) {
    CHECK(config.state_dir() == "/var/lib/solstice-runner");
  } else {
    const char* xdg = std::getenv("XDG_STATE_HOME");
    const char* home = std::getenv("HOME");
    if (xdg != nullptr && xdg[0] == '/') {
      CHECK(config.state_dir() == std::string(xdg) + "/solstice-runner");
    } else if (home != nullptr && home[0] == '/') {
      CHECK(config.state_dir() == std::string(home) + "/.local/state/solstice-runner");
    }
  }
  CHECK(solstice::validate_runner_config(config).has_value());
}

TEST_CASE("a config file overrides defaults and resolves image paths against its directory") {
  TempDir dir;
  const auto file = dir.write("etc/runner.json", R"({
    "accel": "tcg", "maxConcurrentVms": 4, "state_dir": "state",
    "images": [
      {"label": "debian", "disk": "../images/debian.qcow2", "user": "debian", "vcpus": 2},
      {"label": "tiny", "boot_mode": "BOOT_MODE_KERNEL", "kernel": "/boot/vmlinuz", "initrd": "initrd.img"}
    ]
  })");
  const auto config = load_runner_config(file);
  INFO((config ? std::string() : config.error().message));
  REQUIRE(config.has_value());
  CHECK(config->accel() == "tcg");
  CHECK(config->max_concurrent_vms() == 4);
  CHECK(config->boot_timeout_seconds() == 300);  // left out: default kept
  CHECK(solstice::max_concurrent_starts_of(*config) == std::max(1u, std::thread::hardware_concurrency()));
  CHECK(config->qemu_binary() == "qemu-system-x86_64");
  CHECK(config->state_dir() == (dir.path / "etc/state").string());
  REQUIRE(config->images_size() == 2);
  CHECK(config->images(0).disk() == (dir.path / "images/debian.qcow2").string());
  CHECK(config->images(1).boot_mode() == v1::BOOT_MODE_KERNEL);
  CHECK(config->images(1).kernel() == "/boot/vmlinuz");
  CHECK(config->images(1).initrd() == (dir.path / "etc/initrd.img").string());

  const auto example = load_runner_config(fs::path(SOLSTICE_SOURCE_DIR) / "examples/runner-config.json");
  INFO((example ? std::string() : example.error().message));
  CHECK(example.has_value());
}

TEST_CASE("config file errors name the file, the field and the value") {
  TempDir dir;
  const auto error_for = [&](const std::string& json) {
    const auto file = dir.write("runner.json", json);
    const auto config = load_runner_config(file);
    REQUIRE_FALSE(config.has_value());
    return config.error().message;
  };
  const std::string file = (dir.path / "runner.json").string();
  CHECK(error_for(R"({"imagez": []})") == file + ": unknown field 'imagez' (did you mean 'images'?)");
  CHECK(error_for("{\n  \"accel\": \"tcg\",\n}") .rfind(file + ":3:1: invalid JSON: ", 0) == 0);
  CHECK(error_for(R"({"accel": "fast"})") == file + ": accel \"fast\": must be \"auto\", \"kvm\" or \"tcg\"");
  CHECK(error_for(R"({"max_concurrent_starts": 5000})") ==
        file + ": max_concurrent_starts 5000: at most 1024");
  CHECK(error_for(R"({"images": [{"label": "a", "boot_mode": "BOOT_MODE_FLOPPY"}]})") ==
        file + ": field 'images[0].boot_mode' must be one of BOOT_MODE_UNSPECIFIED, BOOT_MODE_DISK, "
               "BOOT_MODE_KERNEL, got string \"BOOT_MODE_FLOPPY\"");
  CHECK(error_for(R"({"images": [{"label": "a", "disk": "/a"}, {"label": "a", "disk": "/b"}]})") ==
        file + ": images[1].label \"a\" is already used by images[0]");
  CHECK(error_for(R"({"images": [{"disk": "/a", "memory_mib": 32}]})") ==
        file + ": images[0].label is empty: jobs choose an image by its label (runs_on)\n"
               "images[0].memory_mib 32: at least 64 MiB is needed to boot a guest");
  CHECK(error_for(R"({"images": [{"label": "k", "boot_mode": "BOOT_MODE_KERNEL"}]})") ==
        file + ": images[0].kernel is empty: kernel boot needs a kernel");
}

TEST_CASE("resolve_image: a job's own image path gets the defaults and its detected format") {
  TempDir dir;
  const auto qcow2 = dir.write("base.qcow2", qcow2_bytes);
  const auto raw = dir.write("base.img", raw_bytes);
  v1::JobSpec job;
  job.set_image(qcow2.string());
  auto image = resolve_image(job, solstice::default_runner_config());
  REQUIRE(image.has_value());
  CHECK(image->disk() == qcow2.string());
  CHECK(image->disk_format() == "qcow2");
  CHECK(image->user() == "runner");
  CHECK(image->vcpus() == 1);
  CHECK(image->memory_mib() == 512);
  CHECK(image->machine() == "pc");
  CHECK(image->boot_mode() == v1::BOOT_MODE_DISK);

  job.set_image(raw.string());
  job.set_vcpus(3);
  job.set_memory_mib(2048);
  image = resolve_image(job, solstice::default_runner_config());
  REQUIRE(image.has_value());
  CHECK(image->disk_format() == "raw");
  CHECK(image->vcpus() == 3);
  CHECK(image->memory_mib() == 2048);

  job.set_image((dir.path / "gone.qcow2").string());
  CHECK(resolve_image(job, solstice::default_runner_config()).error().message ==
        "image \"" + (dir.path / "gone.qcow2").string() + "\": no such file");
}

TEST_CASE("resolve_image: a runs_on label gives the configured image, the job's size wins") {
  TempDir dir;
  const auto disk = dir.write("debian.qcow2", qcow2_bytes);
  auto config = solstice::default_runner_config();
  auto* debian = config.add_images();
  debian->set_label("debian");
  debian->set_disk(disk.string());
  debian->set_user("debian");
  debian->set_vcpus(2);
  debian->set_memory_mib(1024);
  debian->set_machine("q35");

  auto image = resolve_image(job_on("debian"), config);
  REQUIRE(image.has_value());
  CHECK(image->label() == "debian");
  CHECK(image->user() == "debian");
  CHECK(image->vcpus() == 2);
  CHECK(image->memory_mib() == 1024);
  CHECK(image->machine() == "q35");
  CHECK(image->disk_format() == "qcow2");
  CHECK(image->boot_mode() == v1::BOOT_MODE_DISK);

  auto bigger = job_on("debian");
  bigger.set_vcpus(8);
  bigger.set_memory_mib(4096);
  image = resolve_image(bigger, config);
  REQUIRE(image.has_value());
  CHECK(image->vcpus() == 8);
  CHECK(image->memory_mib() == 4096);
  CHECK(image->user() == "debian");

  CHECK(resolve_image(job_on("arch"), config).error().message == "runs_on \"arch\": no image has this label");

  // The configured format must match what is in the file.
  debian->set_disk_format("raw");
  CHECK(resolve_image(job_on("debian"), config).error().message ==
        "images[0] (\"debian\") disk \"" + disk.string() + "\" is a qcow2 image, but images[0] (\"debian\") "
        "disk_format says \"raw\"");
  debian->set_disk_format("");
  debian->set_disk((dir.path / "missing.qcow2").string());
  CHECK(resolve_image(job_on("debian"), config).error().message ==
        "images[0] (\"debian\") disk \"" + (dir.path / "missing.qcow2").string() + "\": no such file");
}

TEST_CASE("load_test_guest_image reads the guest builder's manifest") {
  TempDir dir;
  dir.write("disk.raw", raw_bytes);
  dir.write("vmlinuz", "kernel");
  dir.write("initrd.img", "initrd");
  dir.write("guest.json", R"({
    "user_default": "runner", "disk": "disk.raw", "disk_format": "raw",
    "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0 quiet",
    "machine": "pc", "memory_mib": 256,
    "markers": {"sshd_started": "SOLSTICE-GUEST: sshd started"}
  })");
  auto image = load_test_guest_image(dir.path);
  INFO((image ? std::string() : image.error().message));
  REQUIRE(image.has_value());
  CHECK(image->label() == "solstice-test-guest");
  CHECK(image->user() == "runner");
  CHECK(image->disk() == (dir.path / "disk.raw").string());
  CHECK(image->disk_format() == "raw");
  CHECK(image->kernel() == (dir.path / "vmlinuz").string());
  CHECK(image->initrd() == (dir.path / "initrd.img").string());
  CHECK(image->kernel_append() == "console=ttyS0 quiet");
  CHECK(image->machine() == "pc");
  CHECK(image->memory_mib() == 256);
  CHECK(image->vcpus() == 1);
  CHECK(image->boot_mode() == v1::BOOT_MODE_DISK);

  // Optional keys left out: defaults; a kernel without a disk boots directly.
  dir.write("guest.json", R"({"kernel": "vmlinuz"})");
  image = load_test_guest_image(dir.path);
  REQUIRE(image.has_value());
  CHECK(image->boot_mode() == v1::BOOT_MODE_KERNEL);
  CHECK(image->disk().empty());
  CHECK(image->user() == "runner");
  CHECK(image->memory_mib() == 512);
  CHECK(image->machine() == "pc");

  // As an image of the runner's config, jobs reach it by its label.
  auto config = solstice::default_runner_config();
  *config.add_images() = *image;
  v1::JobSpec job;
  job.set_runs_on(solstice::test_guest_label);
  job.add_steps()->set_script("true");
  CHECK(solstice::validate_job(job, config).has_value());
  CHECK(resolve_image(job, config).has_value());

  const std::string manifest = (dir.path / "guest.json").string();
  dir.write("guest.json", R"({"disk": "disk.raw", "memory_mib": "256"})");
  CHECK(load_test_guest_image(dir.path).error().message ==
        manifest + ": \"memory_mib\" must be a whole number from 0 to 1048576, got \"256\"");
  dir.write("guest.json", R"({"disk": "nothing.raw"})");
  CHECK(load_test_guest_image(dir.path).error().message ==
        manifest + ": \"disk\" \"" + (dir.path / "nothing.raw").string() + "\": no such file");
  dir.write("guest.json", R"({"cmdline": "x"})");
  CHECK(load_test_guest_image(dir.path).error().message == manifest + ": names neither a \"disk\" nor a \"kernel\"");
  dir.write("guest.json", "{\"disk\": \"disk.raw\",}");
  CHECK(load_test_guest_image(dir.path).error().message.rfind(manifest + ":1:21: invalid JSON: ", 0) == 0);
  fs::remove(dir.path / "guest.json");
  CHECK(load_test_guest_image(dir.path).error().message.find(manifest + ": cannot open") == 0);
}

TEST_CASE("the built test guest, when present, loads as an image") {
  const fs::path guest_dir = SOLSTICE_TEST_GUEST_DIR;
  if (!fs::exists(guest_dir / "guest.json")) {
    MESSAGE("test guest not built in " << guest_dir << "; skipped");
    return;
  }
  const auto image = load_test_guest_image(guest_dir);
  INFO((image ? std::string() : image.error().message));
  REQUIRE(image.has_value());
  CHECK(image->label() == solstice::test_guest_label);
  CHECK(fs::path(image->disk()).is_absolute());
  CHECK(fs::is_regular_file(image->kernel()));
}

TEST_CASE("max_concurrent_starts: a number, or 0 for no limit") {
  TempDir dir;
  for (const auto& [json, limit] : {std::pair{R"({"max_concurrent_starts": 3})", 3u},
                                    std::pair{R"({"maxConcurrentStarts": 0})", 0u}}) {
    const auto config = load_runner_config(dir.write("runner.json", json));
    INFO(json << (config ? std::string() : " " + config.error().message));
    REQUIRE(config.has_value());
    CHECK(solstice::max_concurrent_starts_of(*config) == limit);
  }
}
