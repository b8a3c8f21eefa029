#pragma once
// ISO 9660 image writer for the cloud-init NoCloud seed. Written by hand because
// no Debian library writes ISO images from memory (libisofs/libburn pull in a
// whole burning stack; genisoimage is a program, and we may not run it).
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"

namespace solstice {

struct IsoFile {
  std::string name;     // flat name in the root directory, e.g. "user-data"
  std::string content;  // bytes
};

// Builds the whole image in memory: ISO 9660 level 1 names plus Joliet and Rock
// Ridge long names, so Linux (isofs) and cloud-init see "user-data", "meta-data".
// Same input -> same bytes (fixed timestamps). Fails with a clear message for a
// volume label or file name the image cannot hold.
Result<std::string> build_iso9660(const std::string& volume_label,
                                  const std::vector<IsoFile>& files);

// build_iso9660 written to `path`, created exclusively (fails if it exists) with mode
// 0600; a partly written file is removed.
Result<void> write_iso9660(const std::filesystem::path& path,
                           const std::string& volume_label,
                           const std::vector<IsoFile>& files);

}  // namespace solstice
