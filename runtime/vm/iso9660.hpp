#pragma once
// ISO 9660 image writer for the cloud-init NoCloud seed. Written by hand because
// no Debian library writes ISO images from memory (libisofs/libburn pull in a
// whole burning stack; genisoimage is a program, and we may not run it).
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "runtime/base/error.hpp"

namespace solstice {

struct IsoFile {
  std::string name;     // flat name in the root directory, e.g. "user-data"
  std::string content;  // bytes, unless `source` is set
  // When set, the file's bytes are this host file's, copied while the image is
  // written (never held in memory); `source_size` is its size, taken beforehand
  // (the image is laid out from it). A source of another size then fails.
  std::filesystem::path source;
  std::uint64_t source_size = 0;

  IsoFile() = default;
  IsoFile(std::string file_name, std::string bytes) : name(std::move(file_name)), content(std::move(bytes)) {}

  std::uint64_t size() const { return source.empty() ? content.size() : source_size; }
};

// Builds the whole image in memory: ISO 9660 level 1 names plus Joliet and Rock
// Ridge long names, so Linux (isofs) and cloud-init see "user-data", "meta-data".
// Same input -> same bytes (fixed timestamps). Fails with a clear message for a
// volume label or file name the image cannot hold.
Result<std::string> build_iso9660(const std::string& volume_label,
                                  const std::vector<IsoFile>& files);

// The same image written to `path`, created exclusively (fails if it exists) with
// mode 0600; a partly written file is removed. Streams: the directories are built in
// memory, each file's bytes go straight to `path` (a `source` by copy_file_range),
// and the zero padding is left as a hole. Errors name the file and the source.
Result<void> write_iso9660(const std::filesystem::path& path,
                           const std::string& volume_label,
                           const std::vector<IsoFile>& files);

}  // namespace solstice
