// Argument checks at the C++ boundary. Python validates first; these catch a caller that did not.
// std::invalid_argument becomes ValueError in Python (pybind11's standard translation).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastdecode {

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("fastdecode._C: " + what);
}

inline void require_ptr(std::uintptr_t ptr, int64_t numel, const char* name) {
  require(numel == 0 || ptr != 0, std::string(name) + " is a null pointer");
}

}  // namespace fastdecode
