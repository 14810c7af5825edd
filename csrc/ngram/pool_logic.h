// Per-thread logic of the n-gram pool of Jacobi lookahead decoding, shared by the CUDA grid and
// the host loop.
//
// One batch row of the pool maps a key token v in [0, V) to at most G entries of W = N-1 tokens
// each, most recently used first: entries g < count[v] of tokens[v, g, :] are in use, entry 0
// is the most recent. Slots past count[v] hold stale tokens that no lookup returns.
//
// Inserting (key, value): when value is an entry of key, it moves to the front; otherwise it
// goes in at the front, and when key already holds G entries the last (least recent) one drops.
// An insertion is skipped when G == 0 or when the key or any value token is outside [0, V):
// tokens are stored as int32, and nothing outside the pool is ever read or written.
//
// Insertions into one key must be applied in order, so one thread applies all of a row's
// insertions, in order: the result is exactly the same on every backend.
#pragma once

#include "common/hd.h"

namespace fastdecode {
namespace ngram {

// The pool of B rows: tokens [B, V, G, W] int32 and count [B, V] int32, contiguous. row_of(b)
// gives row b's own tokens [V, G, W] and count [V], with the same V, G, W.
struct Pool {
  int32_t* tokens;
  int32_t* count;
  int64_t V, G, W;

  FD_HD Pool row_of(int64_t b) const { return Pool{tokens + b * V * G * W, count + b * V, V, G, W}; }
};

// The W tokens of an n-gram's value: head[0], head[stride], ..., head[(W-2) * stride], then tail.
// Contiguous values have stride 1 and tail = head[W-1]; harvest's run down a window column and
// end with the newest token.
struct Value {
  const int64_t* head;
  int64_t stride;
  int64_t tail;
};

FD_HD int64_t token_at(const Value& value, int64_t W, int64_t k) {
  return k + 1 < W ? value.head[k * value.stride] : value.tail;
}

FD_HD bool in_vocab(int64_t token, int64_t V) { return token >= 0 && token < V; }

// Entries in use for key v of a row; a count outside [0, G] is clamped into it.
FD_HD int64_t used_of(const Pool& row, int64_t v) {
  const int64_t c = row.count[v];
  return c < 0 ? 0 : fd_min<int64_t>(c, row.G);
}

// Applies one insertion to a row (see the file comment).
FD_HD void insert(const Pool& row, int64_t key, const Value& value) {
  const int64_t G = row.G, W = row.W;
  if (G == 0 || !in_vocab(key, row.V)) return;
  for (int64_t k = 0; k < W; ++k)
    if (!in_vocab(token_at(value, W, k), row.V)) return;
  int32_t* entries = row.tokens + key * G * W;
  const int64_t used = used_of(row, key);
  int64_t hit = -1;
  for (int64_t g = 0; g < used && hit < 0; ++g) {
    bool same = true;
    for (int64_t k = 0; k < W && same; ++k) same = entries[g * W + k] == token_at(value, W, k);
    if (same) hit = g;
  }
  // Entries 0 .. front-1 move one slot back: the hit's own slot, or the first free one, or the
  // last one (whose entry drops) is overwritten.
  const int64_t front = hit >= 0 ? hit : fd_min<int64_t>(used, G - 1);
  for (int64_t g = front; g > 0; --g)
    for (int64_t k = 0; k < W; ++k) entries[g * W + k] = entries[(g - 1) * W + k];
  for (int64_t k = 0; k < W; ++k) entries[k] = static_cast<int32_t>(token_at(value, W, k));
  row.count[key] = static_cast<int32_t>(hit >= 0 ? used : fd_min<int64_t>(used + 1, G));
}

// ---- one thread per batch row: a row's insertions in order ---------------------------------

// insert: keys [M], values [M, W], valid [M] (nonzero: apply; null: all valid) of one row.
FD_HD void insert_row(const Pool& row, int64_t M, const int64_t* keys, const int64_t* values,
                      const uint8_t* valid) {
  const int64_t W = row.W;
  for (int64_t m = 0; m < M; ++m)
    if (valid == nullptr || valid[m] != 0)
      insert(row, keys[m], Value{values + m * W, 1, values[m * W + W - 1]});
}

// harvest: one row's Jacobi window [W, width] (level l, column j) and newest tokens [width].
// Column j in order: key window[0, j], value window[1 .. W-1, j] then newest[j].
FD_HD void harvest_row(const Pool& row, int64_t width, const int64_t* window,
                       const int64_t* newest) {
  // Level 1 starts the values; with W == 1 there is none, and the value is newest[j] alone.
  const int64_t* level1 = row.W > 1 ? window + width : window;
  for (int64_t j = 0; j < width; ++j)
    insert(row, window[j], Value{level1 + j, width, newest[j]});
}

// insert_sequence: every n-gram of seq [L] within [start, end) clipped to [0, L), in order of
// its first position i: key seq[i], value seq[i+1 .. i+W].
FD_HD void insert_sequence_row(const Pool& row, int64_t L, const int64_t* seq, int64_t start,
                               int64_t end) {
  const int64_t lo = start < 0 ? 0 : start, hi = fd_min<int64_t>(end, L);
  for (int64_t i = lo; i + row.W < hi; ++i)
    insert(row, seq[i], Value{seq + i + 1, 1, seq[i + row.W]});
}

// ---- lookup: one thread per (batch row, entry) ---------------------------------------------

// Entries of key in a row; 0 for a key outside [0, V).
FD_HD int64_t lookup_count(const Pool& row, int64_t key) {
  return in_vocab(key, row.V) ? used_of(row, key) : 0;
}

// Entry g of key (W tokens into out), or W times -1 where g is past the key's entries.
FD_HD void lookup_entry(const Pool& row, int64_t key, int64_t g, int64_t* out) {
  const bool live = g < lookup_count(row, key);
  const int32_t* entry = live ? row.tokens + (key * row.G + g) * row.W : nullptr;
  for (int64_t k = 0; k < row.W; ++k) out[k] = live ? entry[k] : -1;
}

}  // namespace ngram
}  // namespace fastdecode
