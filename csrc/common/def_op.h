// One binding per native op: def_op(m, name, doc, check, cpu, cuda) binds
//   fastdecode._C.<name>(device: str, stream: int, *args)
// where device is "cpu" or "cuda" and stream is the cudaStream_t as an integer (ignored on the
// CPU). The wrapper rejects the device first, then runs check(args...) once and one launcher,
// all with the GIL released:
//   * check returns void:   cpu(args...)      or cuda(args..., stream);
//   * check returns a value: cpu(value)        or cuda(value, stream).
// Pass the CUDA launcher through FASTDECODE_CUDA(...), which drops it in a build without CUDA,
// or pass NoCudaKernel{} for an op that only runs on the CPU.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/check.h"

namespace fastdecode {

// The CUDA launcher of an op that has none on any build.
struct NoCudaKernel {};
// The CUDA launcher of an op in a build compiled without CUDA.
struct CudaNotBuilt {};

#ifdef FASTDECODE_WITH_CUDA
#define FASTDECODE_CUDA(...) __VA_ARGS__
#else
#define FASTDECODE_CUDA(...) ::fastdecode::CudaNotBuilt{}
#endif

enum class Device { cpu, cuda };

// The device named by `device` for op `op`; throws when the name is unknown (ValueError) or
// the op cannot run on CUDA in this build (RuntimeError).
template <typename Cuda>
Device device_of(const std::string& device, const char* op) {
  if (device == "cpu") return Device::cpu;
  require(device == "cuda", std::string(op) + ": device must be 'cpu' or 'cuda', found '" +
                                device + "'");
  if constexpr (std::is_same_v<Cuda, NoCudaKernel>) {
    throw std::runtime_error("fastdecode._C: " + std::string(op) +
                             " has no CUDA kernel; it runs on the CPU only");
  } else if constexpr (std::is_same_v<Cuda, CudaNotBuilt>) {
    throw std::runtime_error("fastdecode._C: " + std::string(op) +
                             " cannot run on CUDA: this build of fastdecode._C has no CUDA "
                             "kernels (rebuild with nvcc available, or FASTDECODE_CUDA=1)");
  }
  return Device::cuda;
}

namespace detail {

template <typename Cuda>
constexpr bool kHasCuda =
    !std::is_same_v<Cuda, NoCudaKernel> && !std::is_same_v<Cuda, CudaNotBuilt>;

// Runs the launcher for `device`; device_of already refused CUDA where there is no launcher.
template <typename Cpu, typename Cuda, typename... A>
void launch(Device device, [[maybe_unused]] std::uintptr_t stream, const Cpu& cpu,
            [[maybe_unused]] const Cuda& cuda, const A&... a) {
  if (device == Device::cpu) {
    cpu(a...);
  } else if constexpr (kHasCuda<Cuda>) {
    cuda(a..., reinterpret_cast<void*>(stream));
  }
}

template <typename R, typename... Args>
struct Signature {};

template <typename R, typename... Args>
Signature<R, Args...> signature(R (*)(Args...)) {
  return {};
}

template <typename C, typename R, typename... Args>
Signature<R, Args...> signature(R (C::*)(Args...) const) {
  return {};
}

template <typename F>
auto signature(const F&) -> decltype(signature(&F::operator())) {
  return {};
}

template <typename Check, typename Cpu, typename Cuda, typename R, typename... Args>
void def_op(pybind11::module_& m, const char* name, const char* doc, Check check, Cpu cpu,
            Cuda cuda, Signature<R, Args...>) {
  m.def(
      name,
      [name, check, cpu, cuda](const std::string& device, std::uintptr_t stream, Args... args) {
        const Device d = device_of<Cuda>(device, name);
        if constexpr (std::is_void_v<R>) {
          check(args...);
          launch(d, stream, cpu, cuda, args...);
        } else {
          const R checked = check(args...);
          launch(d, stream, cpu, cuda, checked);
        }
      },
      pybind11::call_guard<pybind11::gil_scoped_release>(), doc);
}

}  // namespace detail

// Binds op `name`. check is a function or a lambda (not a generic one); cpu and cuda are
// lambdas (see the top of this file).
template <typename Check, typename Cpu, typename Cuda>
void def_op(pybind11::module_& m, const char* name, const char* doc, Check check, Cpu cpu,
            Cuda cuda) {
  detail::def_op(m, name, doc, check, cpu, cuda, detail::signature(check));
}

}  // namespace fastdecode
