#pragma once
// Names in the seed ISO (inside the ISO 9660 writer, not a public header): the
// volume label, each file's Joliet name and its unique level-1 8.3 name for the
// primary tree, checked before anything is laid out.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/error.hpp"
#include "runtime/vm/iso9660.hpp"

namespace solstice::iso9660_names {

struct PlannedFile {
  const IsoFile* source = nullptr;
  std::string primary_base;  // level-1 8.3 name: up to 8 d-characters ...
  std::string primary_ext;   // ... and up to 3
  std::u16string joliet_name;
  std::uint32_t extent = 0;

  std::string primary_identifier() const { return primary_base + "." + primary_ext + ";1"; }
};

// "name" with non-printable bytes shown as \xNN, for error messages.
std::string printable(std::string_view text);

// A label blkid and cloud-init read back unchanged (d-characters, at most 16).
Result<void> check_volume_label(const std::string& label);

// Every file checked (name, no duplicate, size) and given its names in both trees.
Result<std::vector<PlannedFile>> plan_files(const std::vector<IsoFile>& files);

}  // namespace solstice::iso9660_names
