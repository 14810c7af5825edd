// Per-thread logic of compact_kv, shared by the CUDA grid and the host loop.
//
// For batch row b, rows start[b] + src[b, i] of a [B, H, S, D] cache tensor move to rows
// start[b] + i, for i < count[b]. src[b, :count[b]] is strictly increasing and non-negative, so
// src[b, i] >= i: a destination row is never a source row of a later i. Reading a chunk of
// source rows before writing that chunk is therefore correct in place, whatever the overlap.
#pragma once

#include "common/hd.h"

namespace fastdecode {
namespace kv {

// One cache tensor, in bytes: its data pointer and strides, and its rows cut into `cols`
// copy units of `unit` bytes each, `stride_col` bytes apart.
struct TensorDesc {
  char* base;
  int64_t stride_b, stride_h, stride_s, stride_col;
  int32_t heads, seq, cols, pad_;
};

// Tensors per CUDA launch: the table travels as a kernel parameter (14 KiB; CUDA >= 12.1 allows
// 32764 bytes of parameters on sm_70 and newer).
constexpr int kMaxTensorsPerLaunch = 256;
struct TensorTable {
  TensorDesc t[kMaxTensorsPerLaunch];
};
static_assert(sizeof(TensorTable) + 64 <= 32764, "compact_kv's table must fit a kernel parameter");

struct alignas(16) Unit16 {
  uint64_t lo, hi;
};

// Rows processed per read-then-write round: the reads of one round are independent, so a GPU
// thread keeps kChunk loads in flight instead of one.
constexpr int kChunk = 8;

// Moves columns [0, ncols) of one (b, h) slice. `slice` points at row 0, column 0 of it.
// A CUDA thread calls this for one column (ncols = 1); the host loop for a whole row.
// Rows outside [0, seq) are skipped and count is clamped to src_width, so unvalidated indices
// never touch memory out of bounds.
template <typename Unit>
FD_HD void compact_slice(char* slice, int64_t stride_s, int64_t stride_col, int64_t ncols,
                         int64_t seq, int64_t start, const int64_t* src, int64_t src_width,
                         int64_t count) {
  count = fd_min(count, src_width);
  for (int64_t i0 = 0; i0 < count; i0 += kChunk) {
    const int64_t n = fd_min<int64_t>(kChunk, count - i0);
    for (int64_t c = 0; c < ncols; ++c) {
      char* col = slice + c * stride_col;
      Unit buf[kChunk];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < kChunk; ++k) {
        const int64_t from = start + src[i0 + (k < n ? k : 0)];
        if (k < n && from >= 0 && from < seq) buf[k] = *reinterpret_cast<const Unit*>(col + from * stride_s);
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < kChunk; ++k) {
        const int64_t from = start + src[i0 + (k < n ? k : 0)];
        const int64_t to = start + i0 + k;
        if (k < n && from >= 0 && from < seq && to >= 0 && to < seq && to != from)
          *reinterpret_cast<Unit*>(col + to * stride_s) = buf[k];
      }
    }
  }
}

}  // namespace kv
}  // namespace fastdecode
