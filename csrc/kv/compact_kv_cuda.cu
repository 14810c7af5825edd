// CUDA grid over compact_slice: one thread per (tensor, b, h, copy-unit column); one launch
// moves every tensor of the table (all layers' K and V).
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "kv/compact_kv_ops.h"

namespace fastdecode {
namespace kv {
namespace {

constexpr int kThreads = 256;

template <typename Unit>
__global__ void compact_kernel(const __grid_constant__ TensorTable table, int64_t B,
                               const int64_t* __restrict__ start, const int64_t* __restrict__ src,
                               int64_t src_width, const int64_t* __restrict__ count) {
  const TensorDesc& t = table.t[blockIdx.y];
  const int64_t n = B * t.heads * int64_t(t.cols);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % t.cols, bh = idx / t.cols, h = bh % t.heads, b = bh / t.heads;
    compact_slice<Unit>(t.base + b * t.stride_b + h * t.stride_h + c * t.stride_col, t.stride_s,
                        t.stride_col, 1, t.seq, start[b], src + b * src_width, src_width, count[b]);
  }
}

template <typename Unit>
void launch(const std::vector<TensorDesc>& descs, int64_t B, const int64_t* start,
            const int64_t* src, int64_t src_width, const int64_t* count, cudaStream_t stream) {
  for (size_t first = 0; first < descs.size(); first += kMaxTensorsPerLaunch) {
    const size_t n = std::min<size_t>(kMaxTensorsPerLaunch, descs.size() - first);
    TensorTable table{};
    int64_t widest = 0;
    for (size_t i = 0; i < n; ++i) {
      table.t[i] = descs[first + i];
      widest = std::max<int64_t>(widest, B * descs[first + i].heads * int64_t(descs[first + i].cols));
    }
    if (widest == 0) continue;
    const unsigned gx = static_cast<unsigned>(std::min<int64_t>((widest + kThreads - 1) / kThreads, 1 << 16));
    compact_kernel<Unit><<<dim3(gx, static_cast<unsigned>(n)), kThreads, 0, stream>>>(
        table, B, start, src, src_width, count);
    check_launch("compact_kv");
  }
}

}  // namespace

void compact_cuda(const std::vector<TensorDesc>& descs, int unit, int64_t B, const int64_t* start,
                  const int64_t* src, int64_t src_width, const int64_t* count, void* stream) {
  if (B == 0 || descs.empty()) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (unit) {
    case 16: return launch<Unit16>(descs, B, start, src, src_width, count, s);
    case 8: return launch<uint64_t>(descs, B, start, src, src_width, count, s);
    case 4: return launch<uint32_t>(descs, B, start, src, src_width, count, s);
    case 2: return launch<uint16_t>(descs, B, start, src, src_width, count, s);
    default: return launch<uint8_t>(descs, B, start, src, src_width, count, s);
  }
}

}  // namespace kv
}  // namespace fastdecode
