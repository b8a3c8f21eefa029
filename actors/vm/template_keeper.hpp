#pragma once
// Finds or builds an image's template for a job (see template_keeper_actor in
// actors.hpp). It blocks (hashing an image the first time, a template build for
// seconds to minutes): spawn it detached.
#include "actors/actors.hpp"

namespace solstice {

template_keeper_actor::behavior_type template_keeper(template_keeper_actor::pointer self);

}  // namespace solstice
