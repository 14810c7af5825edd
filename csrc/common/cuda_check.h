// Turns a failed kernel launch into a C++ exception (a RuntimeError in Python).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastdecode {

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastdecode: CUDA launch of ") + op +
                             " failed: " + cudaGetErrorString(err));
}

}  // namespace fastdecode
