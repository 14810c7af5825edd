// The trie's edge index: (parent node, token) -> child node, one open-addressing hash table for
// every edge of the trie (the virtual root's edges included), so finding a child costs one probe
// sequence whatever the parent's fan-out.
//
// Linear probing over 16-byte slots (key and child side by side: one cache line per probe run),
// load factor at most 0.7 (on huge pages, memory.h), deletion by backward shift (no tombstones, so lookups stay short after
// any number of evictions). Keys pack the parent id (< 2^32 - 1) and the token as 32-bit halves;
// the all-ones key marks an empty slot.
#pragma once

#include <cstdint>
#include <vector>

#include "trie/memory.h"

namespace fastdecode {
namespace trie {

constexpr uint32_t kNil = 0xFFFFFFFFu;  // "no node"

class ChildMap {
 public:
  ChildMap() { reset(16); }

  uint32_t find(uint32_t parent, int32_t token) const {
    const uint64_t k = key(parent, token);
    for (size_t i = home(k);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == k) return s.child;
      if (s.key == kEmpty) return kNil;
    }
  }

  // Starts loading the cache line where a lookup of (parent, token) begins.
  void prefetch(uint32_t parent, int32_t token) const {
    __builtin_prefetch(&slots_[home(key(parent, token))]);
  }

  // Adds an edge that is not in the map.
  void insert(uint32_t parent, int32_t token, uint32_t child) {
    if ((size_ + 1) * 10 > slots_.size() * 7) rehash(slots_.size() * 2);
    place(key(parent, token), child);
    ++size_;
  }

  // Removes an edge if present.
  void erase(uint32_t parent, int32_t token) {
    const uint64_t k = key(parent, token);
    size_t i = home(k);
    for (;; i = (i + 1) & mask_) {
      if (slots_[i].key == k) break;
      if (slots_[i].key == kEmpty) return;
    }
    // Backward shift: pull later members of the probe run into the hole when their home slot
    // does not lie cyclically in (hole, their slot].
    for (size_t j = (i + 1) & mask_; slots_[j].key != kEmpty; j = (j + 1) & mask_) {
      const size_t h = home(slots_[j].key);
      const bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
      if (stays) continue;
      slots_[i] = slots_[j];
      i = j;
    }
    slots_[i] = Slot{};
    --size_;
  }

  void clear() { reset(16); }
  size_t size() const { return size_; }
  size_t bytes() const { return slots_.size() * sizeof(Slot); }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key = kEmpty;
    uint32_t child = kNil;
    uint32_t unused = 0;
  };

  static uint64_t key(uint32_t parent, int32_t token) {
    return (uint64_t{parent} << 32) | static_cast<uint32_t>(token);
  }
  // splitmix64's finaliser: every key bit reaches the low (index) bits.
  size_t home(uint64_t k) const {
    k ^= k >> 30;
    k *= 0xbf58476d1ce4e5b9ull;
    k ^= k >> 27;
    k *= 0x94d049bb133111ebull;
    k ^= k >> 31;
    return static_cast<size_t>(k) & mask_;
  }
  void place(uint64_t k, uint32_t child) {
    size_t i = home(k);
    while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
    slots_[i].key = k;
    slots_[i].child = child;
  }
  void reset(size_t capacity) {
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    size_ = 0;
  }
  void rehash(size_t capacity) {
    std::vector<Slot, HugeAllocator<Slot>> old;
    old.swap(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    for (const Slot& s : old)
      if (s.key != kEmpty) place(s.key, s.child);
  }

  std::vector<Slot, HugeAllocator<Slot>> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace trie
}  // namespace fastdecode
