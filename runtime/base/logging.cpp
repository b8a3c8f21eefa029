#include "runtime/base/logging.hpp"

#include <cstdio>
#include <ctime>
#include <mutex>

#include <nlohmann/json.hpp>
#include <spdlog/sinks/base_sink.h>

namespace solstice {

namespace logging_detail {
thread_local const std::string* current_job_id = nullptr;
}  // namespace logging_detail

namespace {

// RFC 3339 in UTC with milliseconds.
std::string utc_time(spdlog::log_clock::time_point when) {
  const auto since_epoch = when.time_since_epoch();
  const std::time_t seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch).count();
  const auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(since_epoch).count() % 1000;
  std::tm utc{};
  ::gmtime_r(&seconds, &utc);
  char text[40];
  std::snprintf(text, sizeof text, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", utc.tm_year + 1900,
                utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, int(millis));
  return text;
}

// Writes each line whole to stderr; the base sink's mutex keeps threads' lines apart.
class StderrSink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit StderrSink(bool json) : json_(json) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string message(msg.payload.data(), msg.payload.size());
    const std::string* job_id = logging_detail::current_job_id;
    std::string line;
    if (json_) {
      nlohmann::json object{{"time", utc_time(msg.time)},
                            {"level", std::string(spdlog::level::to_string_view(msg.level).data())},
                            {"message", message}};
      if (job_id && !job_id->empty())
        object["job_id"] = *job_id;
      line = object.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    } else {
      line = "solstice-runner: ";
      if (msg.level != spdlog::level::info)
        line += std::string(msg.level == spdlog::level::warn
                              ? "warning"
                              : spdlog::level::to_string_view(msg.level).data()) + ": ";
      // The id once: a message that names its job already keeps its words.
      if (job_id && !job_id->empty() && message.find(*job_id) == std::string::npos)
        line += "job " + *job_id + ": ";
      line += message;
    }
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stderr);
    std::fflush(stderr);
  }
  void flush_() override { std::fflush(stderr); }

 private:
  bool json_;
};

}  // namespace

Result<void> configure_logging(const std::string& level, const std::string& format) {
  if (format != "text" && format != "json")
    return fail("--log-format \"" + format + "\": must be text or json");
  const auto parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off")
    return fail("--log-level \"" + level + "\": must be trace, debug, info, warn, error or off");
  auto logger = std::make_shared<spdlog::logger>("solstice-runner",
                                                 std::make_shared<StderrSink>(format == "json"));
  logger->set_level(parsed);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
  return {};
}

}  // namespace solstice
