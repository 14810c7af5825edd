// Persistence of the trie: a versioned, checksummed binary image.
//
// Layout (version 1, little-endian):
//   header, 64 bytes (offset: field):
//      0: magic "FDTRIE\x1a\n"     24: match_len i32          48: EOS count u32
//      8: version u32 (1)          28: branch_length i32      52: request count R u32
//     12: header size u32 (64)     32: max_nodes_total i64    56: payload bytes u64
//     16: vocab_size i64           40: node count N u64 (root excluded)
//   payload:
//     decoding_length i64 (retrieval's default node budget)
//     EOS ids, i64 each
//     N node records {parent u32, token i32, output count u32, recency rank u32}, in pre-order
//       (a parent precedes its children; parent 0 is the root, node i is the i-th record, from 1);
//       recency rank 0 for pinned nodes, else 1 (least recent) .. number of unpinned nodes
//     R requests {id i64, E u64, E entries {node u32, prompt count u32}}
//   checksum u64 over header and payload (trie_checksum).
//
// Loading checks the size, magic, version and checksum, then every structural rule the trie
// relies on (settings in range, parents before children, tokens in the vocabulary, no duplicate
// edges, counts never growing downwards, no dead node, ranks a permutation with parents more
// recent than children), so a damaged or hand-made file raises std::invalid_argument (Python's
// ValueError) and never yields a trie that could misbehave.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/check.h"
#include "trie/trie.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the trie file format is little-endian");

namespace fastdecode {
namespace trie {

namespace {

constexpr char kMagic[8] = {'F', 'D', 'T', 'R', 'I', 'E', '\x1a', '\n'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kHeaderSize = 64;
constexpr size_t kNodeRecord = 16;

// FNV-1a over 8-byte words, then the length, then a bijective finaliser: every step maps the
// state one-to-one, so any change confined to one word always changes the sum.
uint64_t trie_checksum(const char* p, size_t n) {
  constexpr uint64_t kPrime = 0x100000001b3ull;
  uint64_t h = 0xcbf29ce484222325ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * kPrime;
  }
  uint64_t w = 0;
  std::memcpy(&w, p + i, n - i);
  h = (h ^ w) * kPrime;
  h = (h ^ static_cast<uint64_t>(n)) * kPrime;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

class Writer {
 public:
  template <typename T>
  void put(T v) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(&out[at], &v, sizeof(T));
  }
  template <typename T>
  void put_at(size_t at, T v) { std::memcpy(&out[at], &v, sizeof(T)); }
  std::string out;
};

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("fastdecode._C: invalid trie file: " + what);
}

class Reader {
 public:
  Reader(const char* p, size_t n) : p_(p), n_(n) {}
  template <typename T>
  T get(const char* what) {
    if (n_ - at_ < sizeof(T)) bad(std::string("payload ends inside ") + what);
    T v;
    std::memcpy(&v, p_ + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  size_t left() const { return n_ - at_; }

 private:
  const char* p_;
  size_t n_, at_ = 0;
};

}  // namespace

std::string Trie::serialize() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  Writer w;
  w.out.reserve(kHeaderSize + 8 + static_cast<size_t>(live_) * kNodeRecord + 64);
  for (char c : kMagic) w.put(c);
  w.put(kVersion);
  w.put(kHeaderSize);
  w.put(cfg_.vocab_size);
  w.put(static_cast<int32_t>(cfg_.match_len));
  w.put(static_cast<int32_t>(cfg_.branch_length));
  w.put(cfg_.max_nodes_total);
  w.put(static_cast<uint64_t>(live_));
  w.put(static_cast<uint32_t>(cfg_.eos.size()));
  w.put(static_cast<uint32_t>(requests_.size()));
  w.put(uint64_t{0});  // payload bytes, patched below
  w.put(cfg_.decoding_length);
  for (int64_t t : cfg_.eos) w.put(t);

  // Recency ranks, then the nodes in pre-order (children in array order).
  std::vector<uint32_t> rank(nodes_.size(), 0), index(nodes_.size(), kNil);
  uint32_t r = 0;
  for (uint32_t id = nodes_[0].next; id != 0; id = nodes_[id].next) rank[id] = ++r;
  std::vector<uint32_t> stack;
  for (uint32_t k = nodes_[0].nkids; k-- > 0;) stack.push_back(nodes_[0].kids[k].node);
  uint32_t next_index = 1;
  index[0] = 0;
  while (!stack.empty()) {
    const uint32_t id = stack.back();
    stack.pop_back();
    const Node& n = nodes_[id];
    index[id] = next_index++;
    w.put(index[n.parent]);
    w.put(n.token);
    w.put(output_count(id));
    w.put(rank[id]);
    for (uint32_t k = n.nkids; k-- > 0;) stack.push_back(n.kids[k].node);
  }

  std::vector<int64_t> ids;
  for (const auto& kv : requests_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  for (int64_t rid : ids) {
    const Request& req = requests_.at(rid);
    std::vector<std::pair<uint32_t, uint32_t>> entries;
    for (uint32_t id : req.nodes()) entries.emplace_back(index[id], req.count(id));
    std::sort(entries.begin(), entries.end());
    w.put(rid);
    w.put(static_cast<uint64_t>(entries.size()));
    for (const auto& e : entries) {
      w.put(e.first);
      w.put(e.second);
    }
  }
  w.put_at(56, static_cast<uint64_t>(w.out.size() - kHeaderSize));
  w.put(trie_checksum(w.out.data(), w.out.size()));
  return std::move(w.out);
}

std::unique_ptr<Trie> Trie::deserialize(const char* data, size_t size) {
  if (size < kHeaderSize + 8)
    bad("it is " + std::to_string(size) + " bytes, shorter than the " +
        std::to_string(kHeaderSize + 8) + "-byte minimum (truncated, or not a trie file)");
  if (std::memcmp(data, kMagic, sizeof(kMagic)) != 0) bad("bad magic (not a fastdecode trie file)");
  Reader head(data + 8, kHeaderSize - 8);
  const uint32_t version = head.get<uint32_t>("header");
  if (version != kVersion)
    bad("unsupported version " + std::to_string(version) + " (this build reads version " +
        std::to_string(kVersion) + ")");
  if (head.get<uint32_t>("header") != kHeaderSize) bad("bad header size");
  Config cfg;
  cfg.vocab_size = head.get<int64_t>("header");
  cfg.match_len = head.get<int32_t>("header");
  cfg.branch_length = head.get<int32_t>("header");
  cfg.max_nodes_total = head.get<int64_t>("header");
  const uint64_t N = head.get<uint64_t>("header");
  const uint32_t n_eos = head.get<uint32_t>("header");
  const uint32_t n_req = head.get<uint32_t>("header");
  const uint64_t payload = head.get<uint64_t>("header");
  if (payload > size || size - kHeaderSize - 8 != payload)
    bad("the header announces " + std::to_string(payload) + " payload bytes but the file holds " +
        std::to_string(size - kHeaderSize - 8) + " (truncated or padded)");
  uint64_t stored;
  std::memcpy(&stored, data + size - 8, 8);
  if (stored != trie_checksum(data, size - 8)) bad("checksum mismatch (the file is corrupted)");

  Reader r(data + kHeaderSize, payload);
  cfg.decoding_length = r.get<int64_t>("settings");
  if (n_eos > r.left() / 8) bad("EOS count exceeds the payload");
  for (uint32_t i = 0; i < n_eos; ++i) cfg.eos.push_back(r.get<int64_t>("EOS ids"));
  try {
    cfg.validate();
  } catch (const std::invalid_argument& e) {
    bad(std::string("bad settings: ") + e.what());
  }
  if (N > static_cast<uint64_t>(cfg.max_nodes_total)) bad("more nodes than max_nodes_total");
  if (N > r.left() / kNodeRecord) bad("node count exceeds the payload");

  auto t = std::make_unique<Trie>(cfg);
  Trie& T = *t;
  const uint32_t n = static_cast<uint32_t>(N);
  T.nodes_.resize(size_t{n} + 1);
  std::vector<uint32_t> count(size_t{n} + 1, 0), rank(size_t{n} + 1, 0);
  for (uint32_t i = 1; i <= n; ++i) {
    const uint32_t parent = r.get<uint32_t>("nodes");
    const int32_t token = r.get<int32_t>("nodes");
    count[i] = r.get<uint32_t>("nodes");
    rank[i] = r.get<uint32_t>("nodes");
    if (parent >= i) bad("node " + std::to_string(i) + " comes before its parent");
    if (token < 0 || token >= cfg.vocab_size) bad("a token is outside the vocabulary");
    Node& p = T.nodes_[parent];
    if (p.depth + 1 > cfg.window()) bad("a path is longer than match_len + branch_length");
    if (T.map_.find(parent, token) != kNil) bad("duplicate edge");
    if (parent != 0 && count[i] > count[parent]) bad("an output count grows below its parent");
    T.reserve_kid(p);
    p.kids[p.nkids++] = Entry{count[i], token, i, 0, 0, nullptr};
    Node& x = T.nodes_[i];
    x.parent = parent;
    x.token = token;
    x.depth = static_cast<uint16_t>(p.depth + 1);
    T.map_.insert(parent, token, i);
  }
  for (uint32_t i = 0; i <= n; ++i) {
    Node& x = T.nodes_[i];
    std::stable_sort(x.kids, x.kids + x.nkids,
                     [](const Entry& a, const Entry& b) { return a.count > b.count; });
    for (uint32_t k = 0; k < x.nkids; ++k) T.nodes_[x.kids[k].node].pos = k;
  }
  T.live_ = n;

  for (uint32_t q = 0; q < n_req; ++q) {
    const int64_t id = r.get<int64_t>("requests");
    const uint64_t E = r.get<uint64_t>("requests");
    if (E > n || E > r.left() / 8) bad("request entry count exceeds the payload");
    if (T.requests_.count(id)) bad("duplicate request id");
    Request& req = T.requests_[id];
    std::vector<std::pair<uint32_t, uint32_t>> entries(E);
    for (auto& e : entries) {
      e.first = r.get<uint32_t>("request entries");
      e.second = r.get<uint32_t>("request entries");
      if (e.first == 0 || e.first > n) bad("a request counts a node that does not exist");
      if (e.second == 0) bad("a request holds a zero prompt count");
    }
    std::sort(entries.begin(), entries.end());  // parents (smaller indices) first
    for (const auto& e : entries) {
      const uint32_t p = T.nodes_[e.first].parent;
      if (p != 0 && req.count(p) < e.second) bad("a prompt count grows below its parent");
      if (!req.insert(e.first, p, e.second)) bad("a request counts a node twice");
      if (T.nodes_[e.first].pins++ == 0) ++T.pinned_;
    }
  }
  if (r.left() != 0) bad("trailing bytes in the payload");

  // Liveness, then the recency list from the ranks.
  const uint32_t unpinned = n - static_cast<uint32_t>(T.pinned_);
  std::vector<uint32_t> order(unpinned, kNil);
  for (uint32_t i = 1; i <= n; ++i) {
    const Node& x = T.nodes_[i];
    if (count[i] == 0 && x.pins == 0) bad("a node holds no count");
    if (x.pins != 0) {
      if (rank[i] != 0) bad("a pinned node has a recency rank");
      continue;
    }
    if (rank[i] == 0 || rank[i] > unpinned || order[rank[i] - 1] != kNil)
      bad("recency ranks are not a permutation");
    order[rank[i] - 1] = i;
    if (x.parent != 0 && T.nodes_[x.parent].pins == 0 && rank[x.parent] < rank[i])
      bad("a parent is less recent than its child");
  }
  for (uint32_t id : order) T.push_recent(id);
  for (uint32_t i = 1; i <= n; ++i) T.mirror(i);
  return t;
}

}  // namespace trie
}  // namespace fastdecode
