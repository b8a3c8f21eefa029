#include "runtime/vm/iso9660_names.hpp"

#include <algorithm>
#include <limits>
#include <set>

namespace solstice::iso9660_names {
namespace {

constexpr std::size_t kMaxJolietChars = 64;
// The Joliet volume identifier field holds 16 UCS-2 characters; blkid prefers it to
// the primary one, so the label must fit there unchanged.
constexpr std::size_t kMaxLabelChars = 16;

// UTF-8 to UCS-2 (Joliet has no surrogate pairs: only the Basic Multilingual Plane).
Result<std::u16string> utf8_to_ucs2(std::string_view text, const std::string& what) {
  std::u16string out;
  for (std::size_t i = 0; i < text.size();) {
    auto lead = static_cast<unsigned char>(text[i]);
    std::size_t length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xe ? 3 : 0;
    if (length == 0) {
      if ((lead >> 3) == 0x1e)
        return fail(what + ": characters outside the Unicode Basic Multilingual Plane "
                           "cannot be stored as Joliet (UCS-2) names");
      return fail(what + ": not valid UTF-8 (byte " + std::to_string(i) + ")");
    }
    if (i + length > text.size()) return fail(what + ": not valid UTF-8 (truncated sequence)");
    std::uint32_t code = length == 1 ? lead : length == 2 ? (lead & 0x1f) : (lead & 0x0f);
    for (std::size_t k = 1; k < length; ++k) {
      auto next = static_cast<unsigned char>(text[i + k]);
      if ((next >> 6) != 0x2) return fail(what + ": not valid UTF-8 (byte " + std::to_string(i + k) + ")");
      code = (code << 6) | (next & 0x3f);
    }
    bool overlong = (length == 2 && code < 0x80) || (length == 3 && code < 0x800);
    if (overlong || (code >= 0xd800 && code <= 0xdfff))
      return fail(what + ": not valid UTF-8 (byte " + std::to_string(i) + ")");
    out.push_back(static_cast<char16_t>(code));
    i += length;
  }
  return out;
}

Result<std::u16string> check_file_name(const std::string& name) {
  std::string what = "ISO file name " + printable(name);
  if (name.empty()) return fail("ISO file name is empty");
  if (name == "." || name == "..") return fail(what + " is reserved");
  for (char c : name) {
    auto byte = static_cast<unsigned char>(c);
    if (c == '\0') return fail(what + " contains a NUL byte");
    if (c == '/') return fail(what + " contains '/' (the image holds one flat directory)");
    if (byte < 0x20 || byte == 0x7f) return fail(what + " contains a control character");
    if (std::string_view("*:;?\\").find(c) != std::string_view::npos)
      return fail(what + " contains '" + std::string(1, c) +
                  "', which Joliet names may not hold");
  }
  auto ucs2 = utf8_to_ucs2(name, what);
  if (!ucs2) return fail(ucs2.error().message);
  if (ucs2->size() > kMaxJolietChars)
    return fail(what + " is " + std::to_string(ucs2->size()) + " characters; Joliet names hold at most " +
                std::to_string(kMaxJolietChars));
  return *ucs2;
}

char to_d_character(char c) {
  if (c >= 'a' && c <= 'z') return static_cast<char>(c - 'a' + 'A');
  if ((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return c;
  return '_';
}

// Level-1 8.3 names for the primary tree, made unique with a numeric tail
// ("LONG_NA1") when two long names map to the same short one.
void assign_primary_names(std::vector<PlannedFile>& files) {
  std::set<std::string> taken;
  for (auto& file : files) {
    const std::string& name = file.source->name;
    auto dot = name.rfind('.');
    std::string stem = dot == std::string::npos ? name : name.substr(0, dot);
    std::string extension = dot == std::string::npos ? "" : name.substr(dot + 1);
    std::string base, ext;
    for (char c : stem) base.push_back(to_d_character(c));
    for (char c : extension) ext.push_back(to_d_character(c));
    if (base.size() > 8) base.resize(8);
    if (ext.size() > 3) ext.resize(3);
    if (base.empty() && ext.empty()) base = "_";
    std::string candidate = base;
    for (std::uint64_t counter = 1; taken.count(candidate + "." + ext); ++counter) {
      std::string tail = std::to_string(counter);
      candidate = base.substr(0, std::min(base.size(), 8 - tail.size())) + tail;
    }
    file.primary_base = candidate;
    file.primary_ext = ext;
    taken.insert(candidate + "." + ext);
  }
}

}  // namespace

std::string printable(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out + "\"";
}

Result<void> check_volume_label(const std::string& label) {
  if (label.empty()) return fail("ISO volume label is empty");
  if (label.size() > kMaxLabelChars)
    return fail("ISO volume label " + printable(label) + " is " + std::to_string(label.size()) +
                " characters; at most " + std::to_string(kMaxLabelChars) +
                " fit the Joliet volume identifier");
  for (char c : label) {
    bool d_character = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                       (c >= '0' && c <= '9') || c == '_';
    if (!d_character)
      return fail("ISO volume label " + printable(label) +
                  " may hold only letters, digits and '_' (ISO 9660 d-characters)");
  }
  return {};
}

Result<std::vector<PlannedFile>> plan_files(const std::vector<IsoFile>& files) {
  std::vector<PlannedFile> planned;
  std::set<std::string> names;
  for (const auto& file : files) {
    auto joliet_name = check_file_name(file.name);
    if (!joliet_name) return fail(joliet_name.error().message);
    if (!names.insert(file.name).second)
      return fail("ISO file name " + printable(file.name) + " appears twice");
    if (file.size() > std::numeric_limits<std::uint32_t>::max())
      return fail("ISO file " + printable(file.name) + " is " + std::to_string(file.size()) +
                  " bytes; a file extent holds at most 4 GiB - 1");
    planned.push_back(PlannedFile{&file, "", "", *joliet_name, 0});
  }
  assign_primary_names(planned);
  return planned;
}

}  // namespace solstice::iso9660_names
