#pragma once
// The environment variables that select among a few settings of the CPU kernels (an
// instruction-set cap, an algorithm), for tests and measurements.

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace cifarnet {

// The value of `name`, one of `choices`, or nullptr where it is unset or empty. Any other
// value raises a ValueError naming the variable and the accepted values: a typo (AVX2 for avx2)
// would otherwise leave the default in force while the user measures "the capped CPU".
inline const char* env_setting(const char* name, std::initializer_list<const char*> choices) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return nullptr;
  std::string accepted;
  for (const char* choice : choices) {
    if (std::strcmp(value, choice) == 0) return choice;
    accepted += accepted.empty() ? choice : std::string(", ") + choice;
  }
  TORCH_CHECK_VALUE(false, name, " must be one of ", accepted, " (or unset), got '", value, "'");
}

}  // namespace cifarnet
