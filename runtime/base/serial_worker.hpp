#pragma once
// One thread that runs posted tasks in order: where blocking work (libssh2) runs
// so that it never occupies an actor scheduler thread.
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace solstice {

class SerialWorker {
 public:
  SerialWorker();
  // Runs the tasks already posted, then joins.
  ~SerialWorker();
  SerialWorker(const SerialWorker&) = delete;
  SerialWorker& operator=(const SerialWorker&) = delete;

  void post(std::function<void()> task);

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  bool closing_ = false;
  std::thread thread_;
  void run();
};

}  // namespace solstice
