// ISO 9660 writer, by hand: the Debian libraries that write ISO images (libisofs,
// libburn) are built around a burning/streaming stack and files on disk, and
// genisoimage/xorriso are programs we do not run at job time. A seed ISO is a
// handful of small files in one flat directory, which takes a few hundred lines.
//
// Image layout (2048-byte sectors):
//   0..15   system area (zeros)
//   16      primary volume descriptor (level-1 8.3 names + Rock Ridge long names)
//   17      Joliet supplementary volume descriptor (UCS-2 long names)
//   18      volume descriptor set terminator
//   19, 20  primary path tables (L, M)
//   21, 22  Joliet path tables (L, M)
//   23      SUSP continuation area holding the Rock Ridge ER entry
//   24..    primary root directory, then Joliet root directory (one or more sectors)
//   ..      file data, each file starting on a sector boundary
//   ..      150 sectors of zero padding (as mkisofs does, against read-ahead past
//           the end of the medium on some drives)
//
// One file of about 540 lines: building in memory and writing to a file (uploads,
// streamed from their sources) share the one private layout; the name rules live
// in iso9660_names.cpp.
#include "runtime/vm/iso9660.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <cerrno>
#include <cstdint>
#include <limits>
#include <set>
#include <string_view>

#include "runtime/vm/iso9660_names.hpp"

namespace solstice {
namespace {

using iso9660_names::check_volume_label;
using iso9660_names::plan_files;
using iso9660_names::PlannedFile;
using iso9660_names::printable;

constexpr std::size_t kSectorSize = 2048;
constexpr std::uint32_t kFirstVolumeDescriptorSector = 16;
constexpr std::uint32_t kPaddingSectors = 150;
constexpr std::size_t kMaxDirectoryRecord = 255;

// Fixed so that the same input always yields the same bytes: 2000-01-01 00:00:00 UTC.
constexpr int kYear = 2000, kMonth = 1, kDay = 1;

constexpr std::uint8_t kFlagDirectory = 0x02;
constexpr std::uint32_t kModeDirectory = 040555;
constexpr std::uint32_t kModeFile = 0100444;

constexpr std::string_view kRripId = "RRIP_1991A";
constexpr std::string_view kRripDescriptor =
    "THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
constexpr std::string_view kRripSource =
    "PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN "
    "PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

// ---- byte encoding -------------------------------------------------------------

void append_le16(std::string& out, std::uint16_t value) {
  out.push_back(static_cast<char>(value & 0xff));
  out.push_back(static_cast<char>(value >> 8));
}
void append_be16(std::string& out, std::uint16_t value) {
  out.push_back(static_cast<char>(value >> 8));
  out.push_back(static_cast<char>(value & 0xff));
}
void append_le32(std::string& out, std::uint32_t value) {
  for (int shift = 0; shift < 32; shift += 8) out.push_back(static_cast<char>((value >> shift) & 0xff));
}
void append_be32(std::string& out, std::uint32_t value) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((value >> shift) & 0xff));
}
// ECMA-119 7.2.3 / 7.3.3: little-endian copy followed by a big-endian copy.
void append_both16(std::string& out, std::uint16_t value) {
  append_le16(out, value);
  append_be16(out, value);
}
void append_both32(std::string& out, std::uint32_t value) {
  append_le32(out, value);
  append_be32(out, value);
}

// Fixed-width text field padded with `pad`, written at `offset` of `block`.
void put_padded(std::string& block, std::size_t offset, std::size_t width, std::string_view text,
                char pad = ' ') {
  for (std::size_t i = 0; i < width; ++i) block[offset + i] = i < text.size() ? text[i] : pad;
}
// Same for a UCS-2 (big-endian) field padded with UCS-2 spaces.
void put_padded_ucs2(std::string& block, std::size_t offset, std::size_t width,
                     const std::u16string& text) {
  for (std::size_t i = 0; i + 1 < width; i += 2) {
    char16_t unit = i / 2 < text.size() ? text[i / 2] : u' ';
    block[offset + i] = static_cast<char>(unit >> 8);
    block[offset + i + 1] = static_cast<char>(unit & 0xff);
  }
}
void put_at(std::string& block, std::size_t offset, const std::string& bytes) {
  std::copy(bytes.begin(), bytes.end(), block.begin() + static_cast<std::ptrdiff_t>(offset));
}

std::string ucs2_bytes(const std::u16string& text) {
  std::string out;
  for (char16_t unit : text) append_be16(out, unit);
  return out;
}

// ---- directory records and SUSP / Rock Ridge entries -----------------------------

std::string recording_time() {
  std::string out;
  out.push_back(static_cast<char>(kYear - 1900));
  out.push_back(static_cast<char>(kMonth));
  out.push_back(static_cast<char>(kDay));
  out.append(3, '\0');  // hour, minute, second
  out.push_back('\0');  // offset from GMT in 15-minute units
  return out;
}

// 17-byte volume descriptor date: "YYYYMMDDHHMMSScc" and a GMT offset byte.
std::string volume_time(bool unspecified) {
  std::string out = unspecified ? std::string(16, '0') : "2000010100000000";
  out.push_back('\0');
  return out;
}

std::string susp_sp() { return std::string("SP\x07\x01\xbe\xef\x00", 7); }

std::string rrip_rr(std::uint8_t flags) {
  std::string out("RR\x05\x01", 4);
  out.push_back(static_cast<char>(flags));
  return out;
}
constexpr std::uint8_t kRrHasPx = 0x01, kRrHasNm = 0x08;

std::string rrip_px(std::uint32_t mode, std::uint32_t links) {
  std::string out("PX\x24\x01", 4);
  append_both32(out, mode);
  append_both32(out, links);
  append_both32(out, 0);  // uid
  append_both32(out, 0);  // gid
  return out;
}

std::string rrip_nm(const std::string& name) {
  std::string out("NM", 2);
  out.push_back(static_cast<char>(5 + name.size()));
  out.push_back('\x01');
  out.push_back('\0');  // flags: a complete name
  return out + name;
}

std::string susp_ce(std::uint32_t sector, std::uint32_t length) {
  std::string out("CE\x1c\x01", 4);
  append_both32(out, sector);
  append_both32(out, 0);  // offset inside the sector
  append_both32(out, length);
  return out;
}

std::string susp_er() {
  std::string out("ER", 2);
  out.push_back(static_cast<char>(8 + kRripId.size() + kRripDescriptor.size() + kRripSource.size()));
  out.push_back('\x01');
  out.push_back(static_cast<char>(kRripId.size()));
  out.push_back(static_cast<char>(kRripDescriptor.size()));
  out.push_back(static_cast<char>(kRripSource.size()));
  out.push_back('\x01');  // extension version
  out.append(kRripId);
  out.append(kRripDescriptor);
  out.append(kRripSource);
  return out;
}

// ECMA-119 9.1. The caller checks the length against kMaxDirectoryRecord.
std::string directory_record(std::uint32_t extent, std::uint32_t size, std::uint8_t flags,
                             const std::string& identifier, const std::string& system_use) {
  std::string out;
  out.push_back('\0');  // length, filled in below
  out.push_back('\0');  // extended attribute record length
  append_both32(out, extent);
  append_both32(out, size);
  out += recording_time();
  out.push_back(static_cast<char>(flags));
  out.push_back('\0');  // file unit size
  out.push_back('\0');  // interleave gap
  append_both16(out, 1);  // volume sequence number
  out.push_back(static_cast<char>(identifier.size()));
  out += identifier;
  if (identifier.size() % 2 == 0) out.push_back('\0');  // keeps system use at an even offset
  out += system_use;
  if (out.size() % 2 != 0) out.push_back('\0');
  out[0] = static_cast<char>(out.size());
  return out;
}

// Records packed into whole sectors; a record never crosses a sector boundary.
std::string pack_directory(const std::vector<std::string>& records) {
  std::string out;
  for (const auto& record : records) {
    std::size_t used = out.size() % kSectorSize;
    if (used + record.size() > kSectorSize) out.append(kSectorSize - used, '\0');
    out += record;
  }
  if (out.size() % kSectorSize != 0) out.append(kSectorSize - out.size() % kSectorSize, '\0');
  return out;
}

struct Tree {
  std::uint32_t extent = 0;
  std::uint32_t size = 0;  // bytes, a multiple of the sector size
};

std::vector<std::string> primary_records(const Tree& self, std::uint32_t continuation_sector,
                                         const std::vector<PlannedFile>& sorted_files) {
  std::string continuation = susp_er();
  std::vector<std::string> records;
  records.push_back(directory_record(
      self.extent, self.size, kFlagDirectory, std::string(1, '\0'),
      susp_sp() + rrip_rr(kRrHasPx) + rrip_px(kModeDirectory, 2) +
          susp_ce(continuation_sector, static_cast<std::uint32_t>(continuation.size()))));
  records.push_back(directory_record(self.extent, self.size, kFlagDirectory, std::string(1, '\1'),
                                     rrip_rr(kRrHasPx) + rrip_px(kModeDirectory, 2)));
  for (const auto& file : sorted_files) {
    records.push_back(directory_record(
        file.extent, static_cast<std::uint32_t>(file.source->size()), 0,
        file.primary_identifier(),
        rrip_rr(kRrHasPx | kRrHasNm) + rrip_px(kModeFile, 1) + rrip_nm(file.source->name)));
  }
  return records;
}

std::vector<std::string> joliet_records(const Tree& self, const std::vector<PlannedFile>& sorted_files) {
  std::vector<std::string> records;
  records.push_back(directory_record(self.extent, self.size, kFlagDirectory, std::string(1, '\0'), ""));
  records.push_back(directory_record(self.extent, self.size, kFlagDirectory, std::string(1, '\1'), ""));
  for (const auto& file : sorted_files) {
    records.push_back(directory_record(file.extent,
                                       static_cast<std::uint32_t>(file.source->size()), 0,
                                       ucs2_bytes(file.joliet_name), ""));
  }
  return records;
}

// A path table holding the root directory only (ECMA-119 9.4).
std::string path_table(std::uint32_t root_extent, bool big_endian) {
  std::string out;
  out.push_back('\x01');  // length of directory identifier
  out.push_back('\0');    // extended attribute record length
  if (big_endian) append_be32(out, root_extent); else append_le32(out, root_extent);
  if (big_endian) append_be16(out, 1); else append_le16(out, 1);  // parent: itself
  out.push_back('\0');  // identifier of the root
  out.push_back('\0');  // padding to an even length
  return out;
}

struct VolumeDescriptorFields {
  std::uint32_t total_sectors = 0;
  std::uint32_t path_table_size = 0;
  std::uint32_t l_path_table = 0;
  std::uint32_t m_path_table = 0;
  Tree root;
};

std::string volume_descriptor(bool joliet, const std::string& label, const VolumeDescriptorFields& fields) {
  std::string block(kSectorSize, '\0');
  block[0] = joliet ? 2 : 1;
  put_at(block, 1, "CD001");
  block[6] = 1;
  auto put_text = [&](std::size_t offset, std::size_t width, const std::string& text) {
    if (joliet) put_padded_ucs2(block, offset, width, std::u16string(text.begin(), text.end()));
    else put_padded(block, offset, width, text);
  };
  put_text(8, 32, "");      // system identifier
  put_text(40, 32, label);  // volume identifier
  std::string number;
  append_both32(number, fields.total_sectors);
  put_at(block, 80, number);
  if (joliet) put_at(block, 88, "%/E");  // escape sequence: UCS-2 level 3
  number.clear();
  append_both16(number, 1);  // volume set size
  append_both16(number, 1);  // volume sequence number
  append_both16(number, static_cast<std::uint16_t>(kSectorSize));
  append_both32(number, fields.path_table_size);
  append_le32(number, fields.l_path_table);
  append_le32(number, 0);  // optional L path table
  append_be32(number, fields.m_path_table);
  append_be32(number, 0);  // optional M path table
  put_at(block, 120, number);
  put_at(block, 156, directory_record(fields.root.extent, fields.root.size, kFlagDirectory,
                                      std::string(1, '\0'), ""));
  put_text(190, 128, "");  // volume set
  put_text(318, 128, "");  // publisher
  put_text(446, 128, "");  // data preparer
  put_text(574, 128, "");  // application
  put_text(702, 37, "");   // copyright file
  put_text(739, 37, "");   // abstract file
  put_text(776, 37, "");   // bibliographic file
  put_at(block, 813, volume_time(false));  // creation
  put_at(block, 830, volume_time(false));  // modification
  put_at(block, 847, volume_time(true));   // expiration
  put_at(block, 864, volume_time(true));   // effective
  block[881] = 1;  // file structure version
  return block;
}

std::string size_changed(const IsoFile& file, std::uint64_t now) {
  return "source " + file.source.string() + " of ISO file " + printable(file.name) + " changed size while the image was written (" +
         std::to_string(file.source_size) + " bytes when measured, " + (now > file.source_size ? "more" : std::to_string(now)) + " now)";
}

std::uint32_t sectors_for(std::uint64_t bytes) {
  return static_cast<std::uint32_t>((bytes + kSectorSize - 1) / kSectorSize);
}

}  // namespace

namespace {

// A directory record holds at most 255 bytes, Rock Ridge name included.
Result<void> check_record_lengths(const std::vector<PlannedFile>& primary_order) {
  for (const auto& file : primary_order) {
    auto record = primary_records(Tree{}, 0, {file}).back();
    if (record.size() > kMaxDirectoryRecord)
      return fail("ISO file name " + printable(file.source->name) + " is " +
                  std::to_string(file.source->name.size()) +
                  " bytes; its directory record with the Rock Ridge name would exceed " +
                  std::to_string(kMaxDirectoryRecord) + " bytes");
  }
  return {};
}

}  // namespace

namespace {

// Everything but the files' bytes: the image's first sectors up to the first file's
// extent (descriptors, path tables, directories), where each file goes, and the size.
struct Layout {
  std::string head;
  std::vector<std::uint32_t> extents;  // per file, in the caller's order
  std::uint32_t total_sectors = 0;
};

std::size_t sector_offset(std::uint32_t sector) { return static_cast<std::size_t>(sector) * kSectorSize; }

Result<Layout> lay_out(const std::string& volume_label, const std::vector<IsoFile>& files) {
  if (auto ok = check_volume_label(volume_label); !ok) return fail(ok.error().message);

  auto planned_files = plan_files(files);
  if (!planned_files) return fail(planned_files.error().message);
  const std::vector<PlannedFile>& planned = *planned_files;

  // ECMA-119 9.3: records sorted by name then extension (space padded); Joliet by UCS-2.
  std::vector<PlannedFile> primary_order = planned;
  std::sort(primary_order.begin(), primary_order.end(), [](const PlannedFile& a, const PlannedFile& b) {
    auto pad = [](std::string s, std::size_t n) { s.resize(n, ' '); return s; };
    return std::pair(pad(a.primary_base, 8), pad(a.primary_ext, 3)) <
           std::pair(pad(b.primary_base, 8), pad(b.primary_ext, 3));
  });
  std::vector<PlannedFile> joliet_order = planned;
  std::sort(joliet_order.begin(), joliet_order.end(),
            [](const PlannedFile& a, const PlannedFile& b) { return a.joliet_name < b.joliet_name; });

  if (auto ok = check_record_lengths(primary_order); !ok) return fail(ok.error().message);
  const std::uint32_t l_path_table = kFirstVolumeDescriptorSector + 3;
  const std::uint32_t m_path_table = l_path_table + 1;
  const std::uint32_t joliet_l_path_table = l_path_table + 2;
  const std::uint32_t joliet_m_path_table = l_path_table + 3;
  const std::uint32_t continuation_sector = l_path_table + 4;
  // Record lengths do not depend on extents, so a first packing sizes the directories.
  Tree primary_root{continuation_sector + 1, 0};
  primary_root.size = static_cast<std::uint32_t>(pack_directory(primary_records(primary_root, 0, primary_order)).size());
  Tree joliet_root{primary_root.extent + primary_root.size / static_cast<std::uint32_t>(kSectorSize), 0};
  joliet_root.size = static_cast<std::uint32_t>(pack_directory(joliet_records(joliet_root, joliet_order)).size());

  std::uint64_t next_sector = joliet_root.extent + joliet_root.size / kSectorSize;
  std::vector<std::uint32_t> extents(planned.size());
  for (std::size_t i = 0; i < planned.size(); ++i) {
    // An empty file owns no sectors; like mkisofs, it points at the next free one
    // (always inside the image thanks to the padding).
    extents[i] = static_cast<std::uint32_t>(next_sector);
    next_sector += sectors_for(files[i].size());
    if (next_sector > std::numeric_limits<std::uint32_t>::max() - kPaddingSectors)
      return fail("ISO image would exceed 2^32 sectors");
  }
  auto extent_of = [&](const PlannedFile& file) {
    return extents[static_cast<std::size_t>(file.source - files.data())];
  };
  for (auto& file : primary_order) file.extent = extent_of(file);
  for (auto& file : joliet_order) file.extent = extent_of(file);
  const auto total_sectors = static_cast<std::uint32_t>(next_sector + kPaddingSectors);

  std::string image(sector_offset(static_cast<std::uint32_t>(joliet_root.extent + joliet_root.size / kSectorSize)),
                    '\0');

  const auto path_table_size = static_cast<std::uint32_t>(path_table(0, false).size());
  VolumeDescriptorFields primary_fields{total_sectors, path_table_size, l_path_table, m_path_table, primary_root};
  VolumeDescriptorFields joliet_fields{total_sectors, path_table_size, joliet_l_path_table, joliet_m_path_table,
                                       joliet_root};
  put_at(image, sector_offset(kFirstVolumeDescriptorSector), volume_descriptor(false, volume_label, primary_fields));
  put_at(image, sector_offset(kFirstVolumeDescriptorSector + 1), volume_descriptor(true, volume_label, joliet_fields));
  std::string terminator(kSectorSize, '\0');
  terminator[0] = static_cast<char>(255);
  put_at(terminator, 1, "CD001");
  terminator[6] = 1;
  put_at(image, sector_offset(kFirstVolumeDescriptorSector + 2), terminator);

  put_at(image, sector_offset(l_path_table), path_table(primary_root.extent, false));
  put_at(image, sector_offset(m_path_table), path_table(primary_root.extent, true));
  put_at(image, sector_offset(joliet_l_path_table), path_table(joliet_root.extent, false));
  put_at(image, sector_offset(joliet_m_path_table), path_table(joliet_root.extent, true));
  put_at(image, sector_offset(continuation_sector), susp_er());
  put_at(image, sector_offset(primary_root.extent),
         pack_directory(primary_records(primary_root, continuation_sector, primary_order)));
  put_at(image, sector_offset(joliet_root.extent), pack_directory(joliet_records(joliet_root, joliet_order)));
  return Layout{std::move(image), std::move(extents), total_sectors};
}

}  // namespace

Result<std::string> build_iso9660(const std::string& volume_label, const std::vector<IsoFile>& files) {
  auto layout = lay_out(volume_label, files);
  if (!layout) return fail(layout.error().message);
  std::string image = std::move(layout->head);
  image.resize(sector_offset(layout->total_sectors), '\0');
  for (std::size_t i = 0; i < files.size(); ++i) {
    std::string bytes = files[i].content;
    if (!files[i].source.empty()) {
      std::ifstream in(files[i].source, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (!in.eof() && in.fail()) return fail("cannot read " + files[i].source.string() + " for ISO file " + printable(files[i].name));
      if (bytes.size() != files[i].source_size)
        return fail(size_changed(files[i], bytes.size()));
    }
    if (!bytes.empty()) put_at(image, sector_offset(layout->extents[i]), bytes);
  }
  return image;
}

namespace {

Result<void> write_all_at(int fd, const char* data, std::size_t size, off_t offset, const std::string& what) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, data, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(errno_message("writing " + what, errno));
    data += n;
    size -= static_cast<std::size_t>(n);
    offset += n;
  }
  return {};
}

// Copies `file`'s source into `fd` at `offset`: copy_file_range (no copy through
// this process where the file systems allow), else pread/pwrite in 1 MiB pieces.
Result<void> copy_source(int fd, const IsoFile& file, off_t offset, const std::string& what) {
  int in = ::open(file.source.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0)
    return fail(errno_message("cannot open " + file.source.string() + " for ISO file " + printable(file.name), errno));
  std::uint64_t left = file.source_size;
  off_t in_offset = 0;
  bool plain_copy = false;
  std::string buffer;
  Result<void> result;
  while (result && left > 0) {
    const auto chunk = static_cast<std::size_t>(std::min<std::uint64_t>(left, 1u << 20));
    ssize_t n;
    if (!plain_copy) {
      n = ::copy_file_range(in, &in_offset, fd, &offset, chunk, 0);
      if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
        plain_copy = true;
        continue;
      }
    } else {
      buffer.resize(chunk);
      n = ::pread(in, buffer.data(), chunk, in_offset);
      if (n > 0) {
        result = write_all_at(fd, buffer.data(), static_cast<std::size_t>(n), offset, what);
        in_offset += n;
        offset += n;
      }
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      result = fail(errno_message("copying " + file.source.string() + " into " + what, errno));
    else if (n == 0)
      result = fail(size_changed(file, file.source_size - left));
    else
      left -= static_cast<std::uint64_t>(n);
  }
  // A source that grew since it was measured would be cut short in the image.
  char extra;
  if (result && ::pread(in, &extra, 1, in_offset) > 0) result = fail(size_changed(file, file.source_size + 1));
  ::close(in);
  return result;
}

Result<void> write_image(int fd, const Layout& layout, const std::vector<IsoFile>& files, const std::string& what) {
  if (auto ok = write_all_at(fd, layout.head.data(), layout.head.size(), 0, what); !ok) return ok;
  for (std::size_t i = 0; i < files.size(); ++i) {
    const auto offset = static_cast<off_t>(sector_offset(layout.extents[i]));
    auto ok = files[i].source.empty()
                  ? write_all_at(fd, files[i].content.data(), files[i].content.size(), offset, what)
                  : copy_source(fd, files[i], offset, what);
    if (!ok) return ok;
  }
  // The tail of the last sector and the padding: zeros, as a hole.
  if (::ftruncate(fd, static_cast<off_t>(sector_offset(layout.total_sectors))) != 0)
    return fail(errno_message("sizing " + what, errno));
  return {};
}

}  // namespace

Result<void> write_iso9660(const std::filesystem::path& path, const std::string& volume_label,
                           const std::vector<IsoFile>& files) {
  auto layout = lay_out(volume_label, files);
  if (!layout) return fail(layout.error().message);
  const std::string what = "ISO image " + path.string();
  int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) return fail(errno_message("creating " + what, errno));
  auto written = write_image(fd, *layout, files, what);
  if (::close(fd) != 0 && written) written = fail(errno_message("closing " + what, errno));
  if (!written) ::unlink(path.c_str());
  return written;
}

}  // namespace solstice
