#pragma once
// Secret redaction for output streams. Every byte covered by an occurrence of any
// secret is hidden; each maximal run of hidden bytes becomes one "***" (so
// overlapping or adjacent secrets never leak a fragment). Works on arbitrary bytes.
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace solstice {

class Redactor {
 public:
  static constexpr std::string_view mask = "***";

  // Empty strings among `secrets` are ignored.
  explicit Redactor(std::vector<std::string> secrets);

  // Returns what can be emitted now. Holds back at most (longest secret - 1) bytes
  // that could be the start of a secret split across chunks; with no secrets,
  // nothing is held back.
  std::string feed(std::string_view chunk);
  // End of stream: everything still held back, redacted.
  std::string flush();
  // One-shot redaction of a complete text; independent of the stream state.
  std::string redact(std::string_view text) const;

  std::size_t held_back() const { return state_.pending.size(); }
  bool has_secrets() const { return longest_ > 0; }

 private:
  struct StreamState {
    std::string pending;              // bytes not emitted yet
    std::size_t pending_masked = 0;   // leading pending bytes covered by a known occurrence
    bool in_masked_run = false;       // the last emitted byte was hidden
  };
  std::string process(StreamState& state, std::string_view chunk, bool end_of_stream) const;

  std::vector<std::string> secrets_;
  std::size_t longest_ = 0;
  StreamState state_;
};

// One-shot convenience.
std::string redact(std::string_view text, const std::vector<std::string>& secrets);

}  // namespace solstice
