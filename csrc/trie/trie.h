// The token trie of trie-based ("Ant") lookahead decoding: a bounded, thread-safe store of the
// n-grams seen in prompts and in generated outputs, from which each decoding step retrieves a
// draft tree for tree verification (see fastdecode/decoding/trie_cache.py for the user-facing
// semantics).
//
// Structure. One trie under a virtual root (node 0): a path root -> t0 -> t1 -> ... -> tk means
// the tokens t0..tk occurred in a row. Inserting a sequence inserts its window of W = match_len +
// branch_length tokens at every start position (shorter at the end, at least 2 tokens), so a
// context of up to match_len tokens matched below the root still has branch_length tokens of
// continuation below it.
//
// Counts. A node counts the windows that passed through it:
//   * output count (global, a saturating uint32): windows of source "output", shared by all
//     requests, so repeated workloads warm up;
//   * prompt count per request: windows of source "prompt" inserted for that request, released
//     by end_request. A node holding some request's prompt count is "pinned" (never evicted).
// A request ranks a node by (its own prompt count, output count), compared lexicographically:
// the order of the mix (1 - w) * prompt + w * output with w = 1e-4, where the prompt count
// always decides first. Other requests' prompt counts are invisible to it; a node with neither
// count is dead for it (not matched, not drafted). Along any path both counts never grow
// downwards (every window through a child passes through its parent).
//
// Storage, designed for retrieval. Nodes live in one contiguous pool (32-bit ids, a free list).
// Each node keeps its children in one array of {output count, token, child, the child's own
// array and its size} entries sorted by output count, descending; a count increment swaps the
// entry to the front of its run of equal counts (binary search), so the array stays sorted in
// O(log fan-out). Edge lookup by token uses one global hash table (child_map.h). Retrieval is a
// bounded best-first expansion: a heap of at most ~2 * max_nodes candidates, where popping a
// node pushes only its best child and its next-best sibling, so a tree of K nodes costs
// O(K log K) and touches O(K) cache lines whatever the trie's size or fan-out: expanding a
// child reads only its array (its entry already says where that is), prefetched as soon as the
// child becomes a candidate. The pool, the hash table and the arrays sit on transparent huge
// pages where the kernel allows (memory.h), which spares a TLB miss on most of those lines.
// A request's prompt counts are a separate flat table (prompt_counts.h).
//
// Memory bound. At most max_nodes_total nodes (the virtual root not counted) exist at any time.
// Eviction is least recently used, of leaves only: unpinned nodes sit in a recency list, and
// every insertion moves its window's path to the most recent end from the deepest node up, so
// a parent is always more recent than its children and the least recent node is always a leaf.
// Before a window adds nodes that do not fit, the path it already matched is refreshed and the
// least recent leaves are evicted; when pinned prompt nodes leave too little room, the window is
// cut short (the bound is never exceeded). end_request unpins the request's nodes and deletes
// those that no longer hold any count.
//
// Threads. A reader-writer lock: retrievals, counts and serialisation share it, insertions,
// end_request and clear take it exclusively. Every count update happens under the exclusive
// lock, so concurrent insertions never lose a count.
#pragma once

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "trie/child_map.h"
#include "trie/memory.h"
#include "trie/prompt_counts.h"

namespace fastdecode {
namespace trie {

constexpr int64_t kNoRequest = -1;        // the request id Python's request_id=None maps to
constexpr int64_t kMaxTreeNodes = 2048;   // largest retrieved tree (fastdecode.ops.tree's limit)
constexpr int64_t kMaxMatchLen = 64;
constexpr int64_t kMaxBranchLength = 1024;
constexpr int64_t kMaxNodesTotal = (int64_t{1} << 31) - 2;
constexpr int64_t kMaxVocab = (int64_t{1} << 31) - 1;  // tokens are stored as int32

enum class Mode : int { kHier = 0, kParallel = 1 };

struct Config {
  int64_t vocab_size = 0;
  int64_t match_len = 2;
  int64_t branch_length = 12;
  int64_t decoding_length = 64;  // retrieval's default max_nodes (kept for persistence)
  int64_t max_nodes_total = int64_t{1} << 20;
  std::vector<int64_t> eos;      // insertions are cut at the first of these tokens

  int64_t window() const { return match_len + branch_length; }
  void validate() const;  // throws std::invalid_argument
};

struct Stats {
  int64_t nodes = 0;            // live nodes (root excluded)
  int64_t pinned = 0;           // nodes holding some request's prompt count
  int64_t requests = 0;         // requests with prompt counts
  int64_t evictions = 0;        // nodes evicted by the budget since construction / clear
  int64_t truncated = 0;        // windows cut short because pinned nodes filled the budget
  int64_t windows = 0;          // windows inserted
  int64_t bytes = 0;            // approximate heap bytes of the structure
};

class Trie {
 public:
  explicit Trie(Config config);
  ~Trie();
  Trie(const Trie&) = delete;
  Trie& operator=(const Trie&) = delete;

  const Config& config() const { return cfg_; }

  // Inserts the windows of tokens[0, n) (cut at the first EOS). prompt: counts go to `request`'s
  // prompt counts; else to the global output counts (request unused).
  void insert(const int64_t* tokens, int64_t n, bool prompt, int64_t request);

  // Releases a request's prompt counts; returns the number of nodes it held (0 if unknown).
  int64_t end_request(int64_t request);

  // Writes a draft tree for context ctx[0, n) into tokens[0, T) and parents[0, T), T <=
  // max_nodes, and returns T (>= 1: node 0 is ctx[n-1] with parent -1).
  int64_t retrieve(const int64_t* ctx, int64_t n, int64_t max_nodes, int64_t max_depth,
                   Mode mode, int64_t request, int64_t* tokens, int64_t* parents) const;

  // Many contexts under one lock. Row b reads ctx[b][0, n[b]) and is written at stride
  // max_nodes into tokens/parents [B, max_nodes], padded with token 0 and parent -2 past its own
  // tree; then, unless `fixed`, the rows are compacted in place to stride T = the largest tree
  // (1 when B == 0), so the buffers' first B * T elements hold a [B, T] matrix. Returns T
  // (max_nodes when fixed).
  int64_t retrieve_batch(const std::vector<const int64_t*>& ctx, const std::vector<int64_t>& n,
                         int64_t max_nodes, int64_t max_depth, Mode mode,
                         const std::vector<int64_t>& requests, int64_t* tokens, int64_t* parents,
                         bool fixed) const;

  // Many contexts under one lock: row b's likeliest continuation of ctx[b][0, n[b]) as a chain.
  // For each context length k from min(match_len, n[b]) down to 1 whose path the request sees,
  // and each count source (the request's own counts, then the shared output counts), a chain
  // follows the child of largest count in that source while the running product of
  // count(child) / count(parent) stays >= min_prob, for at most min(max_len, ceil(k *
  // match_factor)) tokens (match_factor <= 0: max_len). A chain's score is the sum of its
  // running products (its expected accepted drafts if those ratios were the chances); row b
  // gets the best-scored chain (ties: the longer context, then the request's counts), written
  // to tokens/probs [B, max_len] (running products; token 0 and probability 0 past its end),
  // its length to lengths[b] and its context length to matched[b] (0: no chain).
  void draft_chains(const std::vector<const int64_t*>& ctx, const std::vector<int64_t>& n,
                    const std::vector<int64_t>& requests, int64_t max_len, double min_prob,
                    double match_factor, int64_t* tokens, double* probs, int64_t* lengths,
                    int64_t* matched) const;

  // The count of the node at path[0, n) below the root: the output count, or `request`'s
  // prompt count; 0 when there is no such node.
  int64_t count(const int64_t* path, int64_t n, bool prompt, int64_t request) const;

  Stats stats() const;
  void clear();

  // Versioned binary image (see trie_io.cpp) and its inverse, which validates everything and
  // throws std::invalid_argument on any defect.
  std::string serialize() const;
  static std::unique_ptr<Trie> deserialize(const char* data, size_t size);

  // Checks every structural invariant (for tests); throws std::logic_error naming the first
  // broken one.
  void check_invariants() const;

  // For benchmarks: seconds that `iters` back-to-back retrieve() calls of one context take.
  double time_retrieve(const int64_t* ctx, int64_t n, int64_t max_nodes, int64_t max_depth,
                       Mode mode, int64_t request, int64_t iters) const;

 private:
  struct Entry {          // a child in its parent's sorted array
    uint32_t count;       // the child's output count
    int32_t token;
    uint32_t node;
    uint32_t nkids : 31;  // copies of the child's Node::nkids, Node::kids and (Node::pins > 0),
    uint32_t pinned : 1;  // so that retrieval expands a child without touching its Node (one
    Entry* kids;          // cache miss, prefetched when the child becomes a candidate)
  };
  struct Node {
    Entry* kids = nullptr;  // sorted by count, descending
    uint32_t nkids = 0, cap = 0;
    uint32_t parent = kNil, pos = 0;  // pos: index of this node's entry in the parent's array
    uint32_t prev = kNil, next = kNil;  // recency list links (kNil: not listed)
    uint32_t pins = 0;  // requests holding a prompt count here
    int32_t token = 0;
    uint16_t depth = 0;
    bool listed = false;
  };
  using Request = PromptCounts;  // one request's prompt counts (prompt_counts.h)
  struct Scratch;  // per-thread retrieval buffers (trie.cpp)
  friend struct Scratch;
  struct Cursor;

  // Lock-free internals (callers hold the lock).
  uint32_t output_count(uint32_t id) const {
    const Node& n = nodes_[id];
    return nodes_[n.parent].kids[n.pos].count;
  }
  uint32_t prompt_count(const Request* req, uint32_t id) const;
  static bool has_prompts(const Request* req) { return req && !req->empty(); }
  bool live(const Request* req, uint32_t id) const;
  const Request* find_request(int64_t request) const;
  uint32_t walk(const int64_t* path, int64_t n) const;  // node at path or kNil
  uint32_t match(const int64_t* path, int64_t n, const Request* req) const;

  uint32_t create(uint32_t parent, int32_t token);
  void remove(uint32_t id);
  void bump_output(uint32_t id);
  void add_prompt(Request& req, uint32_t id);
  void push_recent(uint32_t id);
  void unlist(uint32_t id);
  void touch(uint32_t id);
  int64_t evict(int64_t wanted, int64_t keep);
  void insert_window(const int64_t* w, int64_t len, Request* req);
  void reserve_kid(Node& n);
  void free_all();

  int64_t retrieve_locked(const int64_t* ctx, int64_t n, int64_t max_nodes, int64_t max_depth,
                          Mode mode, const Request* req, int64_t* tokens,
                          int64_t* parents) const;
  int64_t follow(uint32_t node, bool own, const Request* req, int64_t limit, double min_prob,
                 int32_t* tokens, double* probs, double* score) const;
  int64_t build_hier(uint32_t root, int64_t max_nodes, int64_t max_depth, const Request* req,
                     Scratch& s) const;
  int64_t build_parallel(uint32_t root, int64_t max_nodes, int64_t max_depth,
                         const Request* req, Scratch& s) const;
  void open_cursor(uint32_t id, const Entry* kids, uint32_t nkids, bool pinned,
                   const Request* req, Scratch& s, uint32_t prefetch) const;
  bool next_child(size_t cursor, Scratch& s, const Entry** child, uint64_t* key) const;
  void mirror(uint32_t id);  // refresh the copies of id's children array in its parent's entry

  void check_vocab(const int64_t* tokens, int64_t n, const char* what) const;

  Config cfg_;
  mutable std::shared_mutex mu_;
  std::vector<Node, HugeAllocator<Node>> nodes_;  // [0]: the root, the recency list's sentinel
  KidArena<Entry> arena_;         // the children arrays
  std::vector<uint32_t> free_;    // recycled ids
  ChildMap map_;
  std::unordered_map<int64_t, Request> requests_;
  std::vector<uint32_t> path_;    // insert_window's scratch (exclusive lock)
  int64_t live_ = 0, listed_ = 0, pinned_ = 0;
  int64_t evictions_ = 0, truncated_ = 0, windows_ = 0;
  int64_t kid_slots_ = 0;         // Entry slots allocated in all children arrays
};

}  // namespace trie
}  // namespace fastdecode
