// Host loop over compact_slice (one call per (tensor, b, h) slice) and the copy-unit choice.
#include <cstddef>
#include <cstdint>

#include "kv/compact_kv_ops.h"

namespace fastdecode {
namespace kv {
namespace {

bool divides(int64_t unit, int64_t x) { return x % unit == 0; }

template <typename Unit>
void compact_cpu_unit(const std::vector<TensorDesc>& descs, int64_t B, const int64_t* start,
                      const int64_t* src, int64_t src_width, const int64_t* count) {
  for (const TensorDesc& t : descs)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < t.heads; ++h)
        compact_slice<Unit>(t.base + b * t.stride_b + h * t.stride_h, t.stride_s, t.stride_col,
                            t.cols, t.seq, start[b], src + b * src_width, src_width, count[b]);
}

}  // namespace

int choose_unit(std::vector<TensorDesc>& descs, const std::vector<int64_t>& dim,
                const std::vector<int64_t>& stride_d, int64_t elem_size) {
  int64_t unit = 16;
  for (size_t i = 0; i < descs.size(); ++i) {
    const TensorDesc& t = descs[i];
    const bool dense_rows = dim[i] <= 1 || stride_d[i] == elem_size;
    int64_t best = dense_rows ? 16 : elem_size;
    while (best > 1 &&
           !(divides(best, reinterpret_cast<std::uintptr_t>(t.base)) && divides(best, t.stride_b) &&
             divides(best, t.stride_h) && divides(best, t.stride_s) &&
             divides(best, dim[i] * elem_size) && (dense_rows || divides(best, stride_d[i]))))
      best /= 2;
    if (best < unit) unit = best;
  }
  for (size_t i = 0; i < descs.size(); ++i) {
    const bool dense_rows = dim[i] <= 1 || stride_d[i] == elem_size;
    descs[i].cols = static_cast<int32_t>(dim[i] * elem_size / unit);
    // A tensor with spaced-out elements forces unit == elem_size (torch aligns every element).
    descs[i].stride_col = dense_rows ? unit : stride_d[i];
  }
  return static_cast<int>(unit);
}

void compact_cpu(const std::vector<TensorDesc>& descs, int unit, int64_t B, const int64_t* start,
                 const int64_t* src, int64_t src_width, const int64_t* count) {
  switch (unit) {
    case 16: return compact_cpu_unit<Unit16>(descs, B, start, src, src_width, count);
    case 8: return compact_cpu_unit<uint64_t>(descs, B, start, src, src_width, count);
    case 4: return compact_cpu_unit<uint32_t>(descs, B, start, src, src_width, count);
    case 2: return compact_cpu_unit<uint16_t>(descs, B, start, src, src_width, count);
    default: return compact_cpu_unit<uint8_t>(descs, B, start, src, src_width, count);
  }
}

}  // namespace kv
}  // namespace fastdecode
