#include "runtime/base/proc_stat.hpp"

#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace solstice {

namespace {

// Fields 3 (state) onwards of /proc/PID/stat, or nothing if there is no such process.
// Field 2 (comm) is in parentheses and may itself contain spaces and ')': the
// fields that follow start after the *last* ')'.
std::optional<std::vector<std::string>> stat_fields(pid_t pid) {
  if (pid <= 0) return std::nullopt;
  std::ifstream stat_file("/proc/" + std::to_string(pid) + "/stat");
  if (!stat_file) return std::nullopt;
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  size_t comm_end = stat.rfind(')');
  if (comm_end == std::string::npos) return std::nullopt;
  std::istringstream in(stat.substr(comm_end + 1));
  std::vector<std::string> fields;
  for (std::string field; in >> field;) fields.push_back(field);
  return fields;
}

// Field `number` (as proc(5) counts them, from 3 on) as a number.
std::optional<unsigned long long> stat_number(const std::vector<std::string>& fields, size_t number) {
  if (number < 3 || number - 3 >= fields.size()) return std::nullopt;
  const auto& field = fields[number - 3];
  try {
    size_t used = 0;
    unsigned long long value = std::stoull(field, &used);
    if (used != field.size()) return std::nullopt;
    return value;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

}  // namespace

bool process_running(pid_t pid) {
  auto fields = stat_fields(pid);
  return fields && !fields->empty() && (*fields)[0] != "Z" && (*fields)[0] != "X";
}

std::optional<unsigned long long> process_start_time(pid_t pid) {
  auto fields = stat_fields(pid);
  return fields ? stat_number(*fields, 22) : std::nullopt;
}

std::optional<std::chrono::milliseconds> process_cpu_time(pid_t pid) {
  auto fields = stat_fields(pid);
  if (!fields) return std::nullopt;
  auto user = stat_number(*fields, 14), system = stat_number(*fields, 15);
  static const long ticks_per_second = ::sysconf(_SC_CLK_TCK);
  if (!user || !system || ticks_per_second <= 0) return std::nullopt;
  return std::chrono::milliseconds((*user + *system) * 1000 / static_cast<unsigned long long>(ticks_per_second));
}

}  // namespace solstice
