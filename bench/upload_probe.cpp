// Host halves of the upload benchmark (bench/upload_iso.py, BENCHMARKS.md "Uploads
// by ISO"), timed in-process so no program start is counted:
//
//   upload_probe sftp PORT USER KEYFILE LOCAL REMOTE MODE
//       the runner's upload path: SshSession::upload_file (SFTP writes, then chmod)
//   upload_probe iso OUT LABEL FILE...
//       the runner's ISO writer (runtime/vm/iso9660) as the runner uses it for a
//       job's uploads: FILE number i becomes u<i>, copied from its source as OUT is
//       written (runtime/vm/vm_prepare.cpp)
//   upload_probe iso-command LABEL DESTINATION MODE
//       prints the runner's guest command that copies u0 of the ISO labelled LABEL
//       to DESTINATION (runtime/job/guest_commands.hpp, uploads_iso_command)
//
// Prints one JSON line: {"seconds": S} (the work only: connecting is not timed).
// KEYFILE is an OpenSSH private key with KEYFILE.pub next to it; MODE is octal.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/job/guest_commands.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "runtime/vm/iso9660.hpp"

namespace {

using Clock = std::chrono::steady_clock;

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

int print_seconds(Clock::time_point start) {
  std::printf("{\"seconds\": %.6f}\n", std::chrono::duration<double>(Clock::now() - start).count());
  return 0;
}

int sftp(char** argv) {
  solstice::SshTarget target;
  target.port = static_cast<uint16_t>(std::atoi(argv[0]));
  target.user = argv[1];
  target.private_key = read_all(argv[2]);
  target.public_key = read_all(std::string(argv[2]) + ".pub");
  auto session = solstice::SshSession::connect(target, std::chrono::seconds(60));
  if (!session) {
    std::fprintf(stderr, "upload_probe: %s\n", session.error().message.c_str());
    return 1;
  }
  auto start = Clock::now();
  auto uploaded = session->upload_file(argv[3], argv[4], static_cast<int>(std::strtol(argv[5], nullptr, 8)));
  if (!uploaded) {
    std::fprintf(stderr, "upload_probe: %s\n", uploaded.error().message.c_str());
    return 1;
  }
  return print_seconds(start);
}

int iso(int count, char** argv) {
  auto start = Clock::now();
  std::vector<solstice::IsoFile> files;
  for (int i = 2; i < count; ++i) {
    solstice::IsoFile file;
    file.name = solstice::uploads_iso_file_name(i - 2);
    file.source = argv[i];
    file.source_size = std::filesystem::file_size(argv[i]);
    files.push_back(std::move(file));
  }
  auto written = solstice::write_iso9660(argv[0], argv[1], files);
  if (!written) {
    std::fprintf(stderr, "upload_probe: %s\n", written.error().message.c_str());
    return 1;
  }
  return print_seconds(start);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "sftp" && argc == 8) return sftp(argv + 2);
  if (mode == "iso" && argc >= 5) return iso(argc - 2, argv + 2);
  if (mode == "iso-command" && argc == 5) {
    std::fputs(solstice::uploads_iso_command(argv[2], {{0, argv[3], static_cast<uint32_t>(std::strtoul(argv[4], nullptr, 8))}}).c_str(), stdout);
    return 0;
  }
  std::fprintf(stderr,
               "usage: upload_probe sftp PORT USER KEYFILE LOCAL REMOTE MODE\n"
               "       upload_probe iso OUT LABEL FILE...\n"
               "       upload_probe iso-command LABEL DESTINATION MODE\n");
  return 2;
}
