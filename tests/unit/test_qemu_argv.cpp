#include <doctest/doctest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "runtime/base/child_process.hpp"
#include "runtime/vm/identity_channel.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/qmp.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// A mkdtemp directory (with a comma in its name, to exercise escaping) removed at scope exit.
struct TempDir : solstice::test::TempDir {
  TempDir() : solstice::test::TempDir("solstice,argv-") {}
};

// The value following `option` each time it occurs.
std::vector<std::string> values_of(const std::vector<std::string>& argv, const std::string& option) {
  std::vector<std::string> values;
  for (size_t i = 0; i + 1 < argv.size(); ++i)
    if (argv[i] == option) values.push_back(argv[i + 1]);
  return values;
}

bool contains(const std::vector<std::string>& argv, const std::string& word) {
  return std::find(argv.begin(), argv.end(), word) != argv.end();
}

VmSpec disk_spec() {
  VmSpec spec;
  spec.vcpus = 3;
  spec.memory_mib = 768;
  spec.disk = "/var/lib/solstice/job-1/overlay.qcow2";
  spec.seed_iso = "/var/lib/solstice/job-1/seed.iso";
  spec.qmp_socket = "/run/solstice/job-1/qmp.sock";
  spec.console_log = "/var/lib/solstice/job-1/console.log";
  return spec;
}

void run_command(const std::vector<std::string>& argv) {
  auto child = ChildProcess::spawn(argv);
  REQUIRE_MESSAGE(child.has_value(), (child ? "" : child.error().message));
  auto status = child->wait_for(30s);
  REQUIRE(status.has_value());
  REQUIRE_MESSAGE(status->code == 0, argv[0] << " failed: " << status->describe());
}

}  // namespace

TEST_SUITE("qemu_argv") {
  TEST_CASE("a disk-boot VM on TCG gets exactly the expected command line") {
    const std::vector<std::string> expected{
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "3", "-m", "768",
        "-drive", "file=/var/lib/solstice/job-1/overlay.qcow2,if=virtio,format=qcow2",
        "-drive", "file=/var/lib/solstice/job-1/seed.iso,if=ide,media=cdrom,readonly=on,format=raw",
        "-drive", "if=none,id=uploads-medium,readonly=on",
        "-device", "ide-cd,drive=uploads-medium,bus=ide.1,unit=0,id=uploads",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-chardev", "file,id=console0,path=/var/lib/solstice/job-1/console.log",
        "-serial", "chardev:console0",
        "-chardev", "socket,id=qmp0,path=/run/solstice/job-1/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control"};
    CHECK(build_qemu_argv(disk_spec()) == expected);
  }

  TEST_CASE("forwards bind 127.0.0.1 only, the seed is an IDE CD-ROM, no -daemonize") {
    auto argv = build_qemu_argv(disk_spec());
    CHECK_FALSE(contains(argv, "-daemonize"));
    auto netdevs = values_of(argv, "-netdev");
    REQUIRE(netdevs.size() == 1);
    CHECK(netdevs[0].find("hostfwd=tcp:127.0.0.1:0-:22") != std::string::npos);
    CHECK(netdevs[0].find("hostfwd=tcp::") == std::string::npos);
    auto drives = values_of(argv, "-drive");
    REQUIRE(drives.size() == 3);
    CHECK(drives[1].find("if=ide,media=cdrom") != std::string::npos);
    CHECK(std::count_if(drives.begin(), drives.end(), [](const std::string& d) {
            return d.find("if=virtio") != std::string::npos;
          }) == 1);
  }

  TEST_CASE("every VM has the uploads CD-ROM drive: empty, or holding the job's uploads ISO") {
    VmSpec spec = disk_spec();
    auto devices = values_of(build_qemu_argv(spec), "-device");
    CHECK(std::count(devices.begin(), devices.end(),
                     std::string{"ide-cd,drive=uploads-medium,bus=ide.1,unit=0,id="} + uploads_drive_id) == 1);
    CHECK(values_of(build_qemu_argv(spec), "-drive").back() == "if=none,id=uploads-medium,readonly=on");
    spec.uploads_iso = "/run/job/uploads.iso";
    CHECK(values_of(build_qemu_argv(spec), "-drive").back() ==
          "if=none,id=uploads-medium,readonly=on,format=raw,file=/run/job/uploads.iso");
    // The same devices either way: a clone's argv matches its template's.
    CHECK(values_of(build_qemu_argv(spec), "-device") == devices);
  }

  TEST_CASE("vcpus, memory, guest port and machine are passed through") {
    VmSpec spec = disk_spec();
    spec.vcpus = 7;
    spec.memory_mib = 4096;
    spec.guest_ssh_port = 2222;
    spec.machine = "q35";
    auto argv = build_qemu_argv(spec);
    CHECK(values_of(argv, "-smp") == std::vector<std::string>{"7"});
    CHECK(values_of(argv, "-m") == std::vector<std::string>{"4096"});
    CHECK(values_of(argv, "-machine") == std::vector<std::string>{"q35"});
    CHECK(values_of(argv, "-netdev")[0] == "user,id=net0,hostfwd=tcp:127.0.0.1:0-:2222");
  }

  TEST_CASE("accelerator and CPU model") {
    VmSpec spec = disk_spec();
    spec.accel = Accel::kvm;
    auto kvm = build_qemu_argv(spec);
    CHECK(values_of(kvm, "-accel") == std::vector<std::string>{"kvm"});
    CHECK(values_of(kvm, "-cpu") == std::vector<std::string>{"host"});
    spec.cpu = "qemu64";
    CHECK(values_of(build_qemu_argv(spec), "-cpu") == std::vector<std::string>{"qemu64"});
    spec.accel = Accel::tcg;
    spec.cpu.clear();
    CHECK(values_of(build_qemu_argv(spec), "-cpu") == std::vector<std::string>{"max"});
  }

  TEST_CASE("commas in paths are doubled; snapshot and format are honoured") {
    VmSpec spec = disk_spec();
    spec.disk = "/data/a,b/base.img";
    spec.disk_format = "raw";
    spec.snapshot = true;
    spec.seed_iso = "/data/c,d/seed.iso";
    spec.qmp_socket = "/run/e,f/qmp.sock";
    spec.console_log = "/data/g,,h/console.log";
    auto argv = build_qemu_argv(spec);
    spec.uploads_iso = "/data/i,j/uploads.iso";
    auto drives = values_of(build_qemu_argv(spec), "-drive");
    REQUIRE(drives.size() == 3);
    CHECK(drives[0] == "file=/data/a,,b/base.img,if=virtio,format=raw,snapshot=on");
    CHECK(drives[1] == "file=/data/c,,d/seed.iso,if=ide,media=cdrom,readonly=on,format=raw");
    CHECK(drives[2] == "if=none,id=uploads-medium,readonly=on,format=raw,file=/data/i,,j/uploads.iso");
    auto chardevs = values_of(argv, "-chardev");
    REQUIRE(chardevs.size() == 2);
    CHECK(chardevs[0] == "file,id=console0,path=/data/g,,,,h/console.log");
    CHECK(chardevs[1] == "socket,id=qmp0,path=/run/e,,f/qmp.sock,server=on,wait=off");
  }

  TEST_CASE("a console descriptor becomes fd set 1 and the path is not given to QEMU") {
    VmSpec spec = disk_spec();
    spec.console_fd = 3;
    auto argv = build_qemu_argv(spec);
    CHECK(values_of(argv, "-add-fd") == std::vector<std::string>{"fd=3,set=1,opaque=console"});
    auto chardevs = values_of(argv, "-chardev");
    REQUIRE(chardevs.size() == 2);
    CHECK(chardevs[0] == "file,id=console0,path=/dev/fdset/1");
    CHECK(values_of(argv, "-serial") == std::vector<std::string>{"chardev:console0"});
    for (const auto& arg : argv) CHECK(arg.find("console.log") == std::string::npos);
  }

  TEST_CASE("an identity socket adds a virtio-serial port named for the identity agent; none without") {
    VmSpec spec = disk_spec();
    CHECK_FALSE(contains(build_qemu_argv(spec), "virtio-serial-pci,id=vserial0"));
    spec.identity_socket = "/run/solstice/job,1/identity.sock";
    auto argv = build_qemu_argv(spec);
    auto chardevs = values_of(argv, "-chardev");
    CHECK(std::count(chardevs.begin(), chardevs.end(),
                     "socket,id=identity0,path=/run/solstice/job,,1/identity.sock,server=on,wait=off") == 1);
    auto devices = values_of(argv, "-device");
    CHECK(std::count(devices.begin(), devices.end(), "virtio-serial-pci,id=vserial0") == 1);
    CHECK(std::count(devices.begin(), devices.end(),
                     "virtserialport,bus=vserial0.0,chardev=identity0,name=org.solstice.identity") == 1);
  }

  TEST_CASE("kernel boot adds -kernel, -initrd and -append verbatim") {
    VmSpec spec = disk_spec();
    spec.boot = VmBoot::kernel;
    spec.kernel = "/images/vmlinuz";
    spec.initrd = "/images/initrd.img";
    spec.kernel_append = "console=ttyS0,115200 root=/dev/vda";
    auto argv = build_qemu_argv(spec);
    CHECK(values_of(argv, "-kernel") == std::vector<std::string>{"/images/vmlinuz"});
    CHECK(values_of(argv, "-initrd") == std::vector<std::string>{"/images/initrd.img"});
    CHECK(values_of(argv, "-append") == std::vector<std::string>{"console=ttyS0,115200 root=/dev/vda"});
    // Disk boot has none of them.
    CHECK_FALSE(contains(build_qemu_argv(disk_spec()), "-kernel"));
  }

  TEST_CASE("real QEMU accepts the command line (TCG), answers QMP and quits") {
    TempDir dir;
    for (bool snapshot : {false, true}) {
      CAPTURE(snapshot);
      VmSpec spec;
      spec.disk = dir.path / "disk,1.qcow2";
      spec.seed_iso = dir.path / "seed,1.iso";
      spec.qmp_socket = dir.path / "q,mp.sock";
      spec.console_log = dir.path / "con,sole.log";
      spec.identity_socket = dir.path / "iden,tity.sock";
      spec.snapshot = snapshot;
      spec.vcpus = 2;
      spec.memory_mib = 128;
      run_command({"qemu-img", "create", "-q", "-f", "qcow2", spec.disk.string(), "16M"});
      run_command({"qemu-img", "create", "-q", "-f", "raw", spec.seed_iso.string(), "1M"});

      auto qemu = ChildProcess::spawn(build_qemu_argv(spec));
      REQUIRE_MESSAGE(qemu.has_value(), (qemu ? "" : qemu.error().message));
      auto qmp = QmpClient::connect(spec.qmp_socket, 10s);
      if (!qmp) {
        qemu->kill(SIGKILL);
        char buffer[4096];
        ssize_t n = ::read(qemu->stderr_fd(), buffer, sizeof buffer);
        FAIL("QMP: " << qmp.error().message << "; QEMU stderr: "
                     << std::string(buffer, static_cast<size_t>(std::max<ssize_t>(n, 0))));
      }
      // QEMU listens on the identity port's socket.
      auto channel = IdentityChannel::connect(spec.identity_socket, std::chrono::steady_clock::now() + 5s);
      CHECK_MESSAGE(channel.has_value(), (channel ? "" : channel.error().message));
      std::this_thread::sleep_for(1s);  // let the VM run under TCG for a moment
      auto status = qmp->execute("query-status");
      REQUIRE(status.has_value());
      CHECK((*status)["status"] == "running");

      // The drives QEMU made are the ones we asked for, on the buses we asked for.
      auto blocks = qmp->execute("query-block");
      REQUIRE(blocks.has_value());
      bool saw_virtio_disk = false, saw_ide_cdrom = false;
      for (const auto& block : *blocks) {
        const std::string device = block.value("device", "");
        const auto& inserted = block.value("inserted", nlohmann::json::object());
        if (device == "virtio0") {
          saw_virtio_disk = true;
          const std::string file = inserted.value("file", "");
          if (snapshot) {
            // snapshot=on puts a temporary overlay on top of our image.
            CHECK(inserted.value(nlohmann::json::json_pointer("/image/backing-image/filename"), "") ==
                  spec.disk.string());
          } else {
            CHECK(file == spec.disk.string());
          }
        }
        if (device.rfind("ide", 0) == 0 && device.find("-cd") != std::string::npos) {
          saw_ide_cdrom = true;
          CHECK(block.value("removable", false));
          CHECK(inserted.value("ro", false));
          CHECK(inserted.value("file", "") == spec.seed_iso.string());
        }
      }
      CHECK(saw_virtio_disk);
      CHECK(saw_ide_cdrom);

      // The uploads drive: there, empty, and it takes a medium by its qdev id.
      auto uploads_drive = std::find_if(blocks->begin(), blocks->end(), [](const nlohmann::json& block) {
        return block.value("qdev", "") == uploads_drive_id;
      });
      REQUIRE(uploads_drive != blocks->end());
      CHECK(uploads_drive->value("removable", false));
      CHECK_FALSE(uploads_drive->contains("inserted"));
      auto changed = qmp->execute("blockdev-change-medium",
                                  {{"id", uploads_drive_id}, {"filename", spec.seed_iso.string()},
                                   {"format", "raw"}, {"read-only-mode", "read-only"}});
      CHECK_MESSAGE(changed.has_value(), (changed ? "" : changed.error().message));
      blocks = qmp->execute("query-block");
      REQUIRE(blocks.has_value());
      for (const auto& block : *blocks)
        if (block.value("qdev", "") == uploads_drive_id)
          CHECK(block.value(nlohmann::json::json_pointer("/inserted/file"), "") == spec.seed_iso.string());

      auto usernet = qmp->human_command("info usernet");
      REQUIRE(usernet.has_value());
      CHECK(usernet->find("127.0.0.1") != std::string::npos);
      CHECK(parse_usernet_host_port(*usernet).has_value());

      auto quit = qmp->execute("quit");
      CHECK_MESSAGE(quit.has_value(), (quit ? "" : quit.error().message));
      auto exit = qemu->wait_for(10s);
      REQUIRE(exit.has_value());
      CHECK(exit->describe() == "exit code 0");
      CHECK(fs::exists(spec.console_log));
    }
  }
}
