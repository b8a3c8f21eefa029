#include "runtime/vm/image_download.hpp"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <memory>

#include <curl/curl.h>
#include <openssl/evp.h>

namespace solstice {
namespace {

std::string hex(const unsigned char* data, unsigned size) {
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (unsigned i = 0; i < size; ++i) {
    text += digits[data[i] >> 4];
    text += digits[data[i] & 0xf];
  }
  return text;
}

std::string mib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f MiB", bytes / (1024.0 * 1024.0));
  return text;
}

// What the curl callbacks share.
struct Transfer {
  int fd = -1;
  EVP_MD_CTX* digest = nullptr;
  uint64_t bytes = 0;
  int write_errno = 0;
  std::string what;
  bool progress = false;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_drawn{};
  bool drawn = false;
};

size_t on_body(char* data, size_t size, size_t count, void* user) {
  auto& transfer = *static_cast<Transfer*>(user);
  const size_t total = size * count;
  size_t done = 0;
  while (done < total) {
    ssize_t wrote = ::write(transfer.fd, data + done, total - done);
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) {
      transfer.write_errno = wrote < 0 ? errno : EIO;
      return 0;  // curl then fails with CURLE_WRITE_ERROR
    }
    done += static_cast<size_t>(wrote);
  }
  EVP_DigestUpdate(transfer.digest, data, total);
  transfer.bytes += total;
  return total;
}

// "  debian-12: 45% 123.4 MiB of 270.0 MiB, 12.3 MiB/s", redrawn at most 10 times a second.
int on_progress(void* user, curl_off_t total, curl_off_t now, curl_off_t, curl_off_t) {
  auto& transfer = *static_cast<Transfer*>(user);
  if (!transfer.progress) return 0;
  const auto clock_now = std::chrono::steady_clock::now();
  const bool complete = total > 0 && now == total;  // always shown: the bar ends at 100%
  if (transfer.drawn && !complete && clock_now - transfer.last_drawn < std::chrono::milliseconds(100)) return 0;
  transfer.last_drawn = clock_now;
  transfer.drawn = true;
  const double seconds = std::chrono::duration<double>(clock_now - transfer.started).count();
  const double rate = seconds > 0 ? static_cast<double>(now) / seconds : 0;
  std::string line = "\r  " + transfer.what + ": ";
  if (total > 0) {
    line += std::to_string(static_cast<int>(100.0 * static_cast<double>(now) / static_cast<double>(total))) +
            "% " + mib(static_cast<double>(now)) + " of " + mib(static_cast<double>(total));
  } else {
    line += mib(static_cast<double>(now));
  }
  line += ", " + mib(rate) + "/s   ";
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
  return 0;
}

struct CurlDeleter {
  void operator()(CURL* handle) const { curl_easy_cleanup(handle); }
};
struct DigestDeleter {
  void operator()(EVP_MD_CTX* context) const { EVP_MD_CTX_free(context); }
};

}  // namespace

Result<Download> download_to_fd(const std::string& url, int fd, const std::string& what, bool progress) {
  static const bool initialised = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  if (!initialised) return fail("cannot download " + url + ": libcurl could not be initialised");
  std::unique_ptr<CURL, CurlDeleter> curl(curl_easy_init());
  std::unique_ptr<EVP_MD_CTX, DigestDeleter> digest(EVP_MD_CTX_new());
  if (!curl || !digest || EVP_DigestInit_ex(digest.get(), EVP_sha256(), nullptr) != 1) {
    return fail("cannot download " + url + ": out of memory");
  }
  Transfer transfer;
  transfer.fd = fd;
  transfer.digest = digest.get();
  transfer.what = what;
  transfer.progress = progress;
  char curl_error[CURL_ERROR_SIZE] = {};
  CURL* handle = curl.get();
  curl_easy_setopt(handle, CURLOPT_URL, url.c_str());
  // Only the web: a config's url must not read local files or talk other protocols.
  curl_easy_setopt(handle, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(handle, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(handle, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(handle, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(handle, CURLOPT_FAILONERROR, 1L);  // 404 and friends are errors
  curl_easy_setopt(handle, CURLOPT_CONNECTTIMEOUT, 30L);
  // Stalled: fewer than 1 byte/s for 60 s. No overall limit: images are big.
  curl_easy_setopt(handle, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(handle, CURLOPT_LOW_SPEED_TIME, 60L);
  curl_easy_setopt(handle, CURLOPT_USERAGENT, "solstice-runner");
  curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, curl_error);
  curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(handle, CURLOPT_WRITEDATA, &transfer);
  curl_easy_setopt(handle, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(handle, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(handle, CURLOPT_XFERINFODATA, &transfer);
  curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
  const CURLcode code = curl_easy_perform(handle);
  if (transfer.drawn) std::fputs("\n", stderr);
  if (code != CURLE_OK) {
    if (code == CURLE_WRITE_ERROR && transfer.write_errno != 0) {
      return fail(errno_message("cannot download " + url + ": writing the image failed", transfer.write_errno));
    }
    return fail("cannot download " + url + ": " + (curl_error[0] ? curl_error : curl_easy_strerror(code)));
  }
  unsigned char sum[EVP_MAX_MD_SIZE];
  unsigned size = 0;
  EVP_DigestFinal_ex(digest.get(), sum, &size);
  return Download{hex(sum, size), transfer.bytes};
}

}  // namespace solstice
