#pragma once
// Lets protobuf messages travel as CAF message payloads: each is serialized with
// protobuf itself, so the actor wire format is the schema's binary encoding.
#include <string>
#include <type_traits>

#include <caf/error.hpp>
#include <caf/meta/load_callback.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/sec.hpp>
#include <google/protobuf/message.h>

#include "solstice.pb.h"

namespace solstice::v1 {

template <class Inspector, class Message>
typename Inspector::result_type inspect_protobuf(Inspector& f, Message& x, const char* name) {
  if constexpr (Inspector::reads_state) {
    auto bytes = x.SerializeAsString();
    return f(caf::meta::type_name(name), bytes);
  } else {
    std::string bytes;
    auto parse = caf::meta::load_callback([&]() -> caf::error {
      if (!x.ParseFromString(bytes))
        return caf::make_error(caf::sec::invalid_argument, std::string{"cannot parse "} + name);
      return caf::none;
    });
    return f(caf::meta::type_name(name), bytes, parse);
  }
}

#define SOLSTICE_PROTOBUF_INSPECT(type)                                        \
  template <class Inspector>                                                   \
  typename Inspector::result_type inspect(Inspector& f, type& x) {             \
    return inspect_protobuf(f, x, "solstice.v1." #type);                       \
  }

SOLSTICE_PROTOBUF_INSPECT(JobSpec)
SOLSTICE_PROTOBUF_INSPECT(ImageSpec)
SOLSTICE_PROTOBUF_INSPECT(RunnerConfig)
SOLSTICE_PROTOBUF_INSPECT(JobEvent)
SOLSTICE_PROTOBUF_INSPECT(JobResult)
SOLSTICE_PROTOBUF_INSPECT(StepResult)
SOLSTICE_PROTOBUF_INSPECT(OutputChunk)
SOLSTICE_PROTOBUF_INSPECT(VmHandle)
SOLSTICE_PROTOBUF_INSPECT(ProcessExit)
SOLSTICE_PROTOBUF_INSPECT(QmpEvent)

#undef SOLSTICE_PROTOBUF_INSPECT

}  // namespace solstice::v1
