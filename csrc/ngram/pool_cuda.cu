// CUDA grids over the per-thread logic of pool_logic.h. Insertions run one thread per batch
// row (a row's insertions are sequential by definition); lookup one thread per (row, entry).
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "ngram/pool_logic.h"
#include "ngram/pool_ops.h"

namespace fastdecode {
namespace ngram {
namespace {

// Rows are few (the batch), so row kernels use small blocks to spread them over more SMs.
constexpr int kRowThreads = 32;
constexpr int kThreads = 256;

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>(fd_min<int64_t>((n + threads - 1) / threads, int64_t(1) << 16));
}

// Row kernels: a grid-stride loop over the batch rows, one thread per row at a time.
__global__ void insert_kernel(Pool pool, int64_t B, int64_t M, const int64_t* __restrict__ keys,
                              const int64_t* __restrict__ values,
                              const uint8_t* __restrict__ valid) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x)
    insert_row(pool.row_of(b), M, keys + b * M, values + b * M * pool.W,
               valid ? valid + b * M : nullptr);
}

__global__ void harvest_kernel(Pool pool, int64_t B, int64_t width,
                               const int64_t* __restrict__ window,
                               const int64_t* __restrict__ new_tokens) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x)
    harvest_row(pool.row_of(b), width, window + b * pool.W * width, new_tokens + b * width);
}

__global__ void insert_sequence_kernel(Pool pool, int64_t B, int64_t L,
                                       const int64_t* __restrict__ seq,
                                       const int64_t* __restrict__ start,
                                       const int64_t* __restrict__ end) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x)
    insert_sequence_row(pool.row_of(b), L, seq + b * L, start[b], end[b]);
}

// Thread t covers row t / slots, entry t % slots; slots = max(G, 1) so that every row's count
// gets written (by its entry-0 thread) even when G == 0.
__global__ void lookup_kernel(Pool pool, int64_t B, const int64_t* __restrict__ keys,
                              int64_t* __restrict__ candidates, int64_t* __restrict__ out_count) {
  const int64_t slots = pool.G > 0 ? pool.G : 1;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * slots;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / slots, g = t % slots;
    const Pool row = pool.row_of(b);
    if (g < pool.G) lookup_entry(row, keys[b], g, candidates + (b * pool.G + g) * pool.W);
    if (g == 0) out_count[b] = lookup_count(row, keys[b]);
  }
}

}  // namespace

void insert_cuda(const Pool& pool, int64_t B, int64_t M, const int64_t* keys,
                 const int64_t* values, const uint8_t* valid, void* stream) {
  if (B == 0 || M == 0 || pool.G == 0) return;
  insert_kernel<<<blocks_for(B, kRowThreads), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      pool, B, M, keys, values, valid);
  check_launch("ngram_insert");
}

void harvest_cuda(const Pool& pool, int64_t B, int64_t width, const int64_t* window,
                  const int64_t* new_tokens, void* stream) {
  if (B == 0 || width == 0 || pool.G == 0) return;
  harvest_kernel<<<blocks_for(B, kRowThreads), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      pool, B, width, window, new_tokens);
  check_launch("ngram_harvest");
}

void insert_sequence_cuda(const Pool& pool, int64_t B, int64_t L, const int64_t* seq,
                          const int64_t* start, const int64_t* end, void* stream) {
  if (B == 0 || L == 0 || pool.G == 0) return;
  insert_sequence_kernel<<<blocks_for(B, kRowThreads), kRowThreads, 0,
                           static_cast<cudaStream_t>(stream)>>>(pool, B, L, seq, start, end);
  check_launch("ngram_insert_sequence");
}

void lookup_cuda(const Pool& pool, int64_t B, const int64_t* keys, int64_t* candidates,
                 int64_t* out_count, void* stream) {
  const int64_t n = B * (pool.G > 0 ? pool.G : 1);
  if (n == 0) return;
  lookup_kernel<<<blocks_for(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      pool, B, keys, candidates, out_count);
  check_launch("ngram_lookup");
}

}  // namespace ngram
}  // namespace fastdecode
