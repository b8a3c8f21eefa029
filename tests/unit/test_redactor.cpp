#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

#include "runtime/job/redactor.hpp"

using solstice::Redactor;

namespace {

// Independent reference: mark every byte inside any occurrence of any secret, then
// replace each maximal run of marked bytes by one "***".
std::string reference_redact(const std::string& text, const std::vector<std::string>& secrets) {
  std::vector<bool> covered(text.size(), false);
  for (const auto& secret : secrets) {
    if (secret.empty()) continue;
    for (std::size_t pos = 0; pos + secret.size() <= text.size(); ++pos) {
      if (text.compare(pos, secret.size(), secret) == 0) {
        for (std::size_t i = pos; i < pos + secret.size(); ++i) covered[i] = true;
      }
    }
  }
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (!covered[i]) {
      out.push_back(text[i]);
    } else if (i == 0 || !covered[i - 1]) {
      out += "***";
    }
  }
  return out;
}

std::string stream_in_pieces(const std::vector<std::string>& secrets,
                             const std::vector<std::string>& pieces,
                             std::size_t* max_held_back = nullptr) {
  Redactor redactor(secrets);
  std::string out;
  for (const auto& piece : pieces) {
    out += redactor.feed(piece);
    if (max_held_back) *max_held_back = std::max(*max_held_back, redactor.held_back());
  }
  out += redactor.flush();
  CHECK(redactor.held_back() == 0);
  return out;
}

}  // namespace

TEST_CASE("redact replaces each occurrence of a secret") {
  const std::vector<std::string> secrets{"hunter2"};
  CHECK(solstice::redact("password is hunter2, again hunter2.", secrets) ==
        "password is ***, again ***.");
  CHECK(solstice::redact("nothing secret here", secrets) == "nothing secret here");
  CHECK(solstice::redact("", secrets).empty());
  CHECK(solstice::redact("hunter", secrets) == "hunter");
}

TEST_CASE("a secret split at every boundary across two chunks is still hidden") {
  const std::vector<std::string> secrets{"s3cr3t-value"};
  const std::string text = "echo s3cr3t-value; then s3cr3t-valu and s3cr3t-value";
  const std::string expected = "echo ***; then s3cr3t-valu and ***";
  REQUIRE(reference_redact(text, secrets) == expected);
  for (std::size_t split = 0; split <= text.size(); ++split) {
    CAPTURE(split);
    CHECK(stream_in_pieces(secrets, {text.substr(0, split), text.substr(split)}) == expected);
  }
}

TEST_CASE("a secret split at every pair of boundaries across three chunks is still hidden") {
  const std::vector<std::string> secrets{"TOPSECRET"};
  const std::string text = "a TOPSECRET b TOPSECRETTOPSECRET c TOPSECRE";
  const std::string expected = reference_redact(text, secrets);
  CHECK(expected == "a *** b *** c TOPSECRE");
  for (std::size_t first = 0; first <= text.size(); ++first) {
    for (std::size_t second = first; second <= text.size(); ++second) {
      CAPTURE(first);
      CAPTURE(second);
      const std::string out = stream_in_pieces(
          secrets, {text.substr(0, first), text.substr(first, second - first), text.substr(second)});
      REQUIRE(out == expected);
    }
  }
}

TEST_CASE("overlapping secrets leak no fragment") {
  const std::vector<std::string> secrets{"abc", "bcd"};
  CHECK(solstice::redact("xabcdy", secrets) == "x***y");
  CHECK(solstice::redact("xabcy xbcdy", secrets) == "x***y x***y");
  const std::string text = "1abcd2bcd3abc";
  for (std::size_t split = 0; split <= text.size(); ++split) {
    CAPTURE(split);
    CHECK(stream_in_pieces(secrets, {text.substr(0, split), text.substr(split)}) == "1***2***3***");
  }
}

TEST_CASE("a secret that is a prefix of another hides the longer one whole") {
  const std::vector<std::string> secrets{"pass", "password"};
  const std::string text = "password1 pass2 passwor3";
  CHECK(solstice::redact(text, secrets) == "***1 ***2 ***wor3");
  for (std::size_t split = 0; split <= text.size(); ++split) {
    CAPTURE(split);
    CHECK(stream_in_pieces(secrets, {text.substr(0, split), text.substr(split)}) ==
          "***1 ***2 ***wor3");
  }
}

TEST_CASE("a run of adjacent or repeated secrets becomes one mask") {
  CHECK(solstice::redact("[abcabc]", {"abc"}) == "[***]");
  CHECK(solstice::redact("[aaaa]", {"aa"}) == "[***]");
}

TEST_CASE("without secrets everything passes through at once") {
  Redactor redactor({});
  CHECK_FALSE(redactor.has_secrets());
  const std::string chunk("any\0thing\xff", 10);
  CHECK(redactor.feed(chunk) == chunk);
  CHECK(redactor.held_back() == 0);
  CHECK(redactor.flush().empty());

  Redactor only_empty({""});
  CHECK_FALSE(only_empty.has_secrets());
  CHECK(only_empty.feed("abc") == "abc");
}

TEST_CASE("only a possible start of a secret is held back, never more than longest - 1 bytes") {
  Redactor redactor({"secret", "xy"});
  CHECK(redactor.feed("hello ") == "hello ");
  CHECK(redactor.held_back() == 0);
  CHECK(redactor.feed("sec") == "");
  CHECK(redactor.held_back() == 3);
  CHECK(redactor.feed("rex") == "secre");  // "secrex" is not the secret; "x" may start "xy"
  CHECK(redactor.held_back() == 1);
  CHECK(redactor.flush() == "x");

  // A long chunk never leaves more than longest - 1 bytes behind.
  Redactor bounded({"0123456789"});
  std::string out = bounded.feed(std::string(1000, 'a') + "012345678");
  CHECK(bounded.held_back() == 9);
  CHECK(out == std::string(1000, 'a'));
  CHECK(bounded.feed("9 done") == "*** done");
}

TEST_CASE("one-shot redact does not disturb a stream in progress") {
  Redactor redactor({"secret"});
  CHECK(redactor.feed("my secr").size() == 3);
  CHECK(redactor.redact("a secret") == "a ***");
  CHECK(redactor.feed("et!") == "***!");
}

TEST_CASE("binary data: secrets with NUL and high bytes, random chunking, nothing lost") {
  const std::vector<std::string> secrets{std::string("\x00\xff\x01k", 4), std::string("\xfe\xfe\xfe"),
                                         std::string("key\x00", 4)};
  std::mt19937 random(20240611);
  std::uniform_int_distribution<int> byte_dist(0, 255);
  std::uniform_int_distribution<int> choice(0, 30);
  for (int round = 0; round < 200; ++round) {
    std::string text;
    const int pieces = 1 + choice(random);
    for (int i = 0; i < pieces; ++i) {
      const int pick = choice(random);
      if (pick < 3) {
        text += secrets[static_cast<std::size_t>(pick)];
      } else if (pick < 5) {
        text += secrets[static_cast<std::size_t>(pick - 3)].substr(0, 2);  // a near miss
      } else {
        text.push_back(static_cast<char>(byte_dist(random)));
      }
    }
    std::vector<std::string> chunks;
    for (std::size_t pos = 0; pos < text.size();) {
      const std::size_t length = std::min<std::size_t>(text.size() - pos, 1 + choice(random) % 7);
      chunks.push_back(text.substr(pos, length));
      pos += length;
    }
    std::size_t max_held = 0;
    const std::string out = stream_in_pieces(secrets, chunks, &max_held);
    CAPTURE(round);
    REQUIRE(out == reference_redact(text, secrets));
    CHECK(max_held <= 3);  // longest secret is 4 bytes
  }

  // Random bytes in which no secret can occur come out byte for byte.
  std::string plain;
  for (int i = 0; i < 4096; ++i) plain.push_back(static_cast<char>(byte_dist(random) % 200 + 2));
  Redactor redactor(secrets);
  std::string out;
  for (std::size_t pos = 0; pos < plain.size(); pos += 97) out += redactor.feed(plain.substr(pos, 97));
  out += redactor.flush();
  CHECK(out == plain);
}
