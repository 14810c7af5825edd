// Shared by host and device code: one function body serves a CUDA thread and a host loop.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdecode {

template <typename T>
FD_HD T fd_min(T a, T b) { return a < b ? a : b; }

}  // namespace fastdecode
