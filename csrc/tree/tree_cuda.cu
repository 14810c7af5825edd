// CUDA grids over the per-thread logic of tree_logic.h.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "tree/tree_logic.h"
#include "tree/tree_ops.h"

namespace fastdecode {
namespace tree {
namespace {

constexpr int kThreads = 256;

// Threads of a one-block-per-row launch: whole warps covering `work` items, at most kThreads.
int row_threads(int64_t work) {
  return static_cast<int>(fd_min<int64_t>(((work + 31) / 32) * 32, kThreads));
}

// Shared memory of stage_row: T int32 links and T int16 depths.
size_t row_smem(int64_t T) { return size_t(T) * (sizeof(int32_t) + sizeof(int16_t)); }

// One block per batch row. The block stages links and matches in shared memory in parallel,
// one thread scans the row (a parent always precedes its child), then the block writes the
// padded path and tokens in parallel.
__global__ void verify_kernel(const int64_t* __restrict__ draft, const int64_t* __restrict__ parents,
                              const int64_t* __restrict__ predicted, int64_t T, int64_t max_depth,
                              int64_t* __restrict__ accept_len, int64_t* __restrict__ best_node,
                              int64_t* __restrict__ path, int64_t* __restrict__ tokens) {
  extern __shared__ unsigned char smem[];
  int32_t* link = reinterpret_cast<int32_t*>(smem);
  int32_t* node_path = link + T;
  int16_t* depth = reinterpret_cast<int16_t*>(node_path + (max_depth + 1));
  uint8_t* match = reinterpret_cast<uint8_t*>(depth + T);
  uint8_t* accepted = match + T;
  __shared__ int32_t best;

  const int64_t b = blockIdx.x;
  const int64_t* d = draft + b * T;
  const int64_t* p = parents + b * T;
  const int64_t* q = predicted + b * T;
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
    stage_link(j, p, link);
    stage_match(j, d, q, link, match);  // reads only link[j], just written by this thread
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    best = verify_scan(T, link, match, max_depth, depth, accepted);
    verify_path(best, depth, link, node_path);
    accept_len[b] = depth[best];
    best_node[b] = best;
  }
  __syncthreads();
  const int64_t width = max_depth + 1;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x)
    verify_write(k, depth[best], best, node_path, d, q, path + b * width, tokens + b * width);
}

// Stages one row's links (in parallel) and depths (one thread) in shared memory: T int32 links,
// then T int16 depths. Ends with the block synchronised.
__device__ void stage_row(const int64_t* parents, int64_t T, int32_t* link, int16_t* depth) {
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) stage_link(j, parents, link);
  __syncthreads();
  if (threadIdx.x == 0) depth_scan(T, link, T, depth);
  __syncthreads();
}

// One block per batch row; its threads cover the row's (node, word) pairs.
__global__ void mask_kernel(const int64_t* __restrict__ parents, int64_t T,
                            uint8_t* __restrict__ mask) {
  extern __shared__ unsigned char smem[];
  int32_t* link = reinterpret_cast<int32_t*>(smem);
  int16_t* depth = reinterpret_cast<int16_t*>(link + T);
  const int64_t b = blockIdx.x, words = (T + 31) / 32;
  stage_row(parents + b * T, T, link, depth);
  for (int64_t t = threadIdx.x; t < T * words; t += blockDim.x) {
    const int64_t i = t / words, w = t % words;
    tree_mask_word(link, depth, T, i, w, mask + (b * T + i) * T);
  }
}

// One block per batch row; its threads cover the row's nodes.
__global__ void positions_kernel(const int64_t* __restrict__ parents,
                                 const int64_t* __restrict__ prefix_len, int64_t T,
                                 int64_t* __restrict__ positions) {
  extern __shared__ unsigned char smem[];
  int32_t* link = reinterpret_cast<int32_t*>(smem);
  int16_t* depth = reinterpret_cast<int16_t*>(link + T);
  const int64_t b = blockIdx.x;
  stage_row(parents + b * T, T, link, depth);
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x)
    positions[b * T + i] = prefix_len[b] + (depth[i] > 0 ? depth[i] : 0);
}

__global__ void pack_kernel(const uint8_t* __restrict__ mask, int64_t B, int64_t T,
                            int32_t* __restrict__ packed) {
  const int64_t words = (T + 31) / 32;
  const int64_t n = B * T * words;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x)
    packed[t] = pack_word(mask + (t / words) * T, T, t % words);
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(fd_min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

}  // namespace

void verify_cuda(const int64_t* draft, const int64_t* parents, const int64_t* predicted, int64_t B,
                 int64_t T, int64_t max_depth, int64_t* accept_len, int64_t* best_node,
                 int64_t* path, int64_t* tokens, void* stream) {
  if (B == 0) return;
  const size_t smem = size_t(T) * (4 + 2 + 1 + 1) + size_t(max_depth + 1) * 4;
  verify_kernel<<<static_cast<unsigned>(B), row_threads(T), smem, static_cast<cudaStream_t>(stream)>>>(
      draft, parents, predicted, T, max_depth, accept_len, best_node, path, tokens);
  check_launch("verify_tree");
}

void mask_cuda(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask, void* stream) {
  if (B == 0) return;
  mask_kernel<<<static_cast<unsigned>(B), row_threads(T * ((T + 31) / 32)), row_smem(T),
                static_cast<cudaStream_t>(stream)>>>(parents, T, mask);
  check_launch("tree_mask");
}

void positions_cuda(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                    int64_t* positions, void* stream) {
  if (B == 0) return;
  positions_kernel<<<static_cast<unsigned>(B), row_threads(T), row_smem(T),
                     static_cast<cudaStream_t>(stream)>>>(parents, prefix_len, T, positions);
  check_launch("tree_positions");
}

void pack_cuda(const uint8_t* mask, int64_t B, int64_t T, int32_t* packed, void* stream) {
  const int64_t n = B * T * ((T + 31) / 32);
  if (n == 0) return;
  pack_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(mask, B, T, packed);
  check_launch("pack_tree_mask");
}

}  // namespace tree
}  // namespace fastdecode
