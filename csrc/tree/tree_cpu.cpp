// Host loops over the per-thread logic of tree_logic.h: one iteration per CUDA thread, one
// row at a time (a row's buffers play the CUDA block's shared memory). The pointer-jumping
// rounds step every node from the previous round's buffer, as the block does between two
// __syncthreads.
#include <algorithm>
#include <utility>
#include <vector>

#include "tree/tree_logic.h"
#include "tree/tree_ops.h"

namespace fastdecode {
namespace tree {
namespace {

// A row's staged links and its double buffer of jump words.
struct Row {
  std::vector<int16_t> link;
  std::vector<uint32_t> word;
  explicit Row(int64_t T) : link(T), word(2 * T) {}

  // Runs the rounds on the staged words word[0, T); returns the final words.
  const uint32_t* jump(int64_t T) {
    uint32_t* cur = word.data();
    uint32_t* next = cur + T;
    for (int round = jump_rounds(T); round > 0; --round) {
      for (int64_t j = 0; j < T; ++j) jump_step(j, cur, next);
      std::swap(cur, next);
    }
    return cur;
  }

  // Stages the links and words of a tree_mask / tree_positions row; returns the final words.
  const uint32_t* stage(const int64_t* parents, int64_t T) {
    for (int64_t j = 0; j < T; ++j) link[j] = static_cast<int16_t>(stage_node(j, parents, word.data()));
    return jump(T);
  }
};

}  // namespace

void verify_cpu(const int64_t* draft, const int64_t* parents, const int64_t* predicted, int64_t B,
                int64_t T, int64_t max_depth, int64_t* accept_len, int64_t* best_node,
                int64_t* path, int64_t* tokens) {
  Row row(T);
  std::vector<int16_t> node_path(max_depth + 1);
  const int64_t width = max_depth + 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* d = draft + b * T;
    const int64_t* q = predicted + b * T;
    for (int64_t j = 0; j < T; ++j)
      stage_verify_node(j, parents + b * T, d, q, row.link.data(), row.word.data());
    const uint32_t* final_word = row.jump(T);
    uint32_t key = 0;
    for (int64_t j = 0; j < T; ++j) key = std::max(key, verify_key(j, final_word[j], max_depth));
    const int32_t best = key_node(key), len = key_depth(key);
    verify_path(best, len, row.link.data(), node_path.data());
    accept_len[b] = len;
    best_node[b] = best;
    for (int64_t k = 0; k < width; ++k)
      verify_write(k, len, best, node_path.data(), d, q, path + b * width, tokens + b * width);
  }
}

void mask_cpu(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask) {
  const int64_t words = (T + 31) / 32;
  const bool vector_stores = mask_vector_stores(mask, T);
  Row row(T);
  for (int64_t b = 0; b < B; ++b) {
    const uint32_t* final_word = row.stage(parents + b * T, T);
    for (int64_t i = 0; i < T; ++i) {
      const bool real = jump_depth(final_word[i], T) >= 0;
      for (int64_t w = 0; w < words; ++w)
        tree_mask_word(row.link.data(), real, T, i, w, vector_stores, mask + (b * T + i) * T);
    }
  }
}

void positions_cpu(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                   int64_t* positions) {
  Row row(T);
  for (int64_t b = 0; b < B; ++b) {
    const uint32_t* final_word = row.stage(parents + b * T, T);
    for (int64_t i = 0; i < T; ++i) positions[b * T + i] = node_position(prefix_len[b], final_word[i]);
  }
}

void pack_cpu(const uint8_t* mask, int64_t B, int64_t T, int32_t* packed) {
  const int64_t words = (T + 31) / 32;
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t w = 0; w < words; ++w) packed[r * words + w] = pack_word(mask + r * T, T, w);
}

}  // namespace tree
}  // namespace fastdecode
