#pragma once
// Building a template (see template_store.hpp): boot the image once with a template
// identity, wait until SSH works (and cloud-init is done where there is one), quiet
// the guest (sync), `stop` it, save its device and RAM state with QMP `migrate`
// into the store, freeze its overlay. Blocking, seconds to minutes: run it on a
// worker thread or a detached actor, never on CAF's scheduler threads.
#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "runtime/base/error.hpp"
#include "runtime/vm/template_store.hpp"
#include "solstice.pb.h"

namespace solstice {

// Builds template `key` of `image` (run with `accel`) and publishes it. The caller
// holds the template's lock. Everything made is removed again when it fails; the
// error says what failed, with the guest console's last lines.
Result<TemplateInfo> build_template(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                    const TemplateKey& key, const std::string& accel);

// The ready template for `image` run with `accel`, if there is one (with accel
// "auto", the TCG one when KVM's could not be built lately). Reads only.
Result<std::optional<v1::RestoreFrom>> find_template(const v1::ImageSpec& image,
                                                     const v1::RunnerConfig& config,
                                                     const std::string& accel);

struct EnsuredTemplate {
  v1::RestoreFrom restore;
  TemplateInfo info;
  bool built = false;  // this call built it (else it was ready, or another built it meanwhile)
};

// How long after a failed build jobs boot cold without trying to build again.
inline constexpr int64_t failed_build_pause_us = int64_t{10} * 60 * 1000000;

// The ready template for `image` run with `accel`: found, or built now under the
// template's lock (another runner or job building it is waited for and its
// template used). `on_build` is called just before a build starts (for a notice).
// A build that failed less than `failed_build_pause_us` ago is not tried again
// (the error says why it failed) unless `retry_failed`.
Result<EnsuredTemplate> ensure_template(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                        const std::string& accel,
                                        const std::function<void(const TemplateKey&)>& on_build = {},
                                        bool retry_failed = false);

}  // namespace solstice
