// Launchers of compact_kv. start, count: [B] int64; src: [B, src_width] int64, contiguous.
#pragma once

#include <cstdint>
#include <vector>

#include "kv/compact_kv.h"

namespace fastdecode {
namespace kv {

// Cuts every tensor's rows of dim[i] elements (stride_d[i] bytes apart) into the widest copy unit
// (16, 8, 4, 2 or 1 bytes) that all tensors' alignment allows. Sets cols and stride_col of each
// desc and returns the unit's size in bytes.
int choose_unit(std::vector<TensorDesc>& descs, const std::vector<int64_t>& dim,
                const std::vector<int64_t>& stride_d, int64_t elem_size);

void compact_cpu(const std::vector<TensorDesc>& descs, int unit, int64_t B, const int64_t* start,
                 const int64_t* src, int64_t src_width, const int64_t* count);

#ifdef FASTDECODE_WITH_CUDA
// One launch per kMaxTensorsPerLaunch tensors.
void compact_cuda(const std::vector<TensorDesc>& descs, int unit, int64_t B, const int64_t* start,
                  const int64_t* src, int64_t src_width, const int64_t* count, void* stream);
#endif

}  // namespace kv
}  // namespace fastdecode
