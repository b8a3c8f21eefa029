// Longer than most files: the output floods (size, lines, binary, streams,
// slow terminal) share one checker of what the terminal and the record got.
// Floods of output: the runner carries every byte — to its own stdout/stderr and
// to the job's events.jsonl — with bounded memory. Each case runs the real
// solstice-runner binary on the real test guest (TCG) with its stdout and stderr
// redirected to files, and samples the runner's peak RSS (VmHWM) while it runs.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <thread>

#include "runtime/job/event_log.hpp"
#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;
using steady = std::chrono::steady_clock;

namespace {

// The bound on the runner's memory, whatever the job prints.
constexpr long rss_limit_kib = 64 * 1024;

// The default size of the big stream. Under TCG the guest's emulated SSH server
// (its cipher and MAC run in emulated instructions) sends only about 1 MiB/s on a
// loaded two-core host, so the 1 GiB would take some 17 minutes: the
// default fits about two minutes, and SOLSTICE_FLOOD_BYTES=1073741824 runs the
// full gigabyte (on KVM it takes seconds).
constexpr uint64_t default_flood_bytes = 128ull << 20;

uint64_t flood_bytes() {
  const char* env = std::getenv("SOLSTICE_FLOOD_BYTES");
  if (env && *env) {
    char* end = nullptr;
    auto value = std::strtoull(env, &end, 10);
    if (end && *end == '\0' && value > 0)
      return value;
    FAIL("SOLSTICE_FLOOD_BYTES must be a positive number of bytes, got '" << env << "'");
  }
  return default_flood_bytes;
}

// ------------------------------------------------------------ SHA-256

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), EVP_MD_CTX_free) {
    REQUIRE(ctx_);
    REQUIRE(EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) == 1);
  }
  void add(std::string_view bytes) {
    EVP_DigestUpdate(ctx_.get(), bytes.data(), bytes.size());
    size_ += bytes.size();
  }
  uint64_t size() const { return size_; }
  // Hex digest; the object is finished afterwards.
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned length = 0;
    EVP_DigestFinal_ex(ctx_.get(), digest, &length);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned i = 0; i < length; ++i) {
      out += digits[digest[i] >> 4];
      out += digits[digest[i] & 15];
    }
    return out;
  }

 private:
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx_;
  uint64_t size_ = 0;
};

// `pattern` repeated and cut at `size` bytes, as `yes PATTERN | head -c SIZE`
// (with `pattern` ending in a newline) or `... | tr -d '\n' | head -c SIZE` prints it.
std::string repeated(const std::string& pattern, size_t size) {
  std::string out;
  out.reserve(size);
  while (out.size() < size)
    out.append(pattern, 0, std::min(pattern.size(), size - out.size()));
  return out;
}

// Digest and size of a repeated pattern too large to hold in memory.
std::pair<std::string, uint64_t> repeated_digest(const std::string& pattern, uint64_t size) {
  Sha256 sha;
  // A block of whole patterns, so consecutive blocks continue the pattern.
  auto block = repeated(pattern, pattern.size() * ((1u << 20) / pattern.size()));
  uint64_t left = size;
  while (left > 0) {
    auto n = std::min<uint64_t>(left, block.size());
    sha.add(std::string_view(block.data(), n));
    left -= n;
  }
  return {sha.hex(), sha.size()};
}

// Deterministic bytes covering every byte value (and so plenty of invalid UTF-8):
// 0..255 first, then a fixed-seed linear congruential sequence.
std::string binary_block(size_t size, uint32_t seed) {
  std::string out;
  out.reserve(size);
  for (int b = 0; b < 256 && out.size() < size; ++b)
    out.push_back(static_cast<char>(b));
  uint32_t state = seed;
  while (out.size() < size) {
    state = state * 1664525u + 1013904223u;
    out.push_back(static_cast<char>(state >> 24));
  }
  return out;
}

// A shell word that makes busybox/POSIX printf print exactly `bytes`: every byte
// as an octal escape, so no quote, percent sign or backslash is taken literally.
std::string printf_format(const std::string& bytes) {
  std::string out = "'";
  char buf[8];
  for (unsigned char c : bytes) {
    std::snprintf(buf, sizeof buf, "\\%03o", c);
    out += buf;
  }
  return out + "'";
}

// ------------------------------------------------------------ the runner, to files

struct FloodRun {
  std::optional<solstice::ExitStatus> status;
  long peak_rss_kib = 0;  // the runner's VmHWM, last seen before it exited
  double seconds = 0;
};

long vm_hwm_kib(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0)
      return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

// Runs the runner with stdout and stderr going to files (a pipe this test reads
// would make the test's own reading speed part of the measurement), samples its
// VmHWM every 100 ms, and kills it (by PID) at `timeout`.
//
// With `hold_terminal`, stdout is a pipe instead, standing for a terminal that
// does not keep up: nothing is read from it while hold_terminal() is true, then
// everything is copied to `out_file`.
FloodRun run_to_files(const std::vector<std::string>& args, const fs::path& out_file,
                      const fs::path& err_file, std::chrono::seconds timeout,
                      const std::function<bool()>& hold_terminal = {}) {
  std::vector<std::string> argv_text{runner_binary().string()};
  argv_text.insert(argv_text.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& arg : argv_text)
    argv.push_back(arg.data());
  argv.push_back(nullptr);
  int out_fd = ::open(out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int err_fd = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  REQUIRE(out_fd >= 0);
  REQUIRE(err_fd >= 0);
  int terminal[2] = {-1, -1};
  if (hold_terminal)
    REQUIRE(::pipe2(terminal, O_CLOEXEC | O_NONBLOCK) == 0);
  const int child_out = hold_terminal ? terminal[1] : out_fd;
  pid_t parent = ::getpid();
  auto started = steady::now();
  pid_t pid = ::fork();
  if (pid == 0) {
    // Only async-signal-safe calls between fork and exec.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent)
      ::_exit(127);
    ::dup2(child_out, STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);
    // The runner writes to its terminal with plain blocking writes.
    ::fcntl(STDOUT_FILENO, F_SETFL, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (terminal[1] >= 0)
    ::close(terminal[1]);
  ::close(err_fd);
  REQUIRE(pid > 0);

  // Copies what the pipe holds to out_file.
  auto copy_terminal = [&] {
    char buf[1 << 16];
    ssize_t n;
    while (terminal[0] >= 0 && (n = ::read(terminal[0], buf, sizeof buf)) > 0)
      if (::write(out_fd, buf, static_cast<size_t>(n)) != n)
        FAIL("cannot write " << out_file);
  };
  FloodRun run;
  auto deadline = started + timeout;
  int raw = 0;
  bool exited = false;
  bool holding = static_cast<bool>(hold_terminal);
  while (!exited) {
    exited = ::waitpid(pid, &raw, WNOHANG) == pid;
    if (!exited) {
      if (auto hwm = vm_hwm_kib(pid); hwm > 0)
        run.peak_rss_kib = hwm;
      if (steady::now() >= deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &raw, 0);
        break;
      }
    }
    holding = holding && hold_terminal();
    if (terminal[0] >= 0 && !holding) {
      copy_terminal();
      pollfd fds[1] = {{terminal[0], POLLIN, 0}};
      ::poll(fds, 1, exited ? 0 : 100);
      copy_terminal();
    } else if (!exited) {
      std::this_thread::sleep_for(100ms);
    }
  }
  copy_terminal();
  if (terminal[0] >= 0)
    ::close(terminal[0]);
  ::close(out_fd);
  run.seconds = std::chrono::duration<double>(steady::now() - started).count();
  if (!exited)
    return run;  // status stays empty: it did not end by itself
  solstice::ExitStatus status;
  if (WIFSIGNALED(raw)) {
    status.signaled = true;
    status.signal = WTERMSIG(raw);
  } else {
    status.code = WEXITSTATUS(raw);
  }
  run.status = status;
  return run;
}

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// The start of a file, for failure messages (binary bytes shown as '.').
std::string excerpt(const std::string& text, size_t at = 0, size_t length = 600) {
  auto part = text.substr(std::min(at, text.size()), length);
  for (auto& c : part)
    if ((c < 32 && c != '\n') || c == 127)
      c = '.';
  return part;
}

// Where `a` and `b` first differ ("equal" when they do not), for failure messages.
std::string first_difference(const std::string& a, const std::string& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i])
    ++i;
  if (i == a.size() && i == b.size())
    return "equal";
  return "sizes " + std::to_string(a.size()) + " and " + std::to_string(b.size()) +
         ", first difference at byte " + std::to_string(i);
}

// ------------------------------------------------------------ events.jsonl, reassembled

// One step's stream as the event log carries it.
struct RecordedStream {
  Sha256 sha;
  std::string data;         // kept only up to `keep_limit`
  uint64_t next_sequence = 0;
  std::string sequence_problem;  // the first gap or repeat, if any
};

constexpr size_t keep_limit = 64u << 20;

struct RecordedOutput {
  std::map<std::pair<uint32_t, int>, RecordedStream> streams;  // (step, stream)
  std::vector<std::string> bad_lines;
  std::vector<std::string> job_ids;  // every distinct job_id seen
  std::optional<v1::JobResult> result;

  RecordedStream& stream(uint32_t step, v1::OutputStream which) {
    return streams[{step, static_cast<int>(which)}];
  }
};

// Reads the event log line by line (it may be far larger than memory should
// hold), checking that each step's stream has sequence numbers 0, 1, 2, ...
RecordedOutput reassemble(const fs::path& events_file) {
  RecordedOutput recorded;
  std::ifstream file(events_file, std::ios::binary);
  REQUIRE_MESSAGE(file, "cannot read " << events_file);
  std::string line;
  size_t number = 0;
  while (std::getline(file, line)) {
    ++number;
    if (line.empty())
      continue;
    auto event = solstice::event_from_json_line(line);
    if (!event) {
      if (recorded.bad_lines.size() < 5)
        recorded.bad_lines.push_back("line " + std::to_string(number) + ": " +
                                     event.error().message);
      continue;
    }
    if (std::find(recorded.job_ids.begin(), recorded.job_ids.end(), event->job_id()) ==
        recorded.job_ids.end())
      recorded.job_ids.push_back(event->job_id());
    if (event->has_result())
      recorded.result = event->result();
    if (!event->has_output())
      continue;
    const auto& chunk = event->output();
    auto& stream = recorded.stream(chunk.step_index(), chunk.stream());
    if (chunk.sequence() != stream.next_sequence && stream.sequence_problem.empty())
      stream.sequence_problem = "expected sequence " + std::to_string(stream.next_sequence) +
                                ", got " + std::to_string(chunk.sequence()) + " at line " +
                                std::to_string(number);
    stream.next_sequence = chunk.sequence() + 1;
    stream.sha.add(chunk.data());
    if (stream.data.size() + chunk.data().size() <= keep_limit)
      stream.data += chunk.data();
  }
  return recorded;
}

// ------------------------------------------------------------ the runner's stdout

// In human mode the runner prints, around each step's raw stdout bytes, a line
// "[ time] ==> step I/N: NAME" before and "[ time] <== step 'NAME' ..." after (on
// a line of its own: a newline is added first when the output did not end with
// one). Returns the offset just past the start line, or npos.
size_t step_start(const std::string& text, size_t from, size_t index, size_t count,
                  const std::string& name) {
  auto marker = "] ==> step " + std::to_string(index) + "/" + std::to_string(count) + ": " +
                name + "\n";
  auto at = text.find(marker, from);
  return at == std::string::npos ? at : at + marker.size();
}

bool step_end_follows(const std::string& text, size_t at, const std::string& output,
                      const std::string& name) {
  if (!output.empty() && output.back() != '\n') {
    if (at >= text.size() || text[at] != '\n')
      return false;
    ++at;
  }
  auto line_end = text.find('\n', at);
  auto line = text.substr(at, line_end == std::string::npos ? std::string::npos : line_end - at);
  return !line.empty() && line[0] == '[' &&
         line.find("] <== step '" + name + "'") != std::string::npos;
}

// The runner's stdout file holds, after step `name`'s start line, exactly the
// `size` bytes whose digest is `digest`, then the step's end line. Reads the file
// in pieces: it may be large.
void check_big_step_in_stdout(const fs::path& file_path, const std::string& name,
                              const std::string& digest, uint64_t size, char last_byte) {
  std::ifstream file(file_path, std::ios::binary);
  REQUIRE(file);
  std::string head(1u << 20, '\0');
  file.read(head.data(), static_cast<std::streamsize>(head.size()));
  head.resize(static_cast<size_t>(file.gcount()));
  auto start = step_start(head, 0, 1, 1, name);
  REQUIRE_MESSAGE(start != std::string::npos,
                  "no start line of step '" << name << "' in the runner's stdout:\n"
                                            << excerpt(head));
  file.clear();
  file.seekg(static_cast<std::streamoff>(start));
  Sha256 sha;
  std::string buffer(1u << 20, '\0');
  uint64_t left = size;
  while (left > 0 && file) {
    file.read(buffer.data(), static_cast<std::streamsize>(std::min<uint64_t>(left, buffer.size())));
    auto n = static_cast<size_t>(file.gcount());
    sha.add(std::string_view(buffer.data(), n));
    left -= n;
  }
  CHECK_MESSAGE(sha.size() == size, "the runner's stdout ends after "
                                      << sha.size() << " of the step's " << size << " bytes");
  CHECK_MESSAGE(sha.hex() == digest, "the step's bytes in the runner's stdout differ");
  std::string tail(4096, '\0');
  file.clear();
  file.seekg(static_cast<std::streamoff>(start + size));
  file.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  tail.resize(static_cast<size_t>(file.gcount()));
  CHECK_MESSAGE(step_end_follows(tail, 0, std::string(1, last_byte), name),
                "no end line of step '" << name << "' right after its bytes; found:\n"
                                        << excerpt(tail, 0, 300));
}

// ------------------------------------------------------------ shared checks

void check_sequences(const RecordedOutput& recorded) {
  for (const auto& [key, stream] : recorded.streams)
    CHECK_MESSAGE(stream.sequence_problem.empty(),
                  "step " << key.first << (key.second == v1::STDOUT ? " stdout" : " stderr")
                          << ": " << stream.sequence_problem);
}

// The step's stream in the event log is exactly `expected`.
void check_recorded(RecordedOutput& recorded, uint32_t step, v1::OutputStream which,
                    const std::string& expected, const std::string& what) {
  auto& stream = recorded.stream(step, which);
  INFO(what);
  CHECK_MESSAGE(stream.data == expected,
                "events.jsonl differs from what the step printed: "
                  << first_difference(stream.data, expected));
}

void check_runner_memory(const FloodRun& run) {
  MESSAGE("runner peak RSS (VmHWM): " << run.peak_rss_kib << " KiB");
  CHECK(run.peak_rss_kib > 0);
  CHECK_MESSAGE(run.peak_rss_kib < rss_limit_kib,
                "the runner's peak RSS " << run.peak_rss_kib << " KiB is over the bound of "
                                         << rss_limit_kib << " KiB");
}

// These cases check every byte in events.jsonl too, so its cap (events_max_bytes,
// 64 MiB by default, tested in test_disk_limits.cpp) is turned off.
std::filesystem::path uncapped_config(const Sandbox& sandbox) {
  return sandbox.write_json("runner-config.json", nlohmann::json{{"events_max_bytes", 0}});
}

}  // namespace

TEST_CASE("a flood of stdout arrives whole in the terminal and the event log, with bounded "
          "memory" * doctest::timeout(3600)) {
  if (auto problem = test_guest_problem(); !problem.empty()) {
    MESSAGE(problem);
    return;
  }
  Sandbox sandbox;
  const uint64_t size = flood_bytes();
  const std::string pattern = "0123456789abcdef\n";
  const std::string id = "flood-stdout";
  auto job = guest_job(id, {"yes 0123456789abcdef | head -c " + std::to_string(size)});
  job["steps"][0]["name"] = "flood";
  job["timeout_seconds"] = 3000;
  auto job_file = sandbox.write_json("job.json", job);

  auto run = run_to_files(sandbox.run_args(job_file, "tcg", uncapped_config(sandbox)), sandbox.root() / "stdout",
                          sandbox.root() / "stderr", 3300s);
  REQUIRE_MESSAGE(run.status, "the runner did not finish within " << run.seconds << " s");
  CHECK_MESSAGE(run.status->describe() == "exit code 0",
                "runner: " << run.status->describe() << "\n"
                           << excerpt(read_file(sandbox.root() / "stdout"), 0, 3000)
                           << "\n--- stderr:\n"
                           << excerpt(read_file(sandbox.root() / "stderr"), 0, 2000));
  MESSAGE(size << " bytes through the runner in " << run.seconds << " s (whole job) = "
               << static_cast<double>(size) / (1 << 20) / run.seconds << " MiB/s");
  check_runner_memory(run);

  auto [digest, expected_size] = repeated_digest(pattern, size);
  const char last_byte = pattern[(size - 1) % pattern.size()];
  check_big_step_in_stdout(sandbox.root() / "stdout", "flood", digest, expected_size, last_byte);

  auto recorded = reassemble(sandbox.job_dir(id) / "events.jsonl");
  CHECK_MESSAGE(recorded.bad_lines.empty(), "unreadable event lines: "
                                                     << (recorded.bad_lines.empty() ? "" : recorded.bad_lines[0]));
  check_sequences(recorded);
  auto& stream = recorded.stream(0, v1::STDOUT);
  CHECK_MESSAGE(stream.sha.size() == expected_size,
                "events.jsonl carries " << stream.sha.size() << " of " << expected_size
                                        << " bytes");
  CHECK_MESSAGE(stream.sha.hex() == digest, "the bytes in events.jsonl differ");
  MESSAGE("events.jsonl: " << stream.next_sequence << " stdout chunks, "
                           << fs::file_size(sandbox.job_dir(id) / "events.jsonl") << " bytes");
  REQUIRE(recorded.result);
  CHECK(recorded.result->status() == v1::SUCCEEDED);
  check_nothing_left(sandbox);
}

// Flow control reaches the terminal: the supervisor credits the SSH reader only
// for output every sink has handled, so a terminal that reads nothing slows the
// step down instead of making the runner queue its output.
TEST_CASE("a terminal that does not keep up with a flood does not make the runner's memory "
          "grow" * doctest::timeout(1800)) {
  if (auto problem = test_guest_problem(); !problem.empty()) {
    MESSAGE(problem);
    return;
  }
  Sandbox sandbox;
  // More than the memory bound: held in the runner, it could not fit under it.
  const uint64_t size = 64ull << 20;
  const std::string pattern = "0123456789abcdef\n";
  const std::string id = "flood-held-terminal";
  auto job = guest_job(id, {"yes 0123456789abcdef | head -c " + std::to_string(size)});
  job["steps"][0]["name"] = "flood";
  auto job_file = sandbox.write_json("job.json", job);

  // The terminal reads nothing until the job has ended (its result is recorded)
  // or for two minutes at most: a runner with flow control all the way to its
  // terminal slows the step down meanwhile instead of buffering its output.
  const auto result_file = sandbox.job_dir(id) / "result.json";
  const auto hold_until = steady::now() + 120s;
  auto run = run_to_files(sandbox.run_args(job_file, "tcg", uncapped_config(sandbox)), sandbox.root() / "stdout",
                          sandbox.root() / "stderr", 1500s,
                          [&] { return !fs::exists(result_file) && steady::now() < hold_until; });
  REQUIRE_MESSAGE(run.status, "the runner did not finish within " << run.seconds << " s");
  CHECK_MESSAGE(run.status->describe() == "exit code 0",
                "runner: " << run.status->describe() << "\n--- stderr:\n"
                           << excerpt(read_file(sandbox.root() / "stderr"), 0, 2000));
  check_runner_memory(run);

  // Slow or not, the terminal gets every byte.
  auto [digest, expected_size] = repeated_digest(pattern, size);
  const char last_byte = pattern[(size - 1) % pattern.size()];
  check_big_step_in_stdout(sandbox.root() / "stdout", "flood", digest, expected_size, last_byte);
  auto recorded = reassemble(sandbox.job_dir(id) / "events.jsonl");
  check_sequences(recorded);
  auto& stream = recorded.stream(0, v1::STDOUT);
  CHECK(stream.sha.size() == expected_size);
  CHECK(stream.sha.hex() == digest);
  check_nothing_left(sandbox);
}

TEST_CASE("a long line, binary bytes, both streams interleaved and a closed stdout arrive "
          "exactly" * doctest::timeout(1800)) {
  if (auto problem = test_guest_problem(); !problem.empty()) {
    MESSAGE(problem);
    return;
  }
  Sandbox sandbox;
  const std::string id = "flood-shapes";

  // Step 1: 10 MiB on one line, without any newline.
  const std::string letters = "abcdefghijklmnopqrstuvwxyz0123456789";
  const auto long_line = repeated(letters, 10u << 20);
  const std::string long_line_script =
    "yes " + letters + " | tr -d '\\n' | head -c " + std::to_string(long_line.size());

  // Step 2: 1 MiB of binary bytes on stdout (a 64 KiB block, 16 times) and 64 KiB
  // of other binary bytes on stderr.
  const auto block = binary_block(64u << 10, 12345);
  const auto binary_err = binary_block(64u << 10, 777);
  const std::string binary_out = repeated(block, 16 * block.size());
  const std::string binary_script = "b=" + printf_format(block) +
                                    "\ni=0\nwhile [ $i -lt 16 ]; do printf \"$b\"; i=$((i+1)); "
                                    "done\nprintf " +
                                    printf_format(binary_err) + " >&2\n";

  // Step 3: lines to stdout and stderr in turn.
  constexpr int interleaved_lines = 20000;
  std::string interleaved_out, interleaved_err;
  for (int i = 0; i < interleaved_lines; ++i) {
    interleaved_out += "out " + std::to_string(i) + "\n";
    interleaved_err += "err " + std::to_string(i) + "\n";
  }
  const std::string interleaved_script =
    "i=0\nwhile [ $i -lt " + std::to_string(interleaved_lines) +
    " ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done\n";

  // Step 4: stdout closed at once; the step still ends normally.
  const std::string closed_script = "exec 1>&-\necho to-stderr >&2\nsleep 1\nexit 0\n";

  auto job = guest_job(id, {long_line_script, binary_script, interleaved_script, closed_script});
  const std::vector<std::string> names = {"long line", "binary", "interleaved", "closed stdout"};
  for (size_t i = 0; i < names.size(); ++i)
    job["steps"][i]["name"] = names[i];
  auto job_file = sandbox.write_json("job.json", job);

  auto run = run_to_files(sandbox.run_args(job_file, "tcg", uncapped_config(sandbox)), sandbox.root() / "stdout",
                          sandbox.root() / "stderr", 1500s);
  const auto out = read_file(sandbox.root() / "stdout");
  const auto err = read_file(sandbox.root() / "stderr");
  REQUIRE_MESSAGE(run.status, "the runner did not finish within " << run.seconds << " s");
  CHECK_MESSAGE(run.status->describe() == "exit code 0",
                "runner: " << run.status->describe() << "\n"
                           << excerpt(out, 0, 3000) << "\n--- stderr:\n"
                           << excerpt(err, 0, 2000));
  check_runner_memory(run);

  // The event log: every stream of every step exactly, sequences without gaps.
  auto recorded = reassemble(sandbox.job_dir(id) / "events.jsonl");
  CHECK_MESSAGE(recorded.bad_lines.empty(), "unreadable event lines: "
                                                     << (recorded.bad_lines.empty() ? "" : recorded.bad_lines[0]));
  check_sequences(recorded);
  check_recorded(recorded, 0, v1::STDOUT, long_line, "step 1: a 10 MiB line");
  check_recorded(recorded, 0, v1::STDERR, "", "step 1: stderr");
  check_recorded(recorded, 1, v1::STDOUT, binary_out, "step 2: binary stdout");
  check_recorded(recorded, 1, v1::STDERR, binary_err, "step 2: binary stderr");
  check_recorded(recorded, 2, v1::STDOUT, interleaved_out, "step 3: interleaved stdout");
  check_recorded(recorded, 2, v1::STDERR, interleaved_err, "step 3: interleaved stderr");
  check_recorded(recorded, 3, v1::STDOUT, "", "step 4: closed stdout");
  check_recorded(recorded, 3, v1::STDERR, "to-stderr\n", "step 4: stderr");

  REQUIRE(recorded.result);
  CHECK(recorded.result->status() == v1::SUCCEEDED);
  REQUIRE(recorded.result->steps_size() == 4);
  for (const auto& step : recorded.result->steps()) {
    INFO("step " << step.step_index() + 1 << " (" << step.name() << ")");
    CHECK(step.outcome() == v1::STEP_SUCCEEDED);
    CHECK(step.exit_code() == 0);
  }

  // The runner's stdout: each step's bytes between its start and end lines.
  const std::vector<std::string> outputs = {long_line, binary_out, interleaved_out, ""};
  size_t at = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    INFO("step " << i + 1 << " (" << names[i] << ") in the runner's stdout");
    auto start = step_start(out, at, i + 1, names.size(), names[i]);
    REQUIRE_MESSAGE(start != std::string::npos, "no start line; stdout:\n" << excerpt(out, at));
    CHECK_MESSAGE(out.compare(start, outputs[i].size(), outputs[i]) == 0,
                  "the step's bytes differ: "
                    << first_difference(out.substr(start, outputs[i].size()), outputs[i]));
    CHECK_MESSAGE(step_end_follows(out, start + outputs[i].size(), outputs[i], names[i]),
                  "no end line right after the step's bytes; found:\n"
                    << excerpt(out, start + outputs[i].size(), 300));
    at = start + outputs[i].size();
  }

  // The runner's stderr: the steps' stderr bytes, in step order (the runner adds
  // nothing of its own to stderr on a successful run, but do not insist on it).
  const std::string steps_err = binary_err + interleaved_err + "to-stderr\n";
  auto err_at = err.find(steps_err);
  CHECK_MESSAGE(err_at != std::string::npos,
                "the runner's stderr does not hold the steps' stderr in order: "
                  << first_difference(err, steps_err) << "\n"
                  << excerpt(err, 0, 600));
  check_nothing_left(sandbox);
}
