// One request's prompt counts, laid out for retrieval: an open-addressing table from node id to
// {count, the head of its counted children's list, its own record in its parent's list}, whose
// 16-byte slot holds everything a lookup needs (one cache line), and one array of children
// records {node, count, next} linked per parent. Counting a new node appends one record, so
// prompt insertion costs O(1) per node however the prompt arrives (at once, or step by step);
// a parent's list is usually one record long, so retrieval reads a node's counted children with
// about two cache misses.
#pragma once

#include <cstdint>
#include <vector>

#include "trie/child_map.h"

namespace fastdecode {
namespace trie {

class PromptCounts {
 public:
  struct Slot {
    uint32_t node = kNil;  // kNil: empty slot
    uint32_t count = 0;
    uint32_t head = kNil;  // first record of its counted children (kNil: none)
    uint32_t kid = kNil;   // its own record in its parent's list (kNil below the root)
  };
  struct Kid {
    uint32_t node, count, next;
  };

  PromptCounts() { reset(16); }

  const Slot* find(uint32_t node) const {
    for (size_t i = home(node);; i = (i + 1) & mask_) {
      const Slot& s = table_[i];
      if (s.node == node) return &s;
      if (s.node == kNil) return nullptr;
    }
  }
  uint32_t count(uint32_t node) const {
    const Slot* s = find(node);
    return s ? s->count : 0;
  }
  void prefetch(uint32_t node) const { __builtin_prefetch(&table_[home(node)]); }
  const Kid& kid(uint32_t k) const { return kids_[k]; }

  // +1 on node's count (saturating); parent is its parent (0: the root), already counted unless
  // the root. Returns true when the node was not counted before.
  bool add(uint32_t node, uint32_t parent) {
    bool created = false;
    Slot& s = slot(node, parent, &created);
    if (s.count != UINT32_MAX) set_count(s, s.count + 1);
    return created;
  }
  // Loading: counts a new node (false if it is counted already); its parent likewise.
  bool insert(uint32_t node, uint32_t parent, uint32_t count) {
    bool created = false;
    Slot& s = slot(node, parent, &created);
    if (created) set_count(s, count);
    return created;
  }

  const std::vector<uint32_t>& nodes() const { return order_; }  // in the order they came
  bool empty() const { return order_.empty(); }
  size_t bytes() const {
    return table_.capacity() * sizeof(Slot) + kids_.capacity() * sizeof(Kid) +
           order_.capacity() * sizeof(uint32_t);
  }

 private:
  size_t home(uint32_t node) const {  // Fibonacci hashing: the top bits of node * 2^64/phi
    return static_cast<size_t>((uint64_t{node} * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  void set_count(Slot& s, uint32_t count) {
    s.count = count;
    if (s.kid != kNil) kids_[s.kid].count = count;
  }
  Slot& slot(uint32_t node, uint32_t parent, bool* created) {
    if ((order_.size() + 1) * 2 > table_.size()) grow();
    size_t i = home(node);
    for (; table_[i].node != kNil; i = (i + 1) & mask_)
      if (table_[i].node == node) return table_[i];
    Slot& s = table_[i];
    s.node = node;
    order_.push_back(node);
    *created = true;
    if (parent != 0) {
      Slot* ps = const_cast<Slot*>(find(parent));
      if (ps) {
        s.kid = static_cast<uint32_t>(kids_.size());
        kids_.push_back(Kid{node, 0, ps->head});
        ps->head = s.kid;
      }
    }
    return s;
  }
  void reset(size_t capacity) {
    table_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    shift_ = 64;
    for (size_t c = capacity; c > 1; c >>= 1) --shift_;
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(table_);
    reset(old.size() * 2);
    for (const Slot& s : old) {
      if (s.node == kNil) continue;
      size_t i = home(s.node);
      while (table_[i].node != kNil) i = (i + 1) & mask_;
      table_[i] = s;
    }
  }

  std::vector<Slot> table_;
  std::vector<uint32_t> order_;
  std::vector<Kid> kids_;
  size_t mask_ = 0;
  int shift_ = 64;
};

}  // namespace trie
}  // namespace fastdecode
