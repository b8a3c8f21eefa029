// The real console tailer on CAF's deterministic scheduler, following a real file:
// lines come out whole, once, in order; `stop` drains the unfinished line before
// it replies `stopped`, and nothing is read after that.
#include <doctest/doctest.h>

#include <stdlib.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/exit_reason.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/send.hpp>

#include "actors/actors.hpp"
#include "actors/vm/console_tailer.hpp"
#include "actors/runner_types.hpp"

namespace {

using namespace solstice;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

struct tailer_test_config : caf::actor_system_config {
  tailer_test_config() {
    add_runner_types(*this);
    set("scheduler.policy", caf::atom("testing"));
  }
};

struct tailer_fixture {
  tailer_test_config cfg;
  caf::actor_system sys{cfg};
  caf::scheduler::test_coordinator& sched;
  fs::path dir;
  fs::path log;
  // The redacted record the tailer writes (none when empty), and the secrets it hides.
  fs::path record;
  std::vector<std::string> secrets;

  // What the observer saw, in order: console lines, and "<stopped>" when the
  // stop reply arrived.
  std::vector<std::string> seen;

  caf::actor observer;
  console_tailer_actor tailer;

  tailer_fixture() : sched(dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler())) {
    std::string tmpl = (fs::temp_directory_path() / "solstice-tailer-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    log = dir / "console.log";
  }

  ~tailer_fixture() {
    for (auto handle : {observer, caf::actor_cast<caf::actor>(tailer)})
      if (handle)
        caf::anon_send_exit(handle, caf::exit_reason::kill);
    while (sched.has_job() || sched.has_pending_timeout()) {
      sched.run();
      sched.trigger_timeouts();
    }
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  // The observer is also the one that asks the tailer to stop, so the order of
  // the last lines and the `stopped` reply is the order one actor receives them.
  void spawn_tailer() {
    observer = sys.spawn([this](caf::event_based_actor* self) -> caf::behavior {
      return {
        [this](console_atom, const std::string& line) { seen.push_back(line); },
        [this, self](stop_atom) {
          self->request(tailer, 5s, stop_atom::value)
            .then([this](stopped_atom) { seen.push_back("<stopped>"); },
                  [this](caf::error& err) { seen.push_back("<stop failed: " + error_text(err) + ">"); });
        },
      };
    });
    tailer = sys.spawn(console_tailer, caf::actor_cast<console_observer_actor>(observer),
                       console_capture{log.string(), record.string(), secrets}, console_wakeup::timer);
    drive();
  }

  void drive() {
    for (size_t n = 0; sched.has_job(); ++n) {
      REQUIRE_MESSAGE(n < 100000, "the actors never went idle");
      sched.run_once();
    }
  }

  // One poll interval of the tailer passes.
  void tick() {
    sched.advance_time(20ms);
    drive();
  }

  void append(const std::string& bytes) {
    std::ofstream out(log, std::ios::binary | std::ios::app);
    out << bytes;
    REQUIRE(out.good());
  }

  size_t pending_delayed_messages() {
    size_t n = 0;
    for (const auto& [due, event] : sched.clock().schedule())
      if (event->subtype == caf::detail::simple_actor_clock::actor_msg_type)
        ++n;
    return n;
  }

  void stop() {
    caf::anon_send(observer, stop_atom::value);
    drive();
  }
};

}  // namespace

TEST_CASE_FIXTURE(tailer_fixture, "the console tailer emits whole lines once and drains on stop") {
  spawn_tailer();
  // The log does not exist yet (QEMU has not made it): nothing, and no failure.
  tick();
  CHECK(seen.empty());

  append("SeaBIOS\nLinux version 6.1\r\n\r\nlogin: par");
  tick();
  CHECK(seen == std::vector<std::string>{"SeaBIOS", "Linux version 6.1", ""});

  // The partial line is held until its end arrives.
  append("tial");
  tick();
  CHECK(seen.size() == 3);
  append(" line\n");
  tick();
  REQUIRE(seen.size() == 4);
  CHECK(seen[3] == "login: partial line");

  // Nothing new, nothing emitted again.
  tick();
  tick();
  CHECK(seen.size() == 4);

  // A run without a newline longer than the limit comes out in bounded pieces.
  append(std::string(console_line_limit + 10, 'x') + "\n");
  tick();
  REQUIRE(seen.size() == 6);
  CHECK(seen[4] == std::string(console_line_limit, 'x'));
  CHECK(seen[5] == std::string(10, 'x'));

  // `stop` reads what arrived since the last tick, emits the unfinished line,
  // and only then replies.
  append("cloud-init done\nlast words");
  stop();
  CHECK(seen == std::vector<std::string>{"SeaBIOS", "Linux version 6.1", "", "login: partial line",
                                         std::string(console_line_limit, 'x'),
                                         std::string(10, 'x'), "cloud-init done", "last words",
                                         "<stopped>"});

  // After the stop nothing is read any more, and a second stop is answered
  // without emitting anything again.
  append(" more\nafter stop\n");
  tick();
  tick();
  stop();
  CHECK(seen.size() == 10);
  CHECK(seen.back() == "<stopped>");
  CHECK(seen[8] == "<stopped>");
  // The tailer's poll timer has ended with the stop. (CAF 0.17 leaves answered
  // requests' timeouts in the clock, so look for delayed messages only.)
  CHECK(pending_delayed_messages() == 0);
}

TEST_CASE_FIXTURE(tailer_fixture, "a console log written before the tailer started is read from its start") {
  append("early line\nno newline yet");
  spawn_tailer();  // its first tick reads the file
  CHECK(seen == std::vector<std::string>{"early line"});
  stop();
  CHECK(seen == std::vector<std::string>{"early line", "no newline yet", "<stopped>"});
}

TEST_CASE_FIXTURE(tailer_fixture, "the console record is the whole capture with secrets hidden, "
                                  "including what came after the hand-off") {
  record = dir / "record.log";
  secrets = {"hunter2-secret"};
  spawn_tailer();
  append("boot hunter2-secret\nsplit hunt");
  tick();
  append("er2-secret end\n");
  tick();
  stop();
  // The lines emitted are raw (the supervisor redacts them as it makes events).
  CHECK(seen == std::vector<std::string>{"boot hunter2-secret", "split hunter2-secret end",
                                         "<stopped>"});
  // A step writes to the console after the hand-off: no line is emitted, and
  // the record gets it when the tailer ends (its attempt ends after QEMU).
  append("late hunter2-secret line\nno newline hunter2-sec");
  tick();
  CHECK(seen.size() == 3);
  caf::anon_send_exit(tailer, caf::exit_reason::user_shutdown);
  drive();
  std::ifstream in(record, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text == "boot ***\nsplit *** end\nlate *** line\nno newline hunter2-sec");
  CHECK(seen.size() == 3);
  CHECK((fs::status(record).permissions() & fs::perms::all) ==
        (fs::perms::owner_read | fs::perms::owner_write));
}

// QEMU's raw capture is not capped by QEMU: once the record holds its bytes the
// tailer punches them out of the capture (QEMU appends on), and after the
// hand-off it drains the capture every second, so a step that floods the
// console leaves no big file in the VM's work dir.
TEST_CASE_FIXTURE(tailer_fixture, "the capture keeps only what the record has not taken yet, "
                                  "also while steps write to the console") {
  record = dir / "record.log";
  auto allocated = [&] {
    struct stat info {};
    REQUIRE(::stat(log.c_str(), &info) == 0);
    return static_cast<uint64_t>(info.st_blocks) * 512;
  };
  spawn_tailer();
  const std::string boot(2u << 20, 'b');
  append(boot + "\n");
  tick();
  CHECK(allocated() < (256u << 10));
  stop();
  const auto lines_until_stop = seen.size();
  CHECK(seen.back() == "<stopped>");
  // A step floods the console after the hand-off; no line is emitted for it.
  const std::string flood(4u << 20, 's');
  append(flood);
  sched.advance_time(1s);
  drive();
  CHECK(fs::file_size(log) == boot.size() + 1 + flood.size());
  CHECK_MESSAGE(allocated() < (256u << 10), "the capture still holds " << allocated() << " bytes");
  CHECK(fs::file_size(record) == boot.size() + 1 + flood.size());
  append("last\n");
  caf::anon_send_exit(tailer, caf::exit_reason::user_shutdown);
  drive();
  std::ifstream in(record, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text == boot + "\n" + flood + "last\n");
  CHECK(seen.size() == lines_until_stop);  // nothing emitted after the hand-off
}
