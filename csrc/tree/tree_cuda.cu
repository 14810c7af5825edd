// CUDA grids over the per-thread logic of tree_logic.h.
//
// verify_tree, tree_mask and tree_positions run one block per batch row: the block stages the
// row's jump words in shared memory, runs ceil(log2 T) pointer-jumping rounds (one
// __syncthreads each; every thread steps the nodes j = threadIdx.x + k * blockDim.x), then
// reads each node's depth, realness and acceptance from its final word.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "tree/tree_logic.h"
#include "tree/tree_ops.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the tree kernels need sm_80 or newer (__reduce_max_sync)"
#endif

namespace fastdecode {
namespace tree {
namespace {

constexpr int kThreads = 256;

// Threads of a one-block-per-row launch: whole warps covering `work` items, at most kThreads.
int row_threads(int64_t work) {
  return static_cast<int>(fd_min<int64_t>(((work + 31) / 32) * 32, kThreads));
}

// Dynamic shared memory, in this order: the double buffer of 2T jump words, then (tree_mask,
// verify_tree) T int16 links, then (verify_tree) max_depth + 1 int16 path nodes.
constexpr size_t jump_smem(int64_t T) { return size_t(2 * T) * sizeof(uint32_t); }
constexpr size_t mask_smem(int64_t T) { return jump_smem(T) + size_t(T) * sizeof(int16_t); }
constexpr size_t verify_smem(int64_t T, int64_t max_depth) {
  return mask_smem(T) + size_t(max_depth + 1) * sizeof(int16_t);
}
// max_depth < T, so this bounds every kernel (12 bytes a node): no opt-in beyond 48 KB needed.
static_assert(verify_smem(kMaxNodes, kMaxNodes - 1) <= 48 * 1024,
              "a row must fit the default 48 KB of shared memory");

// Pointer jumping over the words staged in cur[0, T), with next[0, T) as the other buffer.
// Call with the staging done by every thread (not yet synchronised); returns the final words,
// with the block synchronised.
__device__ const uint32_t* jump_row(uint32_t* cur, uint32_t* next, int64_t T) {
  __syncthreads();
  for (int round = jump_rounds(T); round > 0; --round) {
    for (int64_t j = threadIdx.x; j < T; j += blockDim.x) jump_step(j, cur, next);
    __syncthreads();
    uint32_t* const done = next;
    next = cur;
    cur = done;
  }
  return cur;
}

// One block per batch row. Its threads stage the links and words, jump, pick the best node by
// a max-reduction of verify_key (a warp reduction, then one shared atomic per warp); thread 0
// walks the accepted path (accept_len links), then the block writes the padded path and tokens.
__global__ void verify_kernel(const int64_t* __restrict__ draft, const int64_t* __restrict__ parents,
                              const int64_t* __restrict__ predicted, int64_t T, int64_t max_depth,
                              int64_t* __restrict__ accept_len, int64_t* __restrict__ best_node,
                              int64_t* __restrict__ path, int64_t* __restrict__ tokens) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* word = reinterpret_cast<uint32_t*>(smem);
  int16_t* link = reinterpret_cast<int16_t*>(word + 2 * T);
  int16_t* node_path = link + T;
  __shared__ uint32_t best_key;

  const int64_t b = blockIdx.x;
  const int64_t* d = draft + b * T;
  const int64_t* q = predicted + b * T;
  if (threadIdx.x == 0) best_key = 0;
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x)
    stage_verify_node(j, parents + b * T, d, q, link, word);
  const uint32_t* final_word = jump_row(word, word + T, T);

  uint32_t key = 0;
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x)
    key = max(key, verify_key(j, final_word[j], max_depth));
  key = __reduce_max_sync(0xFFFFFFFFu, key);
  if (threadIdx.x % 32 == 0) atomicMax(&best_key, key);
  __syncthreads();
  const int32_t best = key_node(best_key), len = key_depth(best_key);
  if (threadIdx.x == 0) {
    verify_path(best, len, link, node_path);
    accept_len[b] = len;
    best_node[b] = best;
  }
  __syncthreads();
  const int64_t width = max_depth + 1;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x)
    verify_write(k, len, best, node_path, d, q, path + b * width, tokens + b * width);
}

// Stages one row (its links too where `link` is not null) and jumps; returns the final words,
// with the block synchronised. `word` holds the 2T words of the double buffer.
__device__ const uint32_t* stage_row(const int64_t* parents, int64_t T, uint32_t* word,
                                     int16_t* link) {
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
    const int32_t l = stage_node(j, parents, word);
    if (link != nullptr) link[j] = static_cast<int16_t>(l);
  }
  return jump_row(word, word + T, T);
}

// One block per batch row; its threads cover the row's (node, word) pairs, each building the
// pair's 32 mask bytes in registers and storing them 16 bytes at a time where the layout allows.
__global__ void mask_kernel(const int64_t* __restrict__ parents, int64_t T,
                            uint8_t* __restrict__ mask) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* word = reinterpret_cast<uint32_t*>(smem);
  int16_t* link = reinterpret_cast<int16_t*>(word + 2 * T);
  const int64_t b = blockIdx.x, words = (T + 31) / 32;
  const bool vector_stores = mask_vector_stores(mask, T);
  const uint32_t* final_word = stage_row(parents + b * T, T, word, link);
  for (int64_t t = threadIdx.x; t < T * words; t += blockDim.x) {
    const int64_t i = t / words, w = t % words;
    tree_mask_word(link, jump_depth(final_word[i], T) >= 0, T, i, w, vector_stores,
                   mask + (b * T + i) * T);
  }
}

// One block per batch row; its threads cover the row's nodes.
__global__ void positions_kernel(const int64_t* __restrict__ parents,
                                 const int64_t* __restrict__ prefix_len, int64_t T,
                                 int64_t* __restrict__ positions) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  const uint32_t* final_word =
      stage_row(parents + b * T, T, reinterpret_cast<uint32_t*>(smem), nullptr);
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x)
    positions[b * T + i] = node_position(prefix_len[b], final_word[i]);
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
  verify_kernel<<<static_cast<unsigned>(B), row_threads(T), verify_smem(T, max_depth),
                  static_cast<cudaStream_t>(stream)>>>(draft, parents, predicted, T, max_depth,
                                                       accept_len, best_node, path, tokens);
  check_launch("verify_tree");
}

void mask_cuda(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask, void* stream) {
  if (B == 0) return;
  mask_kernel<<<static_cast<unsigned>(B), row_threads(T * ((T + 31) / 32)), mask_smem(T),
                static_cast<cudaStream_t>(stream)>>>(parents, T, mask);
  check_launch("tree_mask");
}

void positions_cuda(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                    int64_t* positions, void* stream) {
  if (B == 0) return;
  positions_kernel<<<static_cast<unsigned>(B), row_threads(T), jump_smem(T),
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
