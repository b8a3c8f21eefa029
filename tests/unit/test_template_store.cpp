#include <doctest/doctest.h>

#include <sys/file.h>
#include <sys/stat.h>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/template_store.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
namespace fs = std::filesystem;

namespace {

// A QEMU stand-in that only answers --version (the key's QEMU version).
fs::path fake_qemu(const test::TempDir& dir, const std::string& version) {
  auto path = dir.write("bin/qemu-" + version, "#!/bin/sh\necho 'QEMU emulator version " + version + "'\n");
  fs::permissions(path, fs::perms::owner_all);
  return path;
}

v1::ImageSpec image_of(const fs::path& disk) {
  v1::ImageSpec image;
  image.set_label("img");
  image.set_disk(disk.string());
  image.set_disk_format("raw");
  image.set_memory_mib(256);
  image.set_vcpus(1);
  return image;
}

mode_t mode_of(const fs::path& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

// What a template build leaves in its directory before publish.
void fill_build_dir(const test::TempDir& state, const fs::path& dir) {
  (void)state;
  std::ofstream(dir / "state") << "migration stream";
  std::ofstream(dir / "overlay.qcow2") << "overlay";
  std::ofstream(dir / "seed.iso") << "seed";
  std::ofstream(dir / "key") << "-----BEGIN OPENSSH PRIVATE KEY-----\n";
  std::ofstream(dir / "key.pub") << "ssh-ed25519 AAAA template";
  std::ofstream(dir / "host_key.blob", std::ios::binary) << std::string("\x00\x01host", 6);
}

}  // namespace

TEST_SUITE("template_store") {
  TEST_CASE("an image's hash is remembered by device, inode, size and mtime, and redone when they change") {
    test::TempDir state;
    auto disk = state.write("disk.raw", "first content");
    auto first = cached_file_sha256(state.path.string(), disk);
    REQUIRE(first);
    CHECK(*first == *sha256_of_file(disk));
    // The cache is what answers next time: a planted value comes back.
    auto hashes = templates_dir(state.path.string()) / "hashes";
    REQUIRE(fs::is_directory(hashes));
    int entries = 0;
    for (const auto& entry : fs::directory_iterator(hashes)) {
      std::ofstream(entry.path()) << std::string(64, 'a');
      ++entries;
    }
    CHECK(entries == 1);
    CHECK(*cached_file_sha256(state.path.string(), disk) == std::string(64, 'a'));
    // Another content (so another size and mtime): hashed again, never the old answer.
    std::ofstream(disk, std::ios::trunc) << "the second, longer content";
    auto second = cached_file_sha256(state.path.string(), disk);
    REQUIRE(second);
    CHECK(*second == *sha256_of_file(disk));
    CHECK(*second != *first);
  }

  TEST_CASE("an image-cache blob is identified by its name, without reading it") {
    test::TempDir state;
    const std::string sha(64, 'b');
    auto blob = state.write("images/blobs/" + sha, "not really that content");
    auto sum = cached_file_sha256(state.path.string(), blob);
    REQUIRE(sum);
    CHECK(*sum == sha);
  }

  TEST_CASE("the key changes with the image's content, the VM shape and QEMU's version") {
    test::TempDir state;
    v1::RunnerConfig config;
    config.set_state_dir(state.path.string());
    config.set_qemu_binary(fake_qemu(state, "7.2.0").string());
    auto disk = state.write("disk.raw", "content one");
    auto base = template_key_for(image_of(disk), config, "tcg");
    REQUIRE_MESSAGE(base, (base ? "" : base.error().message));
    CHECK(base->id.size() == 24);
    CHECK(template_key_for(image_of(disk), config, "tcg")->id == base->id);
    CHECK(base->inputs["qemu"] == "QEMU emulator version 7.2.0");

    auto more_memory = image_of(disk);
    more_memory.set_memory_mib(512);
    CHECK(template_key_for(more_memory, config, "tcg")->id != base->id);
    auto more_cpus = image_of(disk);
    more_cpus.set_vcpus(2);
    CHECK(template_key_for(more_cpus, config, "tcg")->id != base->id);
    auto other_machine = image_of(disk);
    other_machine.set_machine("q35");
    CHECK(template_key_for(other_machine, config, "tcg")->id != base->id);
    CHECK(template_key_for(image_of(disk), config, "kvm")->id != base->id);

    auto other_qemu = config;
    other_qemu.set_qemu_binary(fake_qemu(state, "8.0.0").string());
    CHECK(template_key_for(image_of(disk), other_qemu, "tcg")->id != base->id);

    std::ofstream(disk, std::ios::trunc) << "content two, a newer image";
    CHECK(template_key_for(image_of(disk), config, "tcg")->id != base->id);
  }

  TEST_CASE("QEMU's version is remembered by the binary's identity, and asked again when the binary changes") {
    test::TempDir state;
    auto qemu = fake_qemu(state, "7.2.0");
    auto first = qemu_version_of(qemu.string(), state.path.string());
    REQUIRE_MESSAGE(first, (first ? "" : first.error().message));
    CHECK(*first == "QEMU emulator version 7.2.0");
    // What the state dir remembers answers next time: a planted value comes back.
    auto versions = templates_dir(state.path.string()) / "qemu-versions";
    REQUIRE(fs::is_directory(versions));
    int entries = 0;
    for (const auto& entry : fs::directory_iterator(versions)) {
      CHECK(mode_of(entry.path()) == 0600);
      std::ofstream(entry.path(), std::ios::trunc) << "QEMU emulator version planted";
      ++entries;
    }
    CHECK(entries == 1);
    CHECK(*qemu_version_of(qemu.string(), state.path.string()) == "QEMU emulator version planted");
    // An upgrade in place (another file: size and mtime) is asked again.
    std::ofstream(qemu, std::ios::trunc) << "#!/bin/sh\necho 'QEMU emulator version 8.0.1'\n";
    fs::permissions(qemu, fs::perms::owner_all);
    CHECK(*qemu_version_of(qemu.string(), state.path.string()) == "QEMU emulator version 8.0.1");
    // Without a state dir nothing is remembered.
    CHECK(*qemu_version_of(qemu.string(), "") == "QEMU emulator version 8.0.1");
  }

  TEST_CASE("a missing image or QEMU is an error naming it") {
    test::TempDir state;
    v1::RunnerConfig config;
    config.set_state_dir(state.path.string());
    config.set_qemu_binary(fake_qemu(state, "7.2.0").string());
    auto missing = template_key_for(image_of(state.path / "nope.raw"), config, "tcg");
    REQUIRE_FALSE(missing);
    CHECK(missing.error().message.find("nope.raw") != std::string::npos);
    config.set_qemu_binary((state.path / "no-qemu").string());
    auto no_qemu = template_key_for(image_of(state.write("d.raw", "x")), config, "tcg");
    REQUIRE_FALSE(no_qemu);
    CHECK(no_qemu.error().message.find("no-qemu") != std::string::npos);
  }

  TEST_CASE("a published template is found, frozen and private; a stale one is never found") {
    test::TempDir state;
    TemplateStore store(state.path.string());
    TemplateKey key{"0123456789abcdef01234567", {{"vcpus", 1}, {"memory_mib", 256}, {"accel", "tcg"}}};
    CHECK_FALSE(store.find_ready(key.id));

    auto dir = store.make_build_dir(key.id);
    REQUIRE(dir);
    fill_build_dir(state, *dir);
    auto info = store.publish(*dir, key, "img", 1234);
    REQUIRE_MESSAGE(info, (info ? "" : info.error().message));
    CHECK_FALSE(fs::exists(*dir));
    CHECK(info->build_ms == 1234);
    CHECK(info->label == "img");
    auto ready = store.find_ready(key.id);
    REQUIRE(ready);
    CHECK(mode_of(store.dir_of(key.id) / "overlay.qcow2") == 0444);
    CHECK(mode_of(store.dir_of(key.id) / "key") == 0600);
    CHECK(mode_of(store.dir_of(key.id) / "key.pub") == 0600);
    CHECK(mode_of(store.dir_of(key.id) / "state") == 0600);
    CHECK(mode_of(store.dir_of(key.id)) == 0711);

    auto from = store.restore_spec(key.id);
    REQUIRE(from);
    CHECK(from->template_id() == key.id);
    CHECK(from->state_file() == (store.dir_of(key.id) / "state").string());
    CHECK(from->frozen_overlay() == (store.dir_of(key.id) / "overlay.qcow2").string());
    CHECK(from->template_host_key() == std::string("\x00\x01host", 6));
    CHECK(from->template_public_key() == "ssh-ed25519 AAAA template");
    CHECK_FALSE(from->identity_agent());
    CHECK_FALSE(from->cloud_init_errors());

    REQUIRE(store.mark_stale(key.id, "QEMU refused the state"));
    CHECK_FALSE(store.find_ready(key.id));
    auto listed = store.list();
    REQUIRE(listed.size() == 1);
    CHECK(listed[0].stale == "QEMU refused the state");

    // A rebuild replaces the stale one.
    auto again = store.make_build_dir(key.id);
    REQUIRE(again);
    fill_build_dir(state, *again);
    REQUIRE(store.publish(*again, key, "img", 99,
                          TemplateGuestFacts{true, "", /*cloud_init_errors=*/true}));
    auto rebuilt = store.find_ready(key.id);
    REQUIRE(rebuilt);
    CHECK(rebuilt->build_ms == 99);
    // What the build learnt about its guest reaches every clone's restore.
    CHECK(rebuilt->identity_agent);
    CHECK(rebuilt->cloud_init_errors);
    auto rebuilt_from = store.restore_spec(key.id);
    REQUIRE(rebuilt_from);
    CHECK(rebuilt_from->identity_agent());
    CHECK(rebuilt_from->cloud_init_errors());

    REQUIRE(store.remove(key.id));
    CHECK(store.list().empty());
  }

  TEST_CASE("a template missing a file is not ready") {
    test::TempDir state;
    TemplateStore store(state.path.string());
    TemplateKey key{"aaaaaaaaaaaaaaaaaaaaaaaa", {}};
    auto dir = store.make_build_dir(key.id);
    REQUIRE(dir);
    fill_build_dir(state, *dir);
    REQUIRE(store.publish(*dir, key, "img", 1));
    fs::remove(store.dir_of(key.id) / "state");
    CHECK_FALSE(store.find_ready(key.id));
  }

  TEST_CASE("the build lock excludes every other holder, in this process and others") {
    test::TempDir state;
    auto lock = TemplateLock::acquire(state.path.string(), "abc");
    REQUIRE(lock);
    // Another open of the lock file (as another runner would) cannot take it.
    auto path = templates_dir(state.path.string()) / "abc.lock";
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    CHECK(::flock(fd, LOCK_EX | LOCK_NB) != 0);
    { auto released = std::move(*lock); }
    CHECK(::flock(fd, LOCK_EX | LOCK_NB) == 0);
    ::close(fd);
    // And a lock of another template is independent.
    auto other = TemplateLock::acquire(state.path.string(), "def");
    CHECK(other);
  }

  TEST_CASE("a failed build is remembered for a while, and forgotten once one succeeds") {
    test::TempDir state;
    TemplateStore store(state.path.string());
    const std::string id = "bbbbbbbbbbbbbbbbbbbbbbbb";
    CHECK_FALSE(store.recent_failed_build(id, 600000000));
    REQUIRE(store.note_failed_build(id, "the guest did not get to SSH"));
    auto failed = store.recent_failed_build(id, 600000000);
    REQUIRE(failed);
    CHECK(failed->find("the guest did not get to SSH") != std::string::npos);
    CHECK_FALSE(store.recent_failed_build(id, 0));  // longer ago than asked about
    auto dir = store.make_build_dir(id);
    REQUIRE(dir);
    fill_build_dir(state, *dir);
    REQUIRE(store.publish(*dir, TemplateKey{id, {}}, "img", 1));
    CHECK_FALSE(store.recent_failed_build(id, 600000000));
  }

  TEST_CASE("a build directory a killed runner left is removed by the next build") {
    test::TempDir state;
    TemplateStore store(state.path.string());
    const std::string id = "cccccccccccccccccccccccc";
    auto left = templates_dir(state.path.string()) / (".build-" + id + "-99999-0");
    fs::create_directories(left);
    std::ofstream(left / "state") << "half written";
    auto dir = store.make_build_dir(id);
    REQUIRE(dir);
    CHECK_FALSE(fs::exists(left));
    CHECK(fs::is_directory(*dir));
  }

  TEST_CASE("jobs the template cannot serve boot cold, saying why") {
    v1::JobSpec job;
    v1::ImageSpec image;
    CHECK(template_unsupported(job, image).empty());
    image.set_firmware("uefi");
    CHECK(template_unsupported(job, image).find("UEFI") != std::string::npos);
    image.set_firmware("bios");
    job.set_user_data("#cloud-config\n");
    CHECK(template_unsupported(job, image).find("user-data") != std::string::npos);
  }
}
