// Per-thread logic of the draft-tree primitives, shared by the CUDA grid and the host loop.
//
// A draft tree of one batch row has T nodes; node 0 is the root (the last accepted token).
// parents[j] is the index of node j's parent, with 0 <= parents[j] < j for a real node j >= 1.
// Any other value (-2 is the documented padding value) makes j "not a node"; so does having a
// parent that is not a node. parents[0] is ignored: node 0 is always the root.
//
// Depths, realness and acceptance come from pointer jumping (see "pointer jumping" below): a
// CUDA block runs the rounds with one __syncthreads each, the host loop runs the same rounds
// node by node, from the same double buffer, so both backends compute with the same steps.
#pragma once

#include <cstring>

#include "common/hd.h"

namespace fastdecode {
namespace tree {

// Largest T any backend accepts (bounds the CUDA kernels' shared memory: at most 12 bytes a node).
constexpr int64_t kMaxNodes = 2048;
constexpr int32_t kNotANode = -2;
static_assert(kMaxNodes <= 0x7FFF, "node indices and depths are stored in 15 bits (and int16)");

// The parent of node j, -1 for the root, kNotANode where parents[j] breaks the tree rules.
FD_HD int32_t link_of(const int64_t* parents, int64_t j) {
  if (j == 0) return -1;
  const int64_t p = parents[j];
  return (p >= 0 && p < j) ? static_cast<int32_t>(p) : kNotANode;
}

// ---- pointer jumping ------------------------------------------------------------------------
//
// Every node j has a jump word, which covers the chain of links from j up to an ancestor `up`:
//   bits  0-15  up:   that ancestor; j itself where j's chain ends (the root, or a node whose
//                     own parent entry breaks the rules);
//   bits 16-30  dist: the number of links from j to up;
//   bit  31     kept: the AND of a per-node flag over j and its ancestors up to up (including
//                     up once up is the chain's end). The flag is 0 at a rule-breaking node.
// The first word covers j's link to its parent. A round replaces every word w (of node j) by
// jump_join(w, word[up]): up moves to up's own up, dist adds up and kept ANDs, so the covered
// chain doubles, or stops at the chain's end (whose word is a fixed point: up is itself, dist
// 0). A chain has at most T - 1 links, so after jump_rounds(T) rounds every word has reached
// its chain's end: dist is j's depth, and kept says whether the chain ends at the root with
// every flag set. A round reads only the previous round's words (a double buffer).

constexpr uint32_t kUpMask = 0xFFFFu;
constexpr uint32_t kDistMask = 0x7FFF0000u;
constexpr int kDistShift = 16;
constexpr uint32_t kKeptBit = 0x80000000u;

// Rounds that cover any chain of a T-node row: ceil(log2 T).
FD_HD int jump_rounds(int64_t T) {
  int rounds = 0;
  while ((int64_t(1) << rounds) < T) ++rounds;
  return rounds;
}

// Node j's first word: the link to its parent (none at the root or a rule-breaking node).
FD_HD uint32_t jump_seed(int64_t j, int32_t link, bool flag) {
  const uint32_t up = static_cast<uint32_t>(link >= 0 ? link : j);
  const uint32_t dist = link >= 0 ? 1u : 0u;
  return up | (dist << kDistShift) | (flag ? kKeptBit : 0u);
}

// Word w followed by the word u of w's up. Two dists of one chain sum to at most T - 1, so the
// sum stays within its 15 bits.
FD_HD uint32_t jump_join(uint32_t w, uint32_t u) {
  return (u & kUpMask) | ((w & kDistMask) + (u & kDistMask)) | (w & u & kKeptBit);
}

// One thread per node, once per round: next[j] from the previous round's words.
FD_HD void jump_step(int64_t j, const uint32_t* cur, uint32_t* next) {
  const uint32_t w = cur[j];
  next[j] = jump_join(w, cur[w & kUpMask]);
}

// The depth of a node from its final word: -1 for a non-node, which includes a node whose
// flag chain is broken and one deeper than max_depth.
FD_HD int32_t jump_depth(uint32_t w, int64_t max_depth) {
  const int32_t dist = static_cast<int32_t>((w & kDistMask) >> kDistShift);
  return (w & kKeptBit) && dist <= max_depth ? dist : -1;
}

// ---- tree_positions / tree_mask staging -----------------------------------------------------

// One thread per node: node j's first word, its flag "j obeys the rules"; returns j's link.
FD_HD int32_t stage_node(int64_t j, const int64_t* parents, uint32_t* word) {
  const int32_t link = link_of(parents, j);
  word[j] = jump_seed(j, link, link != kNotANode);
  return link;
}

// One thread per node: prefix_len plus the node's depth (0 for a non-node).
FD_HD int64_t node_position(int64_t prefix_len, uint32_t final_word) {
  const int32_t depth = jump_depth(final_word, kMaxNodes);
  return prefix_len + (depth > 0 ? depth : 0);
}

// ---- verify_tree ----------------------------------------------------------------------------

// One thread per node: node j's link and first word, whose flag is "j is the root, or obeys
// the rules and its draft token is its parent's prediction". A final word with depth >= 0 is
// then an accepted node: a real one, at most max_depth deep, every token on its path matching.
FD_HD void stage_verify_node(int64_t j, const int64_t* parents, const int64_t* draft,
                             const int64_t* predicted, int16_t* link, uint32_t* word) {
  const int32_t l = link_of(parents, j);
  link[j] = static_cast<int16_t>(l);
  word[j] = jump_seed(j, l, l == -1 || (l >= 0 && draft[j] == predicted[l]));
}

// The best node is the accepted one with the largest key: the deepest, the lowest index among
// equals. A non-accepted node's key is 0, below every accepted key (>= 0x10000 - kMaxNodes);
// the root (key 0xFFFF) is always accepted.
FD_HD uint32_t verify_key(int64_t j, uint32_t final_word, int64_t max_depth) {
  const int32_t depth = jump_depth(final_word, max_depth);
  return depth < 0 ? 0u : (static_cast<uint32_t>(depth) << 16) | (0xFFFFu - static_cast<uint32_t>(j));
}

FD_HD int32_t key_node(uint32_t key) { return static_cast<int32_t>(0xFFFFu - (key & 0xFFFFu)); }
FD_HD int32_t key_depth(uint32_t key) { return static_cast<int32_t>(key >> 16); }

// One thread: the node indices from the root to best (accept_len links deep, all of them
// valid), written into path[0 .. accept_len].
FD_HD void verify_path(int32_t best, int32_t accept_len, const int16_t* link, int16_t* path) {
  int32_t node = best;
  for (int32_t k = accept_len; k > 0; --k) {
    path[k] = static_cast<int16_t>(node);
    node = link[node];
  }
  path[0] = static_cast<int16_t>(node);  // the root
}

// One thread per output column k in [0, max_depth]: path[k] and tokens[k], padded with -1.
// tokens holds the accepted draft tokens (the root excluded) and then the bonus prediction.
FD_HD void verify_write(int64_t k, int32_t accept_len, int32_t best, const int16_t* path,
                        const int64_t* draft, const int64_t* predicted, int64_t* out_path,
                        int64_t* out_tokens) {
  out_path[k] = k <= accept_len ? path[k] : -1;
  out_tokens[k] = k < accept_len ? draft[path[k + 1]] : (k == accept_len ? predicted[best] : -1);
}

// ---- tree_mask / pack_tree_mask -------------------------------------------------------------

// Bits 0..31 of the ancestor-or-self row of node i, for key columns 32*w .. 32*w+31, from the
// staged links. A non-node sees only itself.
FD_HD uint32_t ancestor_word(const int16_t* link, bool real, int64_t i, int64_t w) {
  const int64_t lo = 32 * w;
  if (!real) return (i >= lo && i < lo + 32) ? (1u << (i - lo)) : 0u;
  uint32_t bits = 0;
  // Ancestors have smaller indices: stop once the walk drops below this word's columns.
  for (int64_t node = i; node >= lo; node = link[node])
    if (node < lo + 32) bits |= 1u << (node - lo);
  return bits;
}

// Four mask bytes (0/1) from the low four bits: byte k of the little-endian result is bit k.
// The multiply moves bit k to bit 8k; its partial products never overlap, so nothing carries.
FD_HD uint32_t nibble_bytes(uint32_t bits) { return ((bits & 0xFu) * 0x00204081u) & 0x01010101u; }

// dst[k] = bit k of bits for k < 16, as one 16-byte store (dst 16-byte aligned).
FD_HD void store_16_bytes(uint8_t* dst, uint32_t bits) {
  const uint32_t a = nibble_bytes(bits), b = nibble_bytes(bits >> 4), c = nibble_bytes(bits >> 8),
                 d = nibble_bytes(bits >> 12);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(a, b, c, d);
#else
  const uint32_t quad[4] = {a, b, c, d};
  std::memcpy(dst, quad, sizeof quad);
#endif
}

// Whether the rows of a [B, T, T] mask at `mask` take 16-byte stores: every row and word then
// starts 16-byte aligned and a word's columns are 16 or 32 bytes.
FD_HD bool mask_vector_stores(const uint8_t* mask, int64_t T) {
  return T % 16 == 0 && reinterpret_cast<uintptr_t>(mask) % 16 == 0;
}

// One thread per (row i, word w) of the mask: writes row[32w .. min(32w+32, T)), in 16-byte
// stores where `vector_stores` (mask_vector_stores), else byte by byte.
FD_HD void tree_mask_word(const int16_t* link, bool real, int64_t T, int64_t i, int64_t w,
                          bool vector_stores, uint8_t* row) {
  const uint32_t bits = ancestor_word(link, real, i, w);
  uint8_t* out = row + 32 * w;
  const int64_t n = fd_min<int64_t>(32, T - 32 * w);
  if (vector_stores) {
    for (int64_t k = 0; k < n; k += 16) store_16_bytes(out + k, bits >> k);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = (bits >> k) & 1u;
  }
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
