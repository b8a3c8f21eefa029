// Bad input found by trying it: user_data that cloud-init cannot take, numbers
// far beyond any real job (4294967295), and a text file given as a raw disk image.
// Each is refused by validation, naming the field and the value.
#include <doctest/doctest.h>

#include <string>

#include "runtime/job/job_file.hpp"
#include "runtime/job/runner_config.hpp"
#include "temp_dir.hpp"

namespace {

using namespace solstice;
using test::TempDir;

const std::string mbr_sector = std::string(510, '\0') + "\x55\xaa";

// A config whose image "img" is a small bootable raw disk, and a job that runs on it.
struct Setup {
  TempDir dir;
  v1::RunnerConfig config = default_runner_config();
  v1::JobSpec job;
  Setup() {
    auto* image = config.add_images();
    image->set_label("img");
    image->set_disk(dir.write("disk.raw", mbr_sector + std::string(64 * 1024, '\0')).string());
    job.set_runs_on("img");
    job.add_steps()->set_script("true");
  }
  std::string problems() const {
    auto valid = validate_job(job, config);
    return valid ? std::string() : valid.error().message;
  }
};

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("user_data must be a cloud-config or a script") {
  Setup s;
  CHECK(s.problems().empty());
  s.job.set_user_data("#cloud-config\npackages: [curl]\n");
  CHECK(s.problems().empty());
  s.job.set_user_data("#!/bin/sh\necho hi\n");
  CHECK(s.problems().empty());
  s.job.set_user_data("packages: [curl]\n");
  auto why = s.problems();
  INFO(why);
  CHECK(has(why, "user_data starting with \"packages: [curl]"));
  CHECK(has(why, "#cloud-config"));
}

TEST_CASE("timeouts, keep_seconds and retries have caps") {
  Setup s;
  s.job.set_timeout_seconds(max_timeout_seconds);
  s.job.mutable_steps(0)->set_timeout_seconds(max_timeout_seconds);
  s.job.mutable_debug_on_failure()->set_keep_seconds(max_keep_seconds);
  s.job.set_retries(max_retries);
  CHECK(s.problems().empty());

  s.job.set_timeout_seconds(4294967295u);
  s.job.mutable_steps(0)->set_timeout_seconds(4294967295u);
  s.job.mutable_debug_on_failure()->set_keep_seconds(4294967295u);
  s.job.set_retries(4294967295u);
  CHECK(s.problems() ==
        "timeout_seconds 4294967295: at most 604800 (7 days)\n"
        "steps[0] (\"step 1\") timeout_seconds 4294967295: at most 604800 (7 days)\n"
        "debug_on_failure.keep_seconds 4294967295: at most 86400 (1 day)\n"
        "retries 4294967295: at most 10");
}

TEST_CASE("the runner configuration's timeouts have caps") {
  auto config = default_runner_config();
  CHECK(validate_runner_config(config));
  config.set_default_job_timeout_seconds(4294967295u);
  config.set_boot_timeout_seconds(86401);
  config.set_powerdown_timeout_seconds(3601);
  config.set_max_concurrent_vms(100000);
  auto refused = validate_runner_config(config);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message ==
        "default_job_timeout_seconds 4294967295: at most 604800 (7 days)\n"
        "boot_timeout_seconds 86401: at most 86400 (1 day)\n"
        "powerdown_timeout_seconds 3601: at most 3600 (1 hour)\n"
        "max_concurrent_vms 100000: at most 1024");
}

TEST_CASE("a raw image the VM boots from needs a partition table") {
  TempDir dir;
  v1::JobSpec job;
  auto text = dir.write("passwd", "root:x:0:0:root:/root:/bin/bash\n" + std::string(1024, 'x'));
  job.set_image(text.string());
  auto refused = resolve_image(job, default_runner_config());
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message ==
        "image \"" + text.string() + "\": not a bootable raw disk image: it has no partition table "
        "(no MBR boot signature 0x55AA at byte 510, no GPT header); give a disk image (raw or qcow2)");
  auto tiny = dir.write("tiny", "abc");
  job.set_image(tiny.string());
  CHECK_FALSE(resolve_image(job, default_runner_config()));

  job.set_image(dir.write("mbr.raw", mbr_sector).string());
  CHECK(resolve_image(job, default_runner_config()));
  job.set_image(dir.write("gpt.raw", std::string(512, '\0') + "EFI PART" + std::string(504, '\0')).string());
  CHECK(resolve_image(job, default_runner_config()));

  // A configured image booted by its kernel may use a bare file system as its disk.
  auto config = default_runner_config();
  auto* image = config.add_images();
  image->set_label("kernel-boot");
  image->set_disk(dir.write("rootfs.raw", std::string(4096, '\0')).string());
  image->set_boot_mode(v1::BOOT_MODE_KERNEL);
  image->set_kernel(dir.write("vmlinuz", "kernel").string());
  v1::JobSpec on_kernel;
  on_kernel.set_runs_on("kernel-boot");
  CHECK(resolve_image(on_kernel, config));
  image->set_boot_mode(v1::BOOT_MODE_DISK);
  refused = resolve_image(on_kernel, config);
  REQUIRE_FALSE(refused);
  CHECK(has(refused.error().message, "images[0] (\"kernel-boot\") disk \"" +
                                       (dir.path / "rootfs.raw").string() + "\": not a bootable"));
}
