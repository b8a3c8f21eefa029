#include <doctest/doctest.h>

#include "runtime/job/job_result.hpp"

using namespace solstice;

// A job a cluster node refuses for what it asks ends INVALID_INPUT: exit code 2,
// like bad input to `run`, not 125 (an infrastructure error).
TEST_CASE("an invalid-input result gives exit code 2") {
  CHECK(exit_code_for(v1::INVALID_INPUT, 0) == exit_invalid_input);
  CHECK(exit_invalid_input == 2);
  auto refused = stand_in_result("job-1", 0, v1::INVALID_INPUT, "node-1 refuses job job-1");
  CHECK(refused.result().exit_code() == 2);
}
