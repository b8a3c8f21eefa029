#include "runtime/job/redactor.hpp"

#include <algorithm>
#include <utility>

namespace solstice {

Redactor::Redactor(std::vector<std::string> secrets) {
  for (auto& secret : secrets) {
    if (secret.empty()) continue;
    longest_ = std::max(longest_, secret.size());
    secrets_.push_back(std::move(secret));
  }
  // Identical secrets would only repeat the same search.
  std::sort(secrets_.begin(), secrets_.end());
  secrets_.erase(std::unique(secrets_.begin(), secrets_.end()), secrets_.end());
}

std::string Redactor::feed(std::string_view chunk) { return process(state_, chunk, false); }

std::string Redactor::flush() { return process(state_, {}, true); }

std::string Redactor::redact(std::string_view text) const {
  StreamState one_shot;
  return process(one_shot, text, true);
}

// One round over `pending + chunk`:
//  1. find every complete occurrence of every secret (overlaps included);
//  2. find the cut: the first position from which the rest of the buffer is a
//     proper prefix of some secret, i.e. could still become an occurrence; it lies
//     within the last (longest - 1) bytes. Everything before it is final, because
//     any later occurrence starts at or after the cut;
//  3. emit the bytes before the cut, each run of covered bytes as one mask;
//  4. keep the rest, remembering how many of its leading bytes are already covered
//     by occurrences that began before the cut (they are not found again).
std::string Redactor::process(StreamState& state, std::string_view chunk,
                              bool end_of_stream) const {
  std::string buffer = std::move(state.pending);
  state.pending.clear();
  buffer.append(chunk);

  if (secrets_.empty()) {
    state.pending_masked = 0;
    state.in_masked_run = false;
    return buffer;
  }

  const std::size_t size = buffer.size();
  const std::string_view view(buffer);

  // coverage_delta[i]: +1 where an occurrence starts, -1 where one ends.
  std::vector<int> coverage_delta(size + 1, 0);
  std::size_t carried_end = std::min(state.pending_masked, size);
  if (carried_end > 0) {
    coverage_delta[0] += 1;
    coverage_delta[carried_end] -= 1;
  }
  struct Occurrence {
    std::size_t begin, end;
  };
  std::vector<Occurrence> occurrences;
  for (const auto& secret : secrets_) {
    for (auto pos = view.find(secret); pos != std::string_view::npos;
         pos = view.find(secret, pos + 1)) {
      occurrences.push_back({pos, pos + secret.size()});
      coverage_delta[pos] += 1;
      coverage_delta[pos + secret.size()] -= 1;
    }
  }

  std::size_t cut = size;
  if (!end_of_stream) {
    const std::size_t first_candidate = size >= longest_ - 1 ? size - (longest_ - 1) : 0;
    for (std::size_t pos = first_candidate; pos < size && cut == size; ++pos) {
      const std::string_view tail = view.substr(pos);
      for (const auto& secret : secrets_) {
        if (secret.size() > tail.size() && secret.compare(0, tail.size(), tail) == 0) {
          cut = pos;
          break;
        }
      }
    }
  }

  std::string out;
  out.reserve(cut);
  int coverage = 0;
  for (std::size_t i = 0; i < cut; ++i) {
    coverage += coverage_delta[i];
    if (coverage > 0) {
      if (!state.in_masked_run) out.append(mask);
      state.in_masked_run = true;
    } else {
      out.push_back(buffer[i]);
      state.in_masked_run = false;
    }
  }

  std::size_t covered_end = carried_end;
  for (const auto& occurrence : occurrences) {
    if (occurrence.begin < cut) covered_end = std::max(covered_end, occurrence.end);
  }
  state.pending_masked = covered_end > cut ? covered_end - cut : 0;
  state.pending.assign(buffer, cut, std::string::npos);
  if (end_of_stream) state.in_masked_run = false;
  return out;
}

std::string redact(std::string_view text, const std::vector<std::string>& secrets) {
  return Redactor(secrets).redact(text);
}

}  // namespace solstice
