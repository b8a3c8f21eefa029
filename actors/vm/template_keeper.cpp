#include "actors/vm/template_keeper.hpp"

#include "actors/runner_types.hpp"
#include "runtime/vm/template_build.hpp"

namespace solstice {

template_keeper_actor::behavior_type template_keeper(template_keeper_actor::pointer) {
  return {
    [=](template_atom, v1::ImageSpec image, const v1::RunnerConfig& config,
        const std::string& accel, bool build) -> caf::result<v1::ImageSpec, bool> {
      image.clear_restore_from();
      if (!build) {
        auto found = find_template(image, config, accel);
        if (!found)
          return caf::make_error(runner_errc::prepare_failed, found.error().message);
        if (*found)
          *image.mutable_restore_from() = std::move(**found);
        return {std::move(image), false};
      }
      auto ensured = ensure_template(image, config, accel);
      if (!ensured)
        return caf::make_error(runner_errc::prepare_failed, ensured.error().message);
      *image.mutable_restore_from() = std::move(ensured->restore);
      return {std::move(image), ensured->built};
    },
  };
}

}  // namespace solstice
