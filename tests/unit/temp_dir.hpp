#pragma once
// A temporary directory for a unit test: made with mkdtemp, removed with
// everything in it when the test ends.
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <doctest/doctest.h>

namespace solstice::test {

struct TempDir {
  std::filesystem::path path;

  // `prefix` names the directory under the system's temporary directory.
  explicit TempDir(const std::string& prefix = "solstice-test-") {
    std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "XXXXXX")).string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }

  // Writes `content` to `name` (parents made as needed); returns its path.
  std::filesystem::path write(const std::string& name, const std::string& content) const {
    const auto file = path / name;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary) << content;
    return file;
  }
};

}  // namespace solstice::test
