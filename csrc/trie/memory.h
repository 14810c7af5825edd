// Memory for the trie's big, randomly accessed structures, on transparent huge pages where the
// kernel allows it (madvise mode): a retrieval touches ~100 random cache lines of a structure
// that can exceed 100 MiB, and with 4 KiB pages nearly every one of them is also a TLB miss.
//
//   * HugeAllocator: a std::allocator for vectors; blocks of 2 MiB or more are mmap'ed at a
//     2 MiB boundary and advised MADV_HUGEPAGE before the first touch, smaller ones use malloc.
//   * KidArena: the children arrays, in power-of-two size classes (one free list per class)
//     carved from chunks that grow geometrically up to 32 MiB (huge-page chunks from 2 MiB on),
//     so a small trie stays small. Arrays above the largest class get blocks of their own.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

namespace fastdecode {
namespace trie {

constexpr size_t kHugePage = size_t{2} << 20;

inline void* huge_alloc(size_t bytes) {
  if (bytes < kHugePage) {
    void* p = std::malloc(bytes ? bytes : 1);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const size_t size = (bytes + kHugePage - 1) & ~(kHugePage - 1);
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  // Keep the 2 MiB-aligned middle; unmap the slack on both sides.
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const size_t tail = start + size + kHugePage - (aligned + size);
  if (tail) munmap(reinterpret_cast<void*>(aligned + size), tail);
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // advisory: ignore failure
#endif
  return reinterpret_cast<void*>(aligned);
}

inline void huge_free(void* p, size_t bytes) {
  if (!p) return;
  if (bytes < kHugePage) {
    std::free(p);
    return;
  }
  munmap(p, (bytes + kHugePage - 1) & ~(kHugePage - 1));
}

template <typename T>
struct HugeAllocator {
  using value_type = T;
  HugeAllocator() = default;
  template <typename U>
  HugeAllocator(const HugeAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(huge_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { huge_free(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const HugeAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugeAllocator<U>&) const { return false; }
};

template <typename T>
class KidArena {
 public:
  KidArena() = default;
  KidArena(const KidArena&) = delete;
  KidArena& operator=(const KidArena&) = delete;
  ~KidArena() { release(); }

  // An array of `cap` elements; cap is a power of two.
  T* alloc(uint32_t cap) {
    const int c = size_class(cap);
    if (c > kMaxClass) return static_cast<T*>(huge_alloc(bytes_of(cap)));
    std::vector<T*>& list = free_[c];
    if (!list.empty()) {
      T* p = list.back();
      list.pop_back();
      return p;
    }
    const size_t need = bytes_of(cap);
    if (left_ < need) new_chunk(need);
    T* p = reinterpret_cast<T*>(cur_);
    cur_ += need;
    left_ -= need;
    return p;
  }

  void free(T* p, uint32_t cap) {
    if (!p) return;
    const int c = size_class(cap);
    if (c > kMaxClass) {
      huge_free(p, bytes_of(cap));
      return;
    }
    free_[c].push_back(p);
  }

  // Gives every chunk back (all arrays become invalid).
  void release() {
    for (auto& chunk : chunks_) huge_free(chunk.first, chunk.second);
    chunks_.clear();
    for (auto& list : free_) list.clear();
    cur_ = nullptr;
    left_ = 0;
    next_chunk_ = kFirstChunk;
  }

 private:
  static constexpr int kMaxClass = 16;  // arrays of up to 2^16 elements come from chunks
  static constexpr size_t kFirstChunk = size_t{64} << 10;
  static constexpr size_t kLastChunk = size_t{32} << 20;

  static size_t bytes_of(uint32_t cap) { return size_t{cap} * sizeof(T); }
  static int size_class(uint32_t cap) {
    int c = 0;
    while ((uint32_t{1} << c) < cap) ++c;
    return c;
  }
  void new_chunk(size_t need) {
    // The rest of the current chunk is dropped (lost until release; bounded by the largest
    // class, and chunks grow, so it is a small fraction).
    size_t size = next_chunk_;
    while (size < need) size *= 2;
    if (next_chunk_ < kLastChunk) next_chunk_ *= 2;
    cur_ = static_cast<char*>(huge_alloc(size));
    left_ = size;
    chunks_.emplace_back(cur_, size);
  }

  std::vector<T*> free_[kMaxClass + 1];
  std::vector<std::pair<void*, size_t>> chunks_;
  char* cur_ = nullptr;
  size_t left_ = 0;
  size_t next_chunk_ = kFirstChunk;
};

}  // namespace trie
}  // namespace fastdecode
