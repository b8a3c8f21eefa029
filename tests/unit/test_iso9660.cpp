// The ISO writer checked with real readers: isoinfo (genisoimage), xorriso
// (libisofs), isovfy and blkid (libblkid, what cloud-init uses to find the seed).
#include <doctest/doctest.h>

#include <cstdint>
#include <fstream>
#include <random>
#include <set>

#include "runtime/vm/iso9660.hpp"
#include "tests/unit/seed_test_support.hpp"

namespace solstice {
namespace {

using seed_test::read_file;
using seed_test::run_command;
using seed_test::shell_quote;
using seed_test::TempDir;

std::string pseudo_random_bytes(std::size_t size, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::string out(size, '\0');
  for (auto& c : out) c = static_cast<char>(generator() & 0xff);
  return out;
}

std::filesystem::path write_image(const TempDir& dir, const std::string& label,
                                  const std::vector<IsoFile>& files, const std::string& name = "test.iso") {
  auto path = dir / name;
  auto written = write_iso9660(path, label, files);
  REQUIRE_MESSAGE(written, (written ? "" : written.error().message));
  return path;
}

// Extracts the whole image with xorriso (which reads the Rock Ridge tree).
std::filesystem::path extract_with_xorriso(const TempDir& dir, const std::filesystem::path& image) {
  auto out = dir / "extracted";
  auto result = run_command("xorriso -osirrox on -indev " + shell_quote(image.string()) + " -extract / " +
                            shell_quote(out.string()));
  REQUIRE_MESSAGE(result.exit_code == 0, result.output);
  return out;
}

// isoinfo extraction of one file through the chosen tree ("-R", "-J" or "" for 8.3).
std::string extract_with_isoinfo(const std::filesystem::path& image, const std::string& tree_flag,
                                 const std::string& iso_path) {
  auto result = run_command("isoinfo " + tree_flag + " -i " + shell_quote(image.string()) + " -x " +
                                shell_quote(iso_path),
                            /*merge_stderr=*/false);
  REQUIRE(result.exit_code == 0);
  return result.output;
}

std::uint32_t le32_at(const std::string& bytes, std::size_t at) {
  return static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at])) |
         static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at + 1])) << 8 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at + 2])) << 16 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at + 3])) << 24;
}
std::uint32_t be32_at(const std::string& bytes, std::size_t at) {
  return static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at])) << 24 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at + 1])) << 16 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at + 2])) << 8 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[at + 3]));
}

}  // namespace

TEST_CASE("iso9660: seed-shaped image carries the label, Rock Ridge and Joliet") {
  TempDir dir;
  auto image = write_image(dir, "cidata",
                           {{"meta-data", "instance-id: a\n"}, {"user-data", "#cloud-config\n"},
                            {"network-config", "version: 2\n"}});

  auto info = run_command("isoinfo -d -i " + shell_quote(image.string()));
  REQUIRE(info.exit_code == 0);
  CHECK(info.output.find("Volume id: cidata\n") != std::string::npos);
  CHECK(info.output.find("Joliet with UCS level 3 found") != std::string::npos);
  CHECK(info.output.find("Rock Ridge signatures version 1 found") != std::string::npos);

  // blkid prefers the Joliet label when there is one: both must read "cidata".
  auto label = run_command("blkid -p -o value -s LABEL " + shell_quote(image.string()));
  CHECK(label.output == "cidata\n");
  auto type = run_command("blkid -p -o value -s TYPE " + shell_quote(image.string()));
  CHECK(type.output == "iso9660\n");

  auto verify = run_command("isovfy " + shell_quote(image.string()));
  CHECK_MESSAGE(verify.output.find("No errors found") != std::string::npos, verify.output);

  for (const char* tree : {"-R", "-J"}) {
    auto listing = run_command(std::string("isoinfo ") + tree + " -l -i " + shell_quote(image.string()));
    REQUIRE(listing.exit_code == 0);
    INFO(tree, listing.output);
    for (const char* name : {" meta-data \n", " user-data \n", " network-config \n"})
      CHECK(listing.output.find(name) != std::string::npos);
  }
  // The primary tree holds 8.3 names only.
  auto plain = run_command("isoinfo -l -i " + shell_quote(image.string()));
  CHECK(plain.output.find("USER_DAT.;1") != std::string::npos);
  CHECK(plain.output.find("user-data") == std::string::npos);
  // Rock Ridge gives read-only regular files.
  auto rock = run_command("isoinfo -R -l -i " + shell_quote(image.string()));
  CHECK(rock.output.find("-r--r--r--") != std::string::npos);

  CHECK(extract_with_isoinfo(image, "-J", "/user-data") == "#cloud-config\n");
  CHECK(extract_with_isoinfo(image, "-R", "/meta-data") == "instance-id: a\n");
  CHECK(extract_with_isoinfo(image, "", "/NETWORK_.;1") == "version: 2\n");
}

TEST_CASE("iso9660: file contents survive a round trip at sector boundaries") {
  TempDir dir;
  std::vector<IsoFile> files = {
      {"empty", ""},
      {"size-2047.bin", pseudo_random_bytes(2047, 1)},
      {"size-2048.bin", pseudo_random_bytes(2048, 2)},
      {"size-2049.bin", pseudo_random_bytes(2049, 3)},
      {"size-4096.bin", pseudo_random_bytes(4096, 4)},
      {"one.mebibyte.data", pseudo_random_bytes(1 << 20, 5)},
      {"dots.and-dashes.tar.gz", pseudo_random_bytes(100, 6)},
      {".hidden", "dot file\n"},
  };
  auto image = write_image(dir, "TESTDATA", files);
  auto out = extract_with_xorriso(dir, image);
  std::size_t extracted = 0;
  for (const auto& entry : std::filesystem::directory_iterator(out)) {
    (void)entry;
    ++extracted;
  }
  CHECK(extracted == files.size());
  for (const auto& file : files) {
    INFO(file.name);
    CHECK(std::filesystem::is_regular_file(out / file.name));
    CHECK(read_file(out / file.name) == file.content);
    // The Joliet tree points at the same bytes.
    CHECK(extract_with_isoinfo(image, "-J", "/" + file.name) == file.content);
  }
}

TEST_CASE("iso9660: a hundred files span several directory sectors") {
  TempDir dir;
  std::vector<IsoFile> files;
  // Long, similar names: their 8.3 forms collide and must be made unique.
  for (int i = 0; i < 100; ++i) {
    files.push_back({"generated-file-number-" + std::to_string(i) + ".txt", "content of file " + std::to_string(i) + "\n"});
  }
  auto image = write_image(dir, "MANY", files);

  auto verify = run_command("isovfy " + shell_quote(image.string()));
  CHECK_MESSAGE(verify.output.find("No errors found") != std::string::npos, verify.output);

  auto root = run_command("isoinfo -l -i " + shell_quote(image.string()));
  std::set<std::string> short_names;
  std::istringstream lines(root.output);
  for (std::string line; std::getline(lines, line);) {
    auto pos = line.find(";1");
    if (pos == std::string::npos) continue;
    std::size_t start = line.rfind(' ', pos) + 1;
    short_names.insert(line.substr(start, pos + 2 - start));
  }
  CHECK(short_names.size() == files.size());
  // A directory larger than one sector (the listing shows the root's size).
  CHECK(root.output.find("            2048 ") == std::string::npos);

  auto out = extract_with_xorriso(dir, image);
  for (const auto& file : files) {
    INFO(file.name);
    CHECK(read_file(out / file.name) == file.content);
  }
  auto joliet = run_command("isoinfo -J -l -i " + shell_quote(image.string()));
  for (const auto& file : files) CHECK(joliet.output.find(" " + file.name + " \n") != std::string::npos);
}

TEST_CASE("iso9660: path tables point at the root directory of their tree") {
  TempDir dir;
  auto image_path = write_image(dir, "cidata", {{"user-data", "x"}});
  std::string image = read_file(image_path);
  constexpr std::size_t kSector = 2048;
  for (std::size_t descriptor : {16u, 17u}) {
    INFO("volume descriptor in sector ", descriptor);
    std::size_t base = descriptor * kSector;
    std::uint32_t root_extent = le32_at(image, base + 156 + 2);
    CHECK(be32_at(image, base + 156 + 6) == root_extent);
    std::uint32_t table_size = le32_at(image, base + 132);
    CHECK(table_size == 10);  // a single root entry
    std::size_t l_table = static_cast<std::size_t>(le32_at(image, base + 140)) * kSector;
    std::size_t m_table = static_cast<std::size_t>(be32_at(image, base + 148)) * kSector;
    CHECK(image[l_table] == 1);  // identifier length of the root
    CHECK(le32_at(image, l_table + 2) == root_extent);
    CHECK(image[l_table + 6] == 1);  // parent: itself (LE 16-bit)
    CHECK(image[m_table] == 1);
    CHECK(be32_at(image, m_table + 2) == root_extent);
    CHECK(image[m_table + 7] == 1);  // parent: itself (BE 16-bit)
  }
  // isoinfo reads the L tables: the root extent it prints (hex) matches its listing.
  auto paths = run_command("isoinfo -p -i " + shell_quote(image_path.string()));
  std::uint32_t primary_root = le32_at(image, 16 * kSector + 158);
  char hex[16];
  std::snprintf(hex, sizeof hex, "%x", primary_root);
  CHECK(paths.output.find("   1:    1 " + std::string(hex) + " \n") != std::string::npos);
  // Volume space size covers the whole file.
  CHECK(static_cast<std::size_t>(le32_at(image, 16 * kSector + 80)) * kSector == image.size());
}

TEST_CASE("iso9660: the same input gives the same bytes") {
  std::vector<IsoFile> files = {{"user-data", "#cloud-config\n"}, {"meta-data", pseudo_random_bytes(5000, 9)}};
  auto first = build_iso9660("cidata", files);
  auto second = build_iso9660("cidata", files);
  REQUIRE(first);
  REQUIRE(second);
  CHECK(*first == *second);
  CHECK(first->size() % 2048 == 0);
  auto other = build_iso9660("cidata", {{"user-data", "#cloud-config\n"}, {"meta-data", "x"}});
  REQUIRE(other);
  CHECK(*other != *first);
}

TEST_CASE("iso9660: bad labels and names fail with the offending value named") {
  auto message_for = [](const std::string& label, const std::vector<IsoFile>& files) {
    auto image = build_iso9660(label, files);
    REQUIRE_FALSE(image);
    return image.error().message;
  };
  CHECK(message_for("", {}).find("volume label is empty") != std::string::npos);
  CHECK(message_for("seventeen_chars_x", {}).find("\"seventeen_chars_x\"") != std::string::npos);
  CHECK(message_for("ci-data", {}).find("\"ci-data\"") != std::string::npos);
  CHECK(message_for("ci data", {}).find("\"ci data\"") != std::string::npos);

  CHECK(message_for("cidata", {{"", "x"}}).find("file name is empty") != std::string::npos);
  CHECK(message_for("cidata", {{"dir/user-data", "x"}}).find("\"dir/user-data\" contains '/'") !=
        std::string::npos);
  CHECK(message_for("cidata", {{std::string("nul\0byte", 8), "x"}}).find("\"nul\\x00byte\" contains a NUL") !=
        std::string::npos);
  CHECK(message_for("cidata", {{"what?", "x"}}).find("\"what?\"") != std::string::npos);
  CHECK(message_for("cidata", {{"..", "x"}}).find("\"..\" is reserved") != std::string::npos);
  std::string name_65(65, 'n');
  CHECK(message_for("cidata", {{name_65, "x"}}).find("\"" + name_65 + "\" is 65 characters") !=
        std::string::npos);
  CHECK(message_for("cidata", {{"user-data", "a"}, {"user-data", "b"}}).find("\"user-data\" appears twice") !=
        std::string::npos);
  CHECK(message_for("cidata", {{"bad\xff", "x"}}).find("\"bad\\xff\": not valid UTF-8") != std::string::npos);
  // 64 two-byte characters fit Joliet (64 UCS-2 units); 64 three-byte ones are too long
  // for a single Rock Ridge name in one directory record.
  std::string greek, cjk;
  for (int i = 0; i < 64; ++i) greek += "\xce\xb1";
  for (int i = 0; i < 64; ++i) cjk += "\xe6\xbc\xa2";
  CHECK(build_iso9660("cidata", {{greek, "x"}}));
  CHECK(message_for("cidata", {{cjk, "x"}}).find("directory record") != std::string::npos);
  // 64 characters exactly is allowed.
  CHECK(build_iso9660("cidata", {{std::string(64, 'n'), "x"}}));
}

TEST_CASE("iso9660: write_iso9660 creates a private file and never overwrites") {
  TempDir dir;
  auto path = write_image(dir, "cidata", {{"user-data", "x"}});
  CHECK(seed_test::file_mode(path) == 0600);
  auto again = write_iso9660(path, "cidata", {{"user-data", "y"}});
  REQUIRE_FALSE(again);
  CHECK(again.error().message.find(path.string()) != std::string::npos);
  CHECK(extract_with_isoinfo(path, "-J", "/user-data") == "x");
  auto bad = write_iso9660(dir / "bad.iso", "", {});
  CHECK_FALSE(bad);
  CHECK_FALSE(std::filesystem::exists(dir / "bad.iso"));
}

}  // namespace solstice

namespace solstice {

namespace {

IsoFile from_source(const std::string& name, const std::filesystem::path& source) {
  IsoFile file;
  file.name = name;
  file.source = source;
  file.source_size = std::filesystem::file_size(source);
  return file;
}

void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

}  // namespace

TEST_CASE("iso9660: files copied from their sources give the same bytes as files in memory") {
  TempDir dir;
  // Sizes around sector boundaries, an empty file, and one of several MiB (the
  // copy goes in 1 MiB pieces).
  std::vector<IsoFile> in_memory, streamed;
  const std::size_t sizes[] = {0, 1, 2047, 2048, 2049, 5 * 1024 * 1024 + 3};
  for (std::size_t i = 0; i < std::size(sizes); ++i) {
    auto bytes = pseudo_random_bytes(sizes[i], static_cast<std::uint32_t>(i + 7));
    auto source = dir / ("source-" + std::to_string(i));
    write_bytes(source, bytes);
    in_memory.emplace_back("u" + std::to_string(i), bytes);
    streamed.push_back(from_source("u" + std::to_string(i), source));
  }
  auto memory_image = build_iso9660("SOLSTICEUPLOADS", in_memory);
  REQUIRE(memory_image);
  auto path = write_image(dir, "SOLSTICEUPLOADS", streamed);
  CHECK(read_file(path) == *memory_image);
  // Read back through Rock Ridge by a real reader.
  CHECK(extract_with_isoinfo(path, "-R", "/u5") == in_memory[5].content);
  // build_iso9660 reads sources too, to the same bytes.
  auto built = build_iso9660("SOLSTICEUPLOADS", streamed);
  REQUIRE(built);
  CHECK(*built == *memory_image);
}

TEST_CASE("iso9660: a source whose size changed or that is gone fails, naming it, and leaves no image") {
  TempDir dir;
  auto source = dir / "payload.bin";
  write_bytes(source, std::string(10000, 'a'));
  auto file = from_source("u0", source);

  write_bytes(source, std::string(9000, 'a'));  // shrank after it was measured
  auto shrunk = write_iso9660(dir / "shrunk.iso", "SOLSTICEUPLOADS", {file});
  REQUIRE_FALSE(shrunk);
  CHECK(shrunk.error().message.find(source.string()) != std::string::npos);
  CHECK(shrunk.error().message.find("changed size") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir / "shrunk.iso"));

  write_bytes(source, std::string(11000, 'a'));  // grew
  auto grown = write_iso9660(dir / "grown.iso", "SOLSTICEUPLOADS", {file});
  REQUIRE_FALSE(grown);
  CHECK(grown.error().message.find("changed size") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir / "grown.iso"));

  std::filesystem::remove(source);
  auto gone = write_iso9660(dir / "gone.iso", "SOLSTICEUPLOADS", {file});
  REQUIRE_FALSE(gone);
  CHECK(gone.error().message.find(source.string()) != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir / "gone.iso"));
}

}  // namespace solstice
