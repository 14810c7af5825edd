// The trie of trie-based lookahead decoding: insertion, eviction, request release and draft-tree
// retrieval (see trie.h for the design; persistence lives in trie_io.cpp).
#include "trie/trie.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/check.h"

namespace fastdecode {
namespace trie {

namespace {

std::string range_text(int64_t lo, int64_t hi) {
  return "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

void require_in(int64_t v, int64_t lo, int64_t hi, const char* name) {
  require(v >= lo && v <= hi,
          std::string(name) + " must be in " + range_text(lo, hi) + ", found " + std::to_string(v));
}

}  // namespace

void Config::validate() const {
  require_in(vocab_size, 1, kMaxVocab, "vocab_size");
  require_in(match_len, 1, kMaxMatchLen, "match_len");
  require_in(branch_length, 1, kMaxBranchLength, "branch_length");
  require_in(decoding_length, 1, kMaxTreeNodes, "decoding_length");
  require_in(max_nodes_total, 1, kMaxNodesTotal, "max_nodes_total");
  for (int64_t t : eos)
    require(t >= 0 && t < vocab_size, "eos token " + std::to_string(t) +
                                          " is outside the vocabulary [0, " +
                                          std::to_string(vocab_size) + ")");
}

// ---- retrieval scratch ------------------------------------------------------------------------

constexpr uint32_t kPrefetchKids = 3;  // hier: children whose arrays a new cursor prefetches
constexpr uint32_t kScanKids = 8;      // children searched in place for a prompt child's entry
constexpr int64_t kChainWindow = 4;    // parallel: chains grown side by side

// The children of one node in rank order for one request: first the children holding the
// request's prompt count (sorted by key), then the array entries with a positive output count
// that are not among them (the array is already sorted by output count).
struct Trie::Cursor {
  const Entry* kids;
  uint32_t nkids, next;
  uint32_t pbeg, pend, pnext;  // the node's prompt children: Scratch::prompt[pbeg, pend)
};

namespace {

template <typename E>
struct Candidate {
  uint64_t key;      // (prompt count << 32) | output count
  const E* entry;    // the node's entry in its parent's array
  int32_t parent;    // slot of the parent in the tree being built
  uint32_t cursor;   // the parent's cursor, for the next sibling
  uint32_t seq;      // push order: ties go to the earlier push (the better-ranked sibling)
  int32_t depth;
};

struct HeapOrder {  // std heaps are max-heaps: "a < b" means b pops first
  template <typename C>
  bool operator()(const C& a, const C& b) const {
    return a.key < b.key || (a.key == b.key && a.seq > b.seq);
  }
};

}  // namespace

struct Trie::Scratch {
  std::vector<Cursor> cursors;
  std::vector<std::pair<uint64_t, const Entry*>> prompt;  // (key, entry)
  std::vector<Candidate<Entry>> heap;
  std::vector<int64_t> token;   // tree slots in pop order
  std::vector<int32_t> parent;
  std::vector<int32_t> first, sib, index, stack;
  std::vector<int64_t> tok, par;  // the built tree, in output order
  std::vector<const Entry*> chain;  // parallel mode: chain c's nodes at [c * L, c * L + len[c])
  std::vector<int64_t> len;
  std::vector<uint8_t> growing;

  void reset() {
    cursors.clear();
    prompt.clear();
    heap.clear();
    token.clear();
    parent.clear();
  }
};

// ---- construction -------------------------------------------------------------------------

Trie::Trie(Config config) : cfg_(std::move(config)) {
  cfg_.validate();
  nodes_.emplace_back();
  nodes_[0].prev = nodes_[0].next = 0;  // the empty recency list
  path_.resize(static_cast<size_t>(cfg_.window()));
}

Trie::~Trie() { free_all(); }

void Trie::free_all() {
  for (Node& n : nodes_) n.kids = nullptr;
  arena_.release();
}

void Trie::clear() {
  std::unique_lock<std::shared_mutex> lock(mu_);
  free_all();
  nodes_.clear();
  nodes_.emplace_back();
  nodes_[0].prev = nodes_[0].next = 0;
  free_.clear();
  map_.clear();
  requests_.clear();
  live_ = listed_ = pinned_ = 0;
  evictions_ = truncated_ = windows_ = kid_slots_ = 0;
}

void Trie::check_vocab(const int64_t* tokens, int64_t n, const char* what) const {
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size)
      throw std::invalid_argument("fastdecode._C: " + std::string(what) + " token " +
                                  std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " +
                                  std::to_string(cfg_.vocab_size) + ")");
}

// ---- node pool, recency list, counts ---------------------------------------------------------

void Trie::reserve_kid(Node& n) {
  if (n.nkids < n.cap) return;
  const uint32_t cap = n.cap ? n.cap * 2 : 2;
  Entry* grown = arena_.alloc(cap);
  if (n.nkids) std::memcpy(static_cast<void*>(grown), n.kids, sizeof(Entry) * n.nkids);
  arena_.free(n.kids, n.cap);
  n.kids = grown;
  kid_slots_ += cap - n.cap;
  n.cap = cap;
}

void Trie::mirror(uint32_t id) {
  if (id == 0) return;  // the root has no entry
  const Node& n = nodes_[id];
  Entry& e = nodes_[n.parent].kids[n.pos];
  e.nkids = n.nkids;
  e.pinned = n.pins > 0;
  e.kids = n.kids;
}

void Trie::push_recent(uint32_t id) {
  const uint32_t last = nodes_[0].prev;
  Node& n = nodes_[id];
  n.prev = last;
  n.next = 0;
  n.listed = true;
  nodes_[last].next = id;
  nodes_[0].prev = id;
  ++listed_;
}

void Trie::unlist(uint32_t id) {
  Node& n = nodes_[id];
  nodes_[n.prev].next = n.next;
  nodes_[n.next].prev = n.prev;
  n.prev = n.next = kNil;
  n.listed = false;
  --listed_;
}

void Trie::touch(uint32_t id) {
  if (!nodes_[id].listed || nodes_[0].prev == id) return;
  unlist(id);
  push_recent(id);
}

uint32_t Trie::create(uint32_t parent, int32_t token) {
  uint32_t id;
  if (!free_.empty()) {
    id = free_.back();
    free_.pop_back();
    nodes_[id] = Node{};
  } else {
    if (nodes_.size() == nodes_.capacity())  // double, but never past the budget
      nodes_.reserve(std::min<size_t>(nodes_.capacity() * 2,
                                      static_cast<size_t>(cfg_.max_nodes_total) + 1));
    id = static_cast<uint32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& p = nodes_[parent];
  reserve_kid(p);
  p.kids[p.nkids] = Entry{0, token, id, 0, 0, nullptr};  // count 0 is the smallest: order holds
  Node& n = nodes_[id];
  n.parent = parent;
  n.pos = p.nkids++;
  n.token = token;
  n.depth = static_cast<uint16_t>(p.depth + 1);
  mirror(parent);
  map_.insert(parent, token, id);
  push_recent(id);
  ++live_;
  return id;
}

// Removes a childless node. Its entry leaves the parent's sorted array by moving, into the hole,
// the last entry of each later run of equal counts in turn: O(runs * log fan-out) moves, order
// kept.
void Trie::remove(uint32_t id) {
  Node& n = nodes_[id];
  map_.erase(n.parent, n.token);
  Node& p = nodes_[n.parent];
  Entry* e = p.kids;
  const uint32_t cnt = p.nkids;
  uint32_t hole = n.pos;
  while (hole + 1 < cnt) {
    const uint32_t c = e[hole + 1].count;
    uint32_t lo = hole + 1, hi = cnt;  // first index past the run of count c
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (e[mid].count >= c) lo = mid + 1; else hi = mid;
    }
    e[hole] = e[lo - 1];
    nodes_[e[hole].node].pos = hole;
    hole = lo - 1;
  }
  p.nkids = cnt - 1;
  if (p.nkids == 0) {
    arena_.free(p.kids, p.cap);
    p.kids = nullptr;
    kid_slots_ -= p.cap;
    p.cap = 0;
  }
  mirror(n.parent);
  if (n.listed) unlist(id);
  arena_.free(n.kids, n.cap);
  kid_slots_ -= n.cap;
  n = Node{};  // parent == kNil marks a free slot
  free_.push_back(id);
  --live_;
}

// +1 on a node's output count: its entry first swaps with the first entry of its run of equal
// counts, so the parent's array stays sorted.
void Trie::bump_output(uint32_t id) {
  const Node& n = nodes_[id];
  Entry* e = nodes_[n.parent].kids;
  const uint32_t i = n.pos, c = e[i].count;
  if (c == UINT32_MAX) return;  // saturated
  uint32_t lo = 0, hi = i;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (e[mid].count > c) lo = mid + 1; else hi = mid;
  }
  if (lo != i) {
    std::swap(e[lo], e[i]);
    nodes_[e[lo].node].pos = lo;
    nodes_[e[i].node].pos = i;
  }
  ++e[lo].count;
}

void Trie::add_prompt(Request& req, uint32_t id) {
  if (!req.add(id, nodes_[id].parent)) return;
  Node& n = nodes_[id];
  if (n.pins++ == 0) {
    ++pinned_;
    if (n.listed) unlist(id);
    mirror(id);
  }
}

uint32_t Trie::prompt_count(const Request* req, uint32_t id) const {
  if (!has_prompts(req) || nodes_[id].pins == 0) return 0;
  return req->count(id);
}

// An unpinned node always has an output count, so its entry is read only for pinned nodes.
bool Trie::live(const Request* req, uint32_t id) const {
  if (nodes_[id].pins == 0) return true;
  return output_count(id) > 0 || prompt_count(req, id) > 0;
}

const Trie::Request* Trie::find_request(int64_t request) const {
  const auto it = requests_.find(request);
  return it == requests_.end() ? nullptr : &it->second;
}

uint32_t Trie::walk(const int64_t* path, int64_t n) const {
  uint32_t u = 0;
  for (int64_t i = 0; i < n && u != kNil; ++i) u = map_.find(u, static_cast<int32_t>(path[i]));
  return u;
}

uint32_t Trie::match(const int64_t* path, int64_t n, const Request* req) const {
  uint32_t u = 0;
  for (int64_t i = 0; i < n; ++i) {
    u = map_.find(u, static_cast<int32_t>(path[i]));
    if (u == kNil || !live(req, u)) return kNil;
  }
  return u;
}

// ---- insertion and eviction -------------------------------------------------------------------

// Evicts up to `wanted` least recent nodes, never the `keep` most recent listed ones.
int64_t Trie::evict(int64_t wanted, int64_t keep) {
  int64_t done = 0;
  while (done < wanted && listed_ > keep) {
    const uint32_t id = nodes_[0].next;
    if (nodes_[id].nkids != 0)
      throw std::logic_error("fastdecode._C: trie recency invariant broken (oldest node has children)");
    remove(id);
    ++done;
    ++evictions_;
  }
  return done;
}

void Trie::insert_window(const int64_t* w, int64_t len, Request* req) {
  int64_t m = 0;
  uint32_t u = 0;
  while (m < len) {
    const uint32_t c = map_.find(u, static_cast<int32_t>(w[m]));
    if (c == kNil) break;
    path_[m++] = u = c;
  }
  if (m < len) {
    const int64_t need = len - m;
    if (live_ + need > cfg_.max_nodes_total) {
      // Refresh the matched path first (deepest first), so eviction cannot take it.
      int64_t keep = 0;
      for (int64_t j = m - 1; j >= 0; --j) {
        if (!nodes_[path_[j]].listed) continue;
        touch(path_[j]);
        ++keep;
      }
      evict(live_ + need - cfg_.max_nodes_total, keep);
    }
    while (m < len && live_ < cfg_.max_nodes_total) {
      u = create(u, static_cast<int32_t>(w[m]));
      path_[m++] = u;
    }
    if (m < len) ++truncated_;
  }
  for (int64_t j = 0; j < m; ++j) {
    if (req) add_prompt(*req, path_[j]); else bump_output(path_[j]);
  }
  for (int64_t j = m - 1; j >= 0; --j) touch(path_[j]);
  ++windows_;
}

void Trie::insert(const int64_t* tokens, int64_t n, bool prompt, int64_t request) {
  require(n >= 0, "tokens length must be >= 0, found " + std::to_string(n));
  check_vocab(tokens, n, "insert");
  for (int64_t i = 0; i < n; ++i)
    if (std::find(cfg_.eos.begin(), cfg_.eos.end(), tokens[i]) != cfg_.eos.end()) {
      n = i;
      break;
    }
  if (n < 2) return;  // no window
  std::unique_lock<std::shared_mutex> lock(mu_);
  Request* req = prompt ? &requests_[request] : nullptr;
  const int64_t W = cfg_.window();
  for (int64_t i = 0; i + 1 < n; ++i) insert_window(tokens + i, std::min(W, n - i), req);
}

int64_t Trie::end_request(int64_t request) {
  std::unique_lock<std::shared_mutex> lock(mu_);
  const auto it = requests_.find(request);
  if (it == requests_.end()) return 0;
  std::vector<uint32_t> ids = it->second.nodes();
  // Deepest first: a node is unpinned after its children, so it goes in the recency list after
  // them (more recent), and a node left without counts is a leaf by the time it is deleted.
  std::sort(ids.begin(), ids.end(), [this](uint32_t a, uint32_t b) {
    return nodes_[a].depth != nodes_[b].depth ? nodes_[a].depth > nodes_[b].depth : a < b;
  });
  for (uint32_t id : ids) {
    Node& n = nodes_[id];
    if (--n.pins != 0) continue;
    --pinned_;
    if (output_count(id) == 0 && n.nkids == 0) {
      remove(id);
    } else {
      push_recent(id);
      mirror(id);
    }
  }
  requests_.erase(it);
  return static_cast<int64_t>(ids.size());
}

// ---- retrieval --------------------------------------------------------------------------------

void Trie::open_cursor(uint32_t id, const Entry* kids, uint32_t nkids, bool pinned,
                       const Request* req, Scratch& s, uint32_t prefetch) const {
  const uint32_t pb = static_cast<uint32_t>(s.prompt.size());
  Cursor c{kids, nkids, 0, pb, pb, pb};
  // The best few children are likely expanded soon: start fetching their arrays now.
  for (uint32_t i = 0; i < nkids && i < prefetch; ++i)
    if (kids[i].nkids) __builtin_prefetch(kids[i].kids);
  if (pinned && has_prompts(req)) {
    if (const Request::Slot* counted = req->find(id)) {
      for (uint32_t k = counted->head; k != kNil; k = req->kid(k).next) {
        const Request::Kid& kid = req->kid(k);
        // The child's entry: among the first few (already loaded), else via its Node.
        const Entry* e = nullptr;
        for (uint32_t i = 0; i < nkids && i < kScanKids && !e; ++i)
          if (kids[i].node == kid.node) e = &kids[i];
        if (!e) e = &kids[nodes_[kid.node].pos];
        s.prompt.emplace_back((uint64_t{kid.count} << 32) | e->count, e);
      }
      std::sort(s.prompt.begin() + pb, s.prompt.end(),
                [](const std::pair<uint64_t, const Entry*>& a,
                   const std::pair<uint64_t, const Entry*>& b) {
                  return a.first != b.first ? a.first > b.first : a.second->token < b.second->token;
                });
      c.pend = static_cast<uint32_t>(s.prompt.size());
    }
  }
  s.cursors.push_back(c);
}

bool Trie::next_child(size_t cursor, Scratch& s, const Entry** child, uint64_t* key) const {
  Cursor& c = s.cursors[cursor];
  if (c.pnext < c.pend) {
    *key = s.prompt[c.pnext].first;
    *child = s.prompt[c.pnext++].second;
    return true;
  }
  while (c.next < c.nkids) {
    const Entry* e = &c.kids[c.next++];
    if (e->count == 0) {  // the rest are prompt-only nodes of other requests (or of this one)
      c.next = c.nkids;
      return false;
    }
    bool seen = false;  // already emitted from the prompt list?
    for (uint32_t i = c.pbeg; i < c.pend && !seen; ++i) seen = s.prompt[i].second == e;
    if (seen) continue;
    *child = e;
    *key = e->count;
    return true;
  }
  return false;
}

// Best-first: pops the best candidate, then pushes its next sibling and (above max_depth) its
// best child. Keys never grow downwards and siblings come in rank order, so the popped nodes are
// the max_nodes best of the subtree (ties: the earlier pushed), each popped after its parent.
// A pushed candidate's children array is prefetched, so the misses of the candidates overlap.
// Output order is DFS pre-order with children in rank order, so the best branch is contiguous.
int64_t Trie::build_hier(uint32_t root, int64_t max_nodes, int64_t max_depth, const Request* req,
                         Scratch& s) const {
  s.reset();
  s.token.push_back(nodes_[root].token);
  s.parent.push_back(-1);
  uint32_t seq = 0;
  const bool prompts = has_prompts(req);
  auto push_next = [&](uint32_t cursor, int32_t parent, int32_t depth) {
    const Entry* e;
    uint64_t key;
    if (!next_child(cursor, s, &e, &key)) return;
    if (depth < max_depth) {
      if (e->nkids) __builtin_prefetch(e->kids);
      if (e->pinned && prompts) req->prefetch(e->node);
    }
    s.heap.push_back(Candidate<Entry>{key, e, parent, cursor, seq++, depth});
    std::push_heap(s.heap.begin(), s.heap.end(), HeapOrder());
  };
  open_cursor(root, nodes_[root].kids, nodes_[root].nkids, nodes_[root].pins > 0, req, s,
              kPrefetchKids);
  push_next(0, 0, 1);
  while (!s.heap.empty() && static_cast<int64_t>(s.token.size()) < max_nodes) {
    std::pop_heap(s.heap.begin(), s.heap.end(), HeapOrder());
    const Candidate<Entry> c = s.heap.back();
    s.heap.pop_back();
    const int32_t slot = static_cast<int32_t>(s.token.size());
    s.token.push_back(c.entry->token);
    s.parent.push_back(c.parent);
    push_next(c.cursor, c.parent, c.depth);
    if (c.depth < max_depth && c.entry->nkids) {
      const uint32_t cursor = static_cast<uint32_t>(s.cursors.size());
      open_cursor(c.entry->node, c.entry->kids, c.entry->nkids, c.entry->pinned, req, s,
                  kPrefetchKids);
      push_next(cursor, slot, c.depth + 1);
    }
  }
  // Children lists in slot order (= rank order), then an iterative pre-order walk.
  const int32_t T = static_cast<int32_t>(s.token.size());
  s.first.assign(T, -1);
  s.sib.assign(T, -1);
  s.index.assign(T, -1);
  for (int32_t j = T - 1; j >= 1; --j) {
    s.sib[j] = s.first[s.parent[j]];
    s.first[s.parent[j]] = j;
  }
  s.tok.resize(T);
  s.par.resize(T);
  s.stack.clear();
  s.stack.push_back(0);
  s.index[0] = 0;
  s.tok[0] = s.token[0];
  s.par[0] = -1;
  int32_t out = 1;
  while (!s.stack.empty()) {
    const int32_t x = s.stack.back();
    const int32_t c = s.first[x];
    if (c < 0) {
      s.stack.pop_back();
      continue;
    }
    s.first[x] = s.sib[c];
    s.index[c] = out;
    s.tok[out] = s.token[c];
    s.par[out] = s.index[x];
    ++out;
    s.stack.push_back(c);
  }
  return T;
}

// Disjoint chains: for each child of the matched node in rank order, the chain that follows the
// best child at every step, down to max_depth; chains are laid out in order and cut at the node
// budget. A chain is a run of dependent loads, so up to kChainWindow chains grow side by side,
// one step each per round, each step prefetching the next array: their misses overlap. A chain
// stops growing once the chains before it and itself fill the budget (earlier chains only grow),
// and no chain starts once the started ones fill it.
int64_t Trie::build_parallel(uint32_t root, int64_t max_nodes, int64_t max_depth,
                             const Request* req, Scratch& s) const {
  s.reset();
  s.chain.clear();
  s.len.clear();
  s.growing.clear();
  s.tok.assign(1, nodes_[root].token);
  s.par.assign(1, -1);
  open_cursor(root, nodes_[root].kids, nodes_[root].nkids, nodes_[root].pins > 0, req, s,
              kChainWindow);
  const int64_t budget = max_nodes - 1, L = std::min(max_depth, budget);
  int64_t total = 0, active = 0;
  bool heads_left = true;
  uint64_t key;
  for (;;) {
    while (active < kChainWindow && heads_left && total < budget) {
      const Entry* head;
      if (!next_child(0, s, &head, &key)) {
        heads_left = false;
        break;
      }
      if (head->nkids) __builtin_prefetch(head->kids);
      if (head->pinned && has_prompts(req)) req->prefetch(head->node);
      s.chain.resize(s.chain.size() + static_cast<size_t>(L));
      s.chain[s.len.size() * L] = head;
      s.len.push_back(1);
      s.growing.push_back(1);
      ++active;
      ++total;
    }
    if (active == 0) break;
    int64_t before = 0;  // nodes of the chains before chain c
    for (size_t c = 0; c < s.len.size(); before += s.len[c], ++c) {
      if (!s.growing[c]) continue;
      const Entry* x = s.chain[c * L + s.len[c] - 1];
      const Entry* y = nullptr;
      if (s.len[c] < L && before + s.len[c] < budget && x->nkids) {
        const uint32_t cursor = static_cast<uint32_t>(s.cursors.size());
        open_cursor(x->node, x->kids, x->nkids, x->pinned, req, s, 0);
        if (!next_child(cursor, s, &y, &key)) y = nullptr;
      }
      if (!y) {
        s.growing[c] = 0;
        --active;
        continue;
      }
      if (y->nkids) __builtin_prefetch(y->kids);
      if (y->pinned && has_prompts(req)) req->prefetch(y->node);
      s.chain[c * L + s.len[c]++] = y;
      ++total;
    }
  }
  for (size_t c = 0; c < s.len.size(); ++c) {
    const int64_t room = max_nodes - static_cast<int64_t>(s.tok.size());
    for (int64_t d = 0; d < std::min<int64_t>(s.len[c], room); ++d) {
      s.par.push_back(d == 0 ? 0 : static_cast<int64_t>(s.tok.size()) - 1);
      s.tok.push_back(s.chain[c * L + d]->token);
    }
  }
  return static_cast<int64_t>(s.tok.size());
}

int64_t Trie::retrieve_locked(const int64_t* ctx, int64_t n, int64_t max_nodes,
                              int64_t max_depth, Mode mode, const Request* req, int64_t* tokens,
                              int64_t* parents) const {
  tokens[0] = ctx[n - 1];
  parents[0] = -1;
  if (max_nodes == 1 || max_depth == 0) return 1;
  static thread_local Scratch s;
  const int64_t enough = std::min(max_depth, max_nodes - 1);
  int64_t best = 1;
  // Longest context first; a shorter one is tried while the tree is below `enough` drafts.
  for (int64_t k = std::min(cfg_.match_len, n); k >= 1; --k) {
    const uint32_t m = match(ctx + n - k, k, req);
    if (m == kNil) continue;
    const int64_t T = mode == Mode::kHier ? build_hier(m, max_nodes, max_depth, req, s)
                                          : build_parallel(m, max_nodes, max_depth, req, s);
    if (T > best) {
      std::copy(s.tok.begin() + 1, s.tok.begin() + T, tokens + 1);
      std::copy(s.par.begin() + 1, s.par.begin() + T, parents + 1);
      best = T;
    }
    if (T - 1 >= enough) break;
  }
  return best;
}

namespace {

void check_retrieve_args(int64_t n, int64_t max_nodes, int64_t max_depth, Mode mode) {
  require(n >= 1, "the context must hold at least one token, found " + std::to_string(n));
  require_in(max_nodes, 1, kMaxTreeNodes, "max_nodes");
  require(max_depth >= 0, "max_depth must be >= 0, found " + std::to_string(max_depth));
  require(mode == Mode::kHier || mode == Mode::kParallel, "unknown retrieval mode");
}

}  // namespace

int64_t Trie::retrieve(const int64_t* ctx, int64_t n, int64_t max_nodes, int64_t max_depth,
                       Mode mode, int64_t request, int64_t* tokens, int64_t* parents) const {
  check_retrieve_args(n, max_nodes, max_depth, mode);
  const int64_t used = std::min(n, cfg_.match_len);
  check_vocab(ctx + n - used, used, "context");
  std::shared_lock<std::shared_mutex> lock(mu_);
  return retrieve_locked(ctx, n, max_nodes, max_depth, mode, find_request(request), tokens,
                         parents);
}

int64_t Trie::retrieve_batch(const std::vector<const int64_t*>& ctx,
                             const std::vector<int64_t>& n, int64_t max_nodes, int64_t max_depth,
                             Mode mode, const std::vector<int64_t>& requests, int64_t* tokens,
                             int64_t* parents, bool fixed) const {
  const size_t B = ctx.size();
  require(n.size() == B && requests.size() == B,
          "contexts, lengths and request ids differ in number");
  for (size_t b = 0; b < B; ++b) {
    check_retrieve_args(n[b], max_nodes, max_depth, mode);
    const int64_t used = std::min(n[b], cfg_.match_len);
    check_vocab(ctx[b] + n[b] - used, used, "context");
  }
  int64_t T = 1;
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    for (size_t b = 0; b < B; ++b) {
      int64_t* tok = tokens + static_cast<int64_t>(b) * max_nodes;
      int64_t* par = parents + static_cast<int64_t>(b) * max_nodes;
      const int64_t size = retrieve_locked(ctx[b], n[b], max_nodes, max_depth, mode,
                                           find_request(requests[b]), tok, par);
      std::fill(tok + size, tok + max_nodes, 0);
      std::fill(par + size, par + max_nodes, -2);
      T = std::max(T, size);
    }
  }
  if (fixed) return max_nodes;
  for (size_t b = 1; b < B && T < max_nodes; ++b) {  // destinations precede sources
    const int64_t from = static_cast<int64_t>(b) * max_nodes, to = static_cast<int64_t>(b) * T;
    std::memmove(tokens + to, tokens + from, sizeof(int64_t) * T);
    std::memmove(parents + to, parents + from, sizeof(int64_t) * T);
  }
  return T;
}

double Trie::time_retrieve(const int64_t* ctx, int64_t n, int64_t max_nodes, int64_t max_depth,
                           Mode mode, int64_t request, int64_t iters) const {
  check_retrieve_args(n, max_nodes, max_depth, mode);
  require(iters >= 1, "iters must be >= 1");
  std::vector<int64_t> tok(max_nodes), par(max_nodes);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i)
    retrieve(ctx, n, max_nodes, max_depth, mode, request, tok.data(), par.data());
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count();
}

// One chain below `node` in one count source (own: the request's counts, else the shared
// output counts): the child of largest count (ties: the first in the source's order: the most
// recently counted) while the running product of the count ratios stays >= min_prob.
int64_t Trie::follow(uint32_t node, bool own, const Request* req, int64_t limit, double min_prob,
                     int32_t* tokens, double* probs, double* score) const {
  double p = 1.0, sum = 0.0;
  int64_t len = 0;
  while (len < limit) {
    uint32_t parent_count = 0, best_count = 0, best = kNil;
    if (own) {
      const Request::Slot* slot = has_prompts(req) ? req->find(node) : nullptr;
      if (!slot) break;
      parent_count = slot->count;
      for (uint32_t k = slot->head; k != kNil; k = req->kid(k).next) {
        const Request::Kid& kid = req->kid(k);
        if (kid.count > best_count) best_count = kid.count, best = kid.node;
      }
    } else {
      const Node& u = nodes_[node];
      parent_count = output_count(node);
      if (u.nkids && u.kids[0].count) best_count = u.kids[0].count, best = u.kids[0].node;
    }
    if (best == kNil || parent_count == 0) break;
    p *= static_cast<double>(best_count) / static_cast<double>(parent_count);
    if (p < min_prob) break;
    tokens[len] = nodes_[best].token;
    probs[len++] = p;
    sum += p;
    node = best;
  }
  *score = sum;
  return len;
}

void Trie::draft_chains(const std::vector<const int64_t*>& ctx, const std::vector<int64_t>& n,
                        const std::vector<int64_t>& requests, int64_t max_len, double min_prob,
                        double match_factor, int64_t* tokens, double* probs, int64_t* lengths,
                        int64_t* matched) const {
  const size_t B = ctx.size();
  require(n.size() == B && requests.size() == B,
          "contexts, lengths and request ids differ in number");
  require_in(max_len, 1, kMaxBranchLength, "max_len");
  require(min_prob >= 0.0 && min_prob <= 1.0,
          "min_prob must be in [0, 1], found " + std::to_string(min_prob));
  require(match_factor == match_factor, "match_factor must be a number, found NaN");
  for (size_t b = 0; b < B; ++b) {
    require(n[b] >= 1, "the context must hold at least one token, found " + std::to_string(n[b]));
    const int64_t used = std::min(n[b], cfg_.match_len);
    check_vocab(ctx[b] + n[b] - used, used, "context");
  }
  std::vector<int32_t> tok(static_cast<size_t>(max_len));
  std::vector<double> pr(static_cast<size_t>(max_len));
  std::shared_lock<std::shared_mutex> lock(mu_);
  for (size_t b = 0; b < B; ++b) {
    int64_t* out_tok = tokens + static_cast<int64_t>(b) * max_len;
    double* out_pr = probs + static_cast<int64_t>(b) * max_len;
    std::fill(out_tok, out_tok + max_len, 0);
    std::fill(out_pr, out_pr + max_len, 0.0);
    lengths[b] = matched[b] = 0;
    const Request* req = find_request(requests[b]);
    double best = 0.0;
    for (int64_t k = std::min(cfg_.match_len, n[b]); k >= 1; --k) {
      const uint32_t m = match(ctx[b] + n[b] - k, k, req);
      if (m == kNil) continue;
      int64_t limit = max_len;
      if (match_factor > 0.0)
        limit = std::min<int64_t>(limit, static_cast<int64_t>(std::ceil(k * match_factor)));
      for (const bool own : {true, false}) {
        double score = 0.0;
        const int64_t len = follow(m, own, req, limit, min_prob, tok.data(), pr.data(), &score);
        if (len == 0 || score <= best) continue;
        best = score;
        for (int64_t j = 0; j < max_len; ++j) {
          out_tok[j] = j < len ? tok[static_cast<size_t>(j)] : 0;
          out_pr[j] = j < len ? pr[static_cast<size_t>(j)] : 0.0;
        }
        lengths[b] = len;
        matched[b] = k;
      }
    }
  }
}

int64_t Trie::count(const int64_t* path, int64_t n, bool prompt, int64_t request) const {
  require(n >= 1, "the path must hold at least one token, found " + std::to_string(n));
  check_vocab(path, n, "path");
  std::shared_lock<std::shared_mutex> lock(mu_);
  const uint32_t id = walk(path, n);
  if (id == kNil) return 0;
  return prompt ? prompt_count(find_request(request), id) : output_count(id);
}

Stats Trie::stats() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  Stats st;
  st.nodes = live_;
  st.pinned = pinned_;
  st.requests = static_cast<int64_t>(requests_.size());
  st.evictions = evictions_;
  st.truncated = truncated_;
  st.windows = windows_;
  int64_t request_bytes = 0;
  for (const auto& kv : requests_)
    request_bytes += static_cast<int64_t>(kv.second.bytes());
  st.bytes = static_cast<int64_t>(nodes_.capacity() * sizeof(Node) +
                                  free_.capacity() * sizeof(uint32_t) + map_.bytes()) +
             kid_slots_ * static_cast<int64_t>(sizeof(Entry)) + request_bytes;
  return st;
}

// ---- invariants (tests) -----------------------------------------------------------------------

void Trie::check_invariants() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  auto fail = [](const std::string& what) {
    throw std::logic_error("fastdecode._C: trie invariant broken: " + what);
  };
  const size_t N = nodes_.size();
  // Pins recomputed from the requests.
  std::vector<uint32_t> pins(N, 0);
  for (const auto& kv : requests_) {
    const Request& req = kv.second;
    for (uint32_t id : req.nodes()) {
      if (id == 0 || id >= N || nodes_[id].parent == kNil) fail("request counts a free node");
      const uint32_t c = req.count(id);
      if (c == 0) fail("request holds a zero prompt count");
      ++pins[id];
      const uint32_t p = nodes_[id].parent;
      if (p == 0) continue;
      const Request::Slot* ps = req.find(p);
      if (!ps || ps->count < c) fail("prompt count grows below a node");
      int found = 0;  // records of id in its parent's list (the walk is bounded)
      uint32_t steps = 0;
      for (uint32_t k = ps->head; k != kNil && steps <= N; k = req.kid(k).next, ++steps) {
        if (req.kid(k).node != id) continue;
        ++found;
        if (req.kid(k).count != c || req.find(id)->kid != k) fail("stale child record");
      }
      if (found != 1) fail("request child list misses a counted node");
    }
  }
  int64_t live = 0, pinned = 0, unpinned = 0;
  for (size_t i = 0; i < N; ++i) {
    const Node& n = nodes_[i];
    if (i != 0 && n.parent == kNil) {
      if (n.nkids || n.listed) fail("free node in use");
      continue;
    }
    for (uint32_t k = 0; k < n.nkids; ++k) {
      const Entry& e = n.kids[k];
      if (e.node >= N || nodes_[e.node].parent != i || nodes_[e.node].pos != k ||
          nodes_[e.node].token != e.token || nodes_[e.node].kids != e.kids ||
          nodes_[e.node].nkids != e.nkids || e.pinned != (nodes_[e.node].pins > 0))
        fail("child entry does not match its node");
      if (k > 0 && n.kids[k - 1].count < e.count) fail("children array not sorted");
      if (i != 0 && e.count > output_count(static_cast<uint32_t>(i)))
        fail("output count grows below a node");
      if (map_.find(static_cast<uint32_t>(i), e.token) != e.node) fail("edge missing from the map");
    }
    if (n.nkids > n.cap) fail("children array overflow");
    if (i == 0) continue;
    ++live;
    if (n.depth != nodes_[n.parent].depth + 1 || n.depth > cfg_.window()) fail("bad depth");
    if (n.pins != pins[i]) fail("pin count differs from the requests");
    if (n.pins) ++pinned; else ++unpinned;
    if (n.listed != (n.pins == 0)) fail("a node is listed iff it is unpinned");
    if (output_count(static_cast<uint32_t>(i)) == 0 && n.pins == 0) fail("dead node kept");
  }
  if (live != live_ || pinned != pinned_ || unpinned != listed_) fail("node counters");
  if (live_ > cfg_.max_nodes_total) fail("node budget exceeded");
  if (static_cast<int64_t>(map_.size()) != live_) fail("map size differs from the node count");
  // Recency list: every listed node once, parents after (more recent than) listed children.
  std::vector<int64_t> rank(N, -1);
  int64_t r = 0;
  for (uint32_t id = nodes_[0].next, prev = 0; id != 0; prev = id, id = nodes_[id].next) {
    if (id >= N || !nodes_[id].listed || rank[id] >= 0 || nodes_[id].prev != prev)
      fail("recency list corrupt");
    rank[id] = r++;
  }
  if (r != listed_) fail("recency list length");
  for (size_t i = 1; i < N; ++i) {
    const Node& n = nodes_[i];
    if (n.parent == kNil || n.parent == 0 || !n.listed) continue;
    if (nodes_[n.parent].listed && rank[n.parent] < rank[i]) fail("a parent is older than its child");
  }
}

}  // namespace trie
}  // namespace fastdecode
