#pragma once
// What /proc/PID/stat says about a process: whether it runs, when it started, the
// CPU time it used. For processes of the runner's own (QEMU) and for PIDs found in
// records (recovery), which need not be its children.
#include <sys/types.h>

#include <chrono>
#include <optional>

namespace solstice {

// Whether `pid` is a process that runs (exists and is neither a zombie nor dead).
bool process_running(pid_t pid);

// Start time of a process in clock ticks since boot (/proc/PID/stat field 22), to
// recognise a process by more than its PID. nullopt if there is no such process.
std::optional<unsigned long long> process_start_time(pid_t pid);

// CPU time a process has used so far, user and system, all its threads (/proc/PID/stat
// fields 14 and 15, in clock ticks of 10 ms on Linux). nullopt if there is no such process.
std::optional<std::chrono::milliseconds> process_cpu_time(pid_t pid);

}  // namespace solstice
