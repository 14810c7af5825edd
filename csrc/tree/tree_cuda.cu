// CUDA grids over the per-thread logic of tree_logic.h.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "tree/tree_logic.h"
#include "tree/tree_ops.h"

namespace fastdecode {
namespace tree {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

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
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) verify_node(j, d, p, q, link, match);
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

__global__ void mask_kernel(const int64_t* __restrict__ parents, int64_t B, int64_t T,
                            uint8_t* __restrict__ mask) {
  const int64_t words = (T + 31) / 32;
  const int64_t n = B * T * words;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = t % words, r = t / words, b = r / T, i = r % T;
    tree_mask_word(parents + b * T, T, i, w, mask + r * T);
  }
}

__global__ void positions_kernel(const int64_t* __restrict__ parents,
                                 const int64_t* __restrict__ prefix_len, int64_t B, int64_t T,
                                 int64_t* __restrict__ positions) {
  const int64_t n = B * T;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / T;
    positions[t] = prefix_len[b] + node_depth(parents + b * T, t % T);
  }
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
  return static_cast<unsigned>(fd_min<int64_t>(blocks_for(n), int64_t(1) << 16));
}

}  // namespace

void verify_cuda(const int64_t* draft, const int64_t* parents, const int64_t* predicted, int64_t B,
                 int64_t T, int64_t max_depth, int64_t* accept_len, int64_t* best_node,
                 int64_t* path, int64_t* tokens, void* stream) {
  if (B == 0) return;
  const size_t smem = size_t(T) * (4 + 2 + 1 + 1) + size_t(max_depth + 1) * 4;
  const int threads = static_cast<int>(fd_min<int64_t>(((T + 31) / 32) * 32, kThreads));
  verify_kernel<<<static_cast<unsigned>(B), threads, smem, static_cast<cudaStream_t>(stream)>>>(
      draft, parents, predicted, T, max_depth, accept_len, best_node, path, tokens);
  check_launch("verify_tree");
}

void mask_cuda(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask, void* stream) {
  const int64_t n = B * T * ((T + 31) / 32);
  if (n == 0) return;
  mask_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(parents, B, T, mask);
  check_launch("tree_mask");
}

void positions_cuda(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                    int64_t* positions, void* stream) {
  const int64_t n = B * T;
  if (n == 0) return;
  positions_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      parents, prefix_len, B, T, positions);
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
