// Host loops over the per-thread logic of tree_logic.h: one iteration per CUDA thread, one
// row at a time (a row's links and depths play the CUDA block's shared memory).
#include <vector>

#include "tree/tree_logic.h"
#include "tree/tree_ops.h"

namespace fastdecode {
namespace tree {
namespace {

// A row's staged links and depths.
struct Row {
  std::vector<int32_t> link;
  std::vector<int16_t> depth;
  explicit Row(int64_t T) : link(T), depth(T) {}
  void stage(const int64_t* parents, int64_t T) {
    for (int64_t j = 0; j < T; ++j) stage_link(j, parents, link.data());
    depth_scan(T, link.data(), T, depth.data());
  }
};

}  // namespace

void verify_cpu(const int64_t* draft, const int64_t* parents, const int64_t* predicted, int64_t B,
                int64_t T, int64_t max_depth, int64_t* accept_len, int64_t* best_node,
                int64_t* path, int64_t* tokens) {
  std::vector<int32_t> link(T), node_path(max_depth + 1);
  std::vector<int16_t> depth(T);
  std::vector<uint8_t> match(T), accepted(T);
  const int64_t width = max_depth + 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* d = draft + b * T;
    const int64_t* q = predicted + b * T;
    for (int64_t j = 0; j < T; ++j) {
      stage_link(j, parents + b * T, link.data());
      stage_match(j, d, q, link.data(), match.data());
    }
    const int32_t best = verify_scan(T, link.data(), match.data(), max_depth, depth.data(),
                                     accepted.data());
    verify_path(best, depth.data(), link.data(), node_path.data());
    accept_len[b] = depth[best];
    best_node[b] = best;
    for (int64_t k = 0; k < width; ++k)
      verify_write(k, depth[best], best, node_path.data(), d, q, path + b * width,
                   tokens + b * width);
  }
}

void mask_cpu(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask) {
  const int64_t words = (T + 31) / 32;
  Row row(T);
  for (int64_t b = 0; b < B; ++b) {
    row.stage(parents + b * T, T);
    for (int64_t i = 0; i < T; ++i)
      for (int64_t w = 0; w < words; ++w)
        tree_mask_word(row.link.data(), row.depth.data(), T, i, w, mask + (b * T + i) * T);
  }
}

void positions_cpu(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                   int64_t* positions) {
  Row row(T);
  for (int64_t b = 0; b < B; ++b) {
    row.stage(parents + b * T, T);
    for (int64_t i = 0; i < T; ++i)
      positions[b * T + i] = prefix_len[b] + (row.depth[i] > 0 ? row.depth[i] : 0);
  }
}

void pack_cpu(const uint8_t* mask, int64_t B, int64_t T, int32_t* packed) {
  const int64_t words = (T + 31) / 32;
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t w = 0; w < words; ++w) packed[r * words + w] = pack_word(mask + r * T, T, w);
}

}  // namespace tree
}  // namespace fastdecode
