// Per-thread logic of the draft-tree primitives, shared by the CUDA grid and the host loop.
//
// A draft tree of one batch row has T nodes; node 0 is the root (the last accepted token).
// parents[j] is the index of node j's parent, with 0 <= parents[j] < j for a real node j >= 1.
// Any other value (-2 is the documented padding value) makes j "not a node"; so does having a
// parent that is not a node. parents[0] is ignored: node 0 is always the root.
#pragma once

#include "common/hd.h"

namespace fastdecode {
namespace tree {

// Largest T any backend accepts (bounds the CUDA kernels' shared memory: at most 12 bytes a node).
constexpr int64_t kMaxNodes = 2048;
constexpr int32_t kNotANode = -2;
static_assert(kMaxNodes <= 32767, "depths are stored as int16");

// The parent of node j, -1 for the root, kNotANode where parents[j] breaks the tree rules.
FD_HD int32_t link_of(const int64_t* parents, int64_t j) {
  if (j == 0) return -1;
  const int64_t p = parents[j];
  return (p >= 0 && p < j) ? static_cast<int32_t>(p) : kNotANode;
}

// One thread per node: its parent link (for verify_tree also whether its draft token equals
// the parent's prediction). A row's links are staged once, then every pass reads them.
FD_HD void stage_link(int64_t j, const int64_t* parents, int32_t* link) {
  link[j] = link_of(parents, j);
}

FD_HD void stage_match(int64_t j, const int64_t* draft, const int64_t* predicted,
                       const int32_t* link, uint8_t* match) {
  match[j] = (link[j] >= 0 && draft[j] == predicted[link[j]]) ? 1 : 0;
}

// depth[j] from its parent's (parents precede children): -1 for a non-node, which includes
// nodes deeper than max_depth.
FD_HD void depth_step(int64_t j, const int32_t* link, int64_t max_depth, int16_t* depth) {
  const int32_t p = link[j];
  depth[j] = (p >= 0 && depth[p] >= 0 && depth[p] < max_depth) ? static_cast<int16_t>(depth[p] + 1)
                                                              : static_cast<int16_t>(-1);
}

// One thread per row: every node's depth (root 0, non-node -1).
FD_HD void depth_scan(int64_t T, const int32_t* link, int64_t max_depth, int16_t* depth) {
  depth[0] = 0;
  for (int64_t j = 1; j < T; ++j) depth_step(j, link, max_depth, depth);
}

// ---- verify_tree ---------------------------------------------------------------------------

// One thread per row, nodes in index order: depths and acceptance in one pass. Returns the
// best node: the deepest accepted one, the lowest index among equals.
FD_HD int32_t verify_scan(int64_t T, const int32_t* link, const uint8_t* match, int64_t max_depth,
                          int16_t* depth, uint8_t* accepted) {
  depth[0] = 0;
  accepted[0] = 1;
  int32_t best = 0;
  for (int64_t j = 1; j < T; ++j) {
    depth_step(j, link, max_depth, depth);
    accepted[j] = depth[j] >= 0 && accepted[link[j]] && match[j];
    if (accepted[j] && depth[j] > depth[best]) best = static_cast<int32_t>(j);
  }
  return best;
}

// The node indices from the root to best, written into path[0 .. depth[best]].
FD_HD void verify_path(int32_t best, const int16_t* depth, const int32_t* link, int32_t* path) {
  for (int32_t node = best; node >= 0; node = link[node]) path[depth[node]] = node;
}

// One thread per output column k in [0, max_depth]: path[k] and tokens[k], padded with -1.
// tokens holds the accepted draft tokens (the root excluded) and then the bonus prediction.
FD_HD void verify_write(int64_t k, int64_t accept_len, int32_t best, const int32_t* path,
                        const int64_t* draft, const int64_t* predicted, int64_t* out_path,
                        int64_t* out_tokens) {
  out_path[k] = k <= accept_len ? path[k] : -1;
  out_tokens[k] = k < accept_len ? draft[path[k + 1]] : (k == accept_len ? predicted[best] : -1);
}

// ---- tree_mask / pack_tree_mask / tree_positions --------------------------------------------

// Bits 0..31 of the ancestor-or-self row of node i, for key columns 32*w .. 32*w+31, from the
// staged links and depths. A non-node sees only itself.
FD_HD uint32_t ancestor_word(const int32_t* link, const int16_t* depth, int64_t i, int64_t w) {
  const int64_t lo = 32 * w;
  if (depth[i] < 0) return (i >= lo && i < lo + 32) ? (1u << (i - lo)) : 0u;
  uint32_t bits = 0;
  // Ancestors have smaller indices: stop once the walk drops below this word's columns.
  for (int64_t node = i; node >= lo; node = link[node])
    if (node < lo + 32) bits |= 1u << (node - lo);
  return bits;
}

// One thread per (row i, word w) of the mask: writes mask[i, 32w .. min(32w+32, T)).
FD_HD void tree_mask_word(const int32_t* link, const int16_t* depth, int64_t T, int64_t i,
                          int64_t w, uint8_t* row) {
  const uint32_t bits = ancestor_word(link, depth, i, w);
  const int64_t end = fd_min<int64_t>(32 * w + 32, T);
  for (int64_t j = 32 * w; j < end; ++j) row[j] = (bits >> (j - 32 * w)) & 1u;
}

// One thread per (row, word w): bit k of the result is row[32w + k].
FD_HD int32_t pack_word(const uint8_t* row, int64_t T, int64_t w) {
  uint32_t bits = 0;
  const int64_t end = fd_min<int64_t>(32 * w + 32, T);
  for (int64_t j = 32 * w; j < end; ++j) bits |= static_cast<uint32_t>(row[j] != 0) << (j - 32 * w);
  return static_cast<int32_t>(bits);
}

}  // namespace tree
}  // namespace fastdecode
