// The pybind11 module fastdecode._C. It never sees a torch tensor: Python passes data pointers
// (as integers), sizes, strides and the CUDA stream, so the module works with any torch build.
// Each op is bound once, by def_op (common/def_op.h), as _C.<op>(device, stream, *args): it
// checks its arguments again (fastdecode.ops validates first), runs the CPU or the CUDA launcher
// and releases the GIL while it runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/check.h"
#include "common/def_op.h"
#include "kv/compact_kv_ops.h"
#include "linear/small_linear.h"
#include "ngram/pool_ops.h"
#include "tree/tree_logic.h"
#include "tree/tree_ops.h"
#include "trie/trie.h"

namespace py = pybind11;
using fastdecode::def_op;
using fastdecode::require;
using fastdecode::require_ptr;
using Ptr = std::uintptr_t;

namespace {

template <typename T>
T* as(Ptr p) { return reinterpret_cast<T*>(p); }

void check_tree(int64_t B, int64_t T) {
  require(B >= 0, "B must be >= 0, found " + std::to_string(B));
  require(T >= 1 && T <= fastdecode::tree::kMaxNodes,
          "T must be in [1, " + std::to_string(fastdecode::tree::kMaxNodes) + "], found " +
              std::to_string(T));
}

// A batch call's context pointers, each checked against its length.
std::vector<const int64_t*> context_rows(const std::vector<Ptr>& ctx,
                                         const std::vector<int64_t>& n) {
  require(ctx.size() == n.size(), "one length per context is needed");
  std::vector<const int64_t*> rows(ctx.size());
  for (size_t b = 0; b < ctx.size(); ++b) {
    require_ptr(ctx[b], n[b], "context");
    rows[b] = as<const int64_t>(ctx[b]);
  }
  return rows;
}

void check_verify(Ptr draft, Ptr parents, Ptr predicted, int64_t B, int64_t T, int64_t max_depth,
                  Ptr accept_len, Ptr best_node, Ptr path, Ptr tokens) {
  check_tree(B, T);
  require(max_depth >= 0 && max_depth < T,
          "max_depth must be in [0, T), found " + std::to_string(max_depth));
  for (auto [p, name] : {std::pair{draft, "draft_tokens"}, {parents, "parents"},
                         {predicted, "predicted"}, {accept_len, "accept_len"},
                         {best_node, "best_node"}, {path, "path"}, {tokens, "tokens"}})
    require_ptr(p, B, name);
}

void check_nodes(Ptr in, Ptr out, int64_t B, int64_t T, const char* in_name, const char* out_name) {
  check_tree(B, T);
  require_ptr(in, B, in_name);
  require_ptr(out, B, out_name);
}

void check_mask(Ptr parents, int64_t B, int64_t T, Ptr mask) {
  check_nodes(parents, mask, B, T, "parents", "mask");
}

void check_positions(Ptr parents, Ptr prefix_len, int64_t B, int64_t T, Ptr positions) {
  check_nodes(parents, positions, B, T, "parents", "positions");
  require_ptr(prefix_len, B, "prefix_len");
}

void check_pack(Ptr mask, int64_t B, int64_t T, Ptr packed) {
  check_nodes(mask, packed, B, T, "mask", "packed");
}

// compact_kv's arguments, checked: the cache tensors as descriptors and the index arrays.
struct KVArgs {
  std::vector<fastdecode::kv::TensorDesc> descs;
  int unit;
  int64_t B;
  const int64_t* start;
  const int64_t* src;
  int64_t src_width;
  const int64_t* count;
};

// dims and strides hold 3 and 4 values per tensor: (H, S, D) and the element strides of
// (B, H, S, D).
KVArgs kv_args(const std::vector<Ptr>& ptrs, const std::vector<int64_t>& dims,
               const std::vector<int64_t>& strides, int64_t elem_size, int64_t B, Ptr start,
               Ptr src, int64_t src_width, Ptr count) {
  const size_t n = ptrs.size();
  require(dims.size() == 3 * n && strides.size() == 4 * n,
          "dims needs 3 and strides 4 values per tensor");
  require(elem_size == 1 || elem_size == 2 || elem_size == 4 || elem_size == 8,
          "elem_size must be 1, 2, 4 or 8, found " + std::to_string(elem_size));
  require(B >= 0 && src_width >= 0, "B and src_width must be >= 0");
  require_ptr(start, B, "start");
  require_ptr(count, B, "count");
  require_ptr(src, B * src_width, "src");
  KVArgs args{{}, 0, B, as<const int64_t>(start), as<const int64_t>(src), src_width,
              as<const int64_t>(count)};
  std::vector<int64_t> dim(n), stride_d(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t H = dims[3 * i], S = dims[3 * i + 1], D = dims[3 * i + 2];
    require(H >= 0 && S >= 0 && D >= 0 && H < (1LL << 31) && S < (1LL << 31) &&
                D * elem_size < (1LL << 31),
            "cache tensor " + std::to_string(i) + " has an invalid shape");
    require_ptr(ptrs[i], B * H * S * D, "cache tensor");
    fastdecode::kv::TensorDesc d{};
    d.base = as<char>(ptrs[i]);
    d.stride_b = strides[4 * i] * elem_size;
    d.stride_h = strides[4 * i + 1] * elem_size;
    d.stride_s = strides[4 * i + 2] * elem_size;
    d.heads = static_cast<int32_t>(H);
    d.seq = static_cast<int32_t>(S);
    args.descs.push_back(d);
    dim[i] = D;
    stride_d[i] = strides[4 * i + 3] * elem_size;
  }
  args.unit = fastdecode::kv::choose_unit(args.descs, dim, stride_d, elem_size);
  require(args.unit >= elem_size, "a cache tensor's data pointer is not aligned to its dtype");
  return args;
}

// CPU memory can be read here, so the CPU launcher re-checks the index values too.
void check_kv_values(const KVArgs& args) {
  const int64_t *start = args.start, *src = args.src, *count = args.count;
  const int64_t src_width = args.src_width;
  int64_t seq = INT64_MAX;
  for (const auto& d : args.descs) seq = std::min<int64_t>(seq, d.seq);
  for (int64_t b = 0; b < args.B; ++b) {
    require(count[b] >= 0 && count[b] <= src_width, "count out of [0, src_width]");
    require(start[b] >= 0, "start must be >= 0");
    for (int64_t i = 0; i < count[b]; ++i) {
      const int64_t s = src[b * src_width + i];
      require(s >= 0 && (i == 0 || s > src[b * src_width + i - 1]),
              "src must be non-negative and strictly increasing");
      require(args.descs.empty() || start[b] + s < seq, "start + src is past the cache's end");
    }
  }
}

// The n-gram pool tokens [B, V, G, W] int32 and count [B, V] int32.
void check_pool(Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W) {
  require(B >= 0, "B must be >= 0, found " + std::to_string(B));
  require(V >= 1 && V <= INT32_MAX,
          "V must be in [1, 2^31 - 1] (tokens are stored as int32), found " + std::to_string(V));
  require(G >= 0, "G must be >= 0, found " + std::to_string(G));
  require(W >= 1, "W = N - 1 must be >= 1, found " + std::to_string(W));
  require_ptr(tokens, B * V * G * W, "tokens");
  require_ptr(count, B * V, "count");
}

fastdecode::ngram::Pool pool_of(Ptr tokens, Ptr count, int64_t V, int64_t G, int64_t W) {
  return fastdecode::ngram::Pool{as<int32_t>(tokens), as<int32_t>(count), V, G, W};
}

void check_ngram_sizes(int64_t n, const char* name) {
  require(n >= 0, std::string(name) + " must be >= 0, found " + std::to_string(n));
}

void check_ngram_insert(Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                        Ptr keys, Ptr values, Ptr valid, int64_t M) {
  check_pool(tokens, count, B, V, G, W);
  check_ngram_sizes(M, "M");
  require_ptr(keys, B * M, "keys");
  require_ptr(values, B * M, "values");
  (void)valid;  // null means every insertion is valid
}

void check_ngram_harvest(Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                         Ptr window, Ptr new_tokens, int64_t width) {
  check_pool(tokens, count, B, V, G, W);
  check_ngram_sizes(width, "width");
  require_ptr(window, B * width, "window");
  require_ptr(new_tokens, B * width, "new_tokens");
}

void check_ngram_insert_sequence(Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G,
                                 int64_t W, Ptr seq, int64_t L, Ptr start, Ptr end) {
  check_pool(tokens, count, B, V, G, W);
  check_ngram_sizes(L, "L");
  require_ptr(seq, B * L, "tokens");
  require_ptr(start, B, "start");
  require_ptr(end, B, "end");
}

void check_ngram_lookup(Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                        Ptr keys, Ptr candidates, Ptr out_count) {
  check_pool(tokens, count, B, V, G, W);
  require_ptr(keys, B, "keys");
  require_ptr(candidates, B * G, "candidates");
  require_ptr(out_count, B, "out_count");
}

// y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]): sizes, row strides and pointers, checked.
void check_small_linear(Ptr x, int64_t ldx, Ptr w, int64_t ldw, Ptr bias, Ptr y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K) {
  require(M >= 0 && N >= 0 && K >= 0, "M, N and K must be >= 0, found M=" + std::to_string(M) +
                                          " N=" + std::to_string(N) + " K=" + std::to_string(K));
  constexpr int64_t kMax = int64_t{1} << 40;
  require(M < kMax && N < kMax && K < kMax && ldx < kMax && ldw < kMax && ldy < kMax,
          "a size or row stride is implausibly large");
  require(M <= 1 || ldx >= K, "ldx must be >= K=" + std::to_string(K) + ", found " +
                                  std::to_string(ldx));
  require(N <= 1 || ldw >= K, "ldw must be >= K=" + std::to_string(K) + ", found " +
                                  std::to_string(ldw));
  require(M <= 1 || ldy >= N, "ldy must be >= N=" + std::to_string(N) + ", found " +
                                  std::to_string(ldy));
  require_ptr(x, M * K, "x");
  require_ptr(w, N * K, "weight");
  require_ptr(y, M * N, "y");
  (void)bias;  // null means no bias
}

fastdecode::trie::Mode trie_mode(int mode) {
  require(mode == 0 || mode == 1, "trie mode must be 0 (hier) or 1 (parallel), found " +
                                      std::to_string(mode));
  return static_cast<fastdecode::trie::Mode>(mode);
}

// The trie's methods: token arrays come as int64 pointers and lengths, like the ops' tensors.
void bind_trie(py::module_& m) {
  namespace trie = fastdecode::trie;
  using trie::Trie;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("trie_max_tree_nodes") = trie::kMaxTreeNodes;
  m.attr("trie_max_nodes_total") = trie::kMaxNodesTotal;
  m.attr("trie_max_match_len") = trie::kMaxMatchLen;
  m.attr("trie_max_branch_length") = trie::kMaxBranchLength;
  m.attr("trie_no_request") = trie::kNoRequest;
  py::class_<Trie>(m, "Trie",
                   "Token trie of trie-based lookahead decoding (pointer-level API; use "
                   "fastdecode.decoding.TrieCache instead)")
      .def(py::init([](int64_t vocab_size, int64_t match_len, int64_t branch_length,
                       int64_t decoding_length, int64_t max_nodes_total,
                       std::vector<int64_t> eos) {
             trie::Config c;
             c.vocab_size = vocab_size;
             c.match_len = match_len;
             c.branch_length = branch_length;
             c.decoding_length = decoding_length;
             c.max_nodes_total = max_nodes_total;
             c.eos = std::move(eos);
             return std::make_unique<Trie>(std::move(c));
           }),
           py::arg("vocab_size"), py::arg("match_len"), py::arg("branch_length"),
           py::arg("decoding_length"), py::arg("max_nodes_total"), py::arg("eos"))
      .def_property_readonly("vocab_size", [](const Trie& t) { return t.config().vocab_size; })
      .def_property_readonly("match_len", [](const Trie& t) { return t.config().match_len; })
      .def_property_readonly("branch_length",
                             [](const Trie& t) { return t.config().branch_length; })
      .def_property_readonly("decoding_length",
                             [](const Trie& t) { return t.config().decoding_length; })
      .def_property_readonly("max_nodes_total",
                             [](const Trie& t) { return t.config().max_nodes_total; })
      .def_property_readonly("eos", [](const Trie& t) { return t.config().eos; })
      .def("insert",
           [](Trie& t, Ptr tokens, int64_t n, bool prompt, int64_t request) {
             require_ptr(tokens, n, "tokens");
             t.insert(as<const int64_t>(tokens), n, prompt, request);
           },
           nogil)
      .def("end_request", &Trie::end_request, nogil)
      .def("retrieve",
           [](const Trie& t, Ptr ctx, int64_t n, int64_t max_nodes, int64_t max_depth, int mode,
              int64_t request, Ptr tokens, Ptr parents) {
             require_ptr(ctx, n, "context");
             require_ptr(tokens, max_nodes, "tokens");
             require_ptr(parents, max_nodes, "parents");
             return t.retrieve(as<const int64_t>(ctx), n, max_nodes, max_depth, trie_mode(mode),
                               request, as<int64_t>(tokens), as<int64_t>(parents));
           },
           nogil)
      .def("retrieve_batch",
           [](const Trie& t, const std::vector<Ptr>& ctx, const std::vector<int64_t>& n,
              int64_t max_nodes, int64_t max_depth, int mode, const std::vector<int64_t>& requests,
              Ptr tokens, Ptr parents, bool fixed) {
             const std::vector<const int64_t*> rows = context_rows(ctx, n);
             const int64_t B = static_cast<int64_t>(ctx.size());
             require(max_nodes >= 1, "max_nodes must be >= 1");
             require_ptr(tokens, B * max_nodes, "tokens");
             require_ptr(parents, B * max_nodes, "parents");
             return t.retrieve_batch(rows, n, max_nodes, max_depth, trie_mode(mode), requests,
                                     as<int64_t>(tokens), as<int64_t>(parents), fixed);
           },
           nogil)
      .def("draft_chains",
           [](const Trie& t, const std::vector<Ptr>& ctx, const std::vector<int64_t>& n,
              const std::vector<int64_t>& requests, int64_t max_len, double min_prob,
              double match_factor, Ptr tokens, Ptr probs, Ptr lengths, Ptr matched) {
             const std::vector<const int64_t*> rows = context_rows(ctx, n);
             const int64_t B = static_cast<int64_t>(ctx.size());
             require(max_len >= 1, "max_len must be >= 1");
             require_ptr(tokens, B * max_len, "tokens");
             require_ptr(probs, B * max_len, "probs");
             require_ptr(lengths, B, "lengths");
             require_ptr(matched, B, "matched");
             t.draft_chains(rows, n, requests, max_len, min_prob, match_factor,
                            as<int64_t>(tokens), as<double>(probs), as<int64_t>(lengths),
                            as<int64_t>(matched));
           },
           nogil)
      .def("count",
           [](const Trie& t, Ptr path, int64_t n, bool prompt, int64_t request) {
             require_ptr(path, n, "path");
             return t.count(as<const int64_t>(path), n, prompt, request);
           },
           nogil)
      .def("stats",
           [](const Trie& t) {
             trie::Stats s;
             {
               py::gil_scoped_release release;
               s = t.stats();
             }
             py::dict d;
             d["nodes"] = s.nodes;
             d["pinned"] = s.pinned;
             d["requests"] = s.requests;
             d["evictions"] = s.evictions;
             d["truncated_windows"] = s.truncated;
             d["windows"] = s.windows;
             d["bytes"] = s.bytes;
             return d;
           })
      .def("clear", &Trie::clear, nogil)
      .def("check", &Trie::check_invariants, nogil)
      .def("serialize",
           [](const Trie& t) {
             std::string s;
             {
               py::gil_scoped_release release;
               s = t.serialize();
             }
             return py::bytes(s);
           })
      .def_static("deserialize",
                  [](const py::bytes& data) {
                    char* buf = nullptr;
                    Py_ssize_t len = 0;
                    require(PyBytes_AsStringAndSize(data.ptr(), &buf, &len) == 0,
                            "deserialize needs bytes");
                    py::gil_scoped_release release;  // the bytes object is immutable and held
                    return Trie::deserialize(buf, static_cast<size_t>(len));
                  })
      .def("time_retrieve",
           [](const Trie& t, Ptr ctx, int64_t n, int64_t max_nodes, int64_t max_depth, int mode,
              int64_t request, int64_t iters) {
             require_ptr(ctx, n, "context");
             return t.time_retrieve(as<const int64_t>(ctx), n, max_nodes, max_depth,
                                    trie_mode(mode), request, iters);
           },
           nogil);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  namespace tree = fastdecode::tree;
  namespace kv = fastdecode::kv;
  namespace ngram = fastdecode::ngram;
  m.doc() =
      "fastdecode native kernels (pointer-level API; use fastdecode.ops instead). Every op is "
      "called as op(device, stream, *args): device 'cpu' or 'cuda', stream the cudaStream_t "
      "as an int (ignored on the CPU).";
  m.attr("max_tree_nodes") = tree::kMaxNodes;
  m.attr("max_tensors_per_launch") = kv::kMaxTensorsPerLaunch;
#ifdef FASTDECODE_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_archs") = std::string(FASTDECODE_CUDA_ARCHS);
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_archs") = std::string();
#endif

  def_op(m, "verify_tree",
         "verify_tree(device, stream, draft, parents, predicted, B, T, max_depth, accept_len, "
         "best_node, path, tokens)",
         check_verify,
         [](Ptr draft, Ptr parents, Ptr predicted, int64_t B, int64_t T, int64_t max_depth,
            Ptr accept_len, Ptr best_node, Ptr path, Ptr tokens) {
           tree::verify_cpu(as<const int64_t>(draft), as<const int64_t>(parents),
                            as<const int64_t>(predicted), B, T, max_depth,
                            as<int64_t>(accept_len), as<int64_t>(best_node), as<int64_t>(path),
                            as<int64_t>(tokens));
         },
         FASTDECODE_CUDA([](Ptr draft, Ptr parents, Ptr predicted, int64_t B, int64_t T,
                            int64_t max_depth, Ptr accept_len, Ptr best_node, Ptr path,
                            Ptr tokens, void* stream) {
           tree::verify_cuda(as<const int64_t>(draft), as<const int64_t>(parents),
                             as<const int64_t>(predicted), B, T, max_depth,
                             as<int64_t>(accept_len), as<int64_t>(best_node), as<int64_t>(path),
                             as<int64_t>(tokens), stream);
         }));
  def_op(m, "tree_mask", "tree_mask(device, stream, parents, B, T, mask)", check_mask,
         [](Ptr parents, int64_t B, int64_t T, Ptr mask) {
           tree::mask_cpu(as<const int64_t>(parents), B, T, as<uint8_t>(mask));
         },
         FASTDECODE_CUDA([](Ptr parents, int64_t B, int64_t T, Ptr mask, void* stream) {
           tree::mask_cuda(as<const int64_t>(parents), B, T, as<uint8_t>(mask), stream);
         }));
  def_op(m, "tree_positions",
         "tree_positions(device, stream, parents, prefix_len, B, T, positions)", check_positions,
         [](Ptr parents, Ptr prefix_len, int64_t B, int64_t T, Ptr positions) {
           tree::positions_cpu(as<const int64_t>(parents), as<const int64_t>(prefix_len), B, T,
                               as<int64_t>(positions));
         },
         FASTDECODE_CUDA([](Ptr parents, Ptr prefix_len, int64_t B, int64_t T, Ptr positions,
                            void* stream) {
           tree::positions_cuda(as<const int64_t>(parents), as<const int64_t>(prefix_len), B, T,
                                as<int64_t>(positions), stream);
         }));
  def_op(m, "pack_tree_mask", "pack_tree_mask(device, stream, mask, B, T, packed)", check_pack,
         [](Ptr mask, int64_t B, int64_t T, Ptr packed) {
           tree::pack_cpu(as<const uint8_t>(mask), B, T, as<int32_t>(packed));
         },
         FASTDECODE_CUDA([](Ptr mask, int64_t B, int64_t T, Ptr packed, void* stream) {
           tree::pack_cuda(as<const uint8_t>(mask), B, T, as<int32_t>(packed), stream);
         }));

  def_op(m, "compact_kv",
         "compact_kv(device, stream, ptrs, dims, strides, elem_size, B, start, src, src_width, "
         "count)",
         kv_args,
         [](const KVArgs& a) {
           check_kv_values(a);
           kv::compact_cpu(a.descs, a.unit, a.B, a.start, a.src, a.src_width, a.count);
         },
         FASTDECODE_CUDA([](const KVArgs& a, void* stream) {
           kv::compact_cuda(a.descs, a.unit, a.B, a.start, a.src, a.src_width, a.count, stream);
         }));

  def_op(m, "ngram_insert",
         "ngram_insert(device, stream, tokens, count, B, V, G, W, keys, values, valid, M)",
         check_ngram_insert,
         [](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W, Ptr keys,
            Ptr values, Ptr valid, int64_t M) {
           ngram::insert_cpu(pool_of(tokens, count, V, G, W), B, M, as<const int64_t>(keys),
                             as<const int64_t>(values), as<const uint8_t>(valid));
         },
         FASTDECODE_CUDA([](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                            Ptr keys, Ptr values, Ptr valid, int64_t M, void* stream) {
           ngram::insert_cuda(pool_of(tokens, count, V, G, W), B, M, as<const int64_t>(keys),
                              as<const int64_t>(values), as<const uint8_t>(valid), stream);
         }));
  def_op(m, "ngram_harvest",
         "ngram_harvest(device, stream, tokens, count, B, V, G, W, window, new_tokens, width)",
         check_ngram_harvest,
         [](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W, Ptr window,
            Ptr new_tokens, int64_t width) {
           ngram::harvest_cpu(pool_of(tokens, count, V, G, W), B, width,
                              as<const int64_t>(window), as<const int64_t>(new_tokens));
         },
         FASTDECODE_CUDA([](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                            Ptr window, Ptr new_tokens, int64_t width, void* stream) {
           ngram::harvest_cuda(pool_of(tokens, count, V, G, W), B, width,
                               as<const int64_t>(window), as<const int64_t>(new_tokens), stream);
         }));
  def_op(m, "ngram_insert_sequence",
         "ngram_insert_sequence(device, stream, tokens, count, B, V, G, W, seq, L, start, end)",
         check_ngram_insert_sequence,
         [](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W, Ptr seq,
            int64_t L, Ptr start, Ptr end) {
           ngram::insert_sequence_cpu(pool_of(tokens, count, V, G, W), B, L,
                                      as<const int64_t>(seq), as<const int64_t>(start),
                                      as<const int64_t>(end));
         },
         FASTDECODE_CUDA([](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                            Ptr seq, int64_t L, Ptr start, Ptr end, void* stream) {
           ngram::insert_sequence_cuda(pool_of(tokens, count, V, G, W), B, L,
                                       as<const int64_t>(seq), as<const int64_t>(start),
                                       as<const int64_t>(end), stream);
         }));
  def_op(m, "ngram_lookup",
         "ngram_lookup(device, stream, tokens, count, B, V, G, W, keys, candidates, out_count)",
         check_ngram_lookup,
         [](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W, Ptr keys,
            Ptr candidates, Ptr out_count) {
           ngram::lookup_cpu(pool_of(tokens, count, V, G, W), B, as<const int64_t>(keys),
                             as<int64_t>(candidates), as<int64_t>(out_count));
         },
         FASTDECODE_CUDA([](Ptr tokens, Ptr count, int64_t B, int64_t V, int64_t G, int64_t W,
                            Ptr keys, Ptr candidates, Ptr out_count, void* stream) {
           ngram::lookup_cuda(pool_of(tokens, count, V, G, W), B, as<const int64_t>(keys),
                              as<int64_t>(candidates), as<int64_t>(out_count), stream);
         }));

  namespace linear = fastdecode::linear;
  def_op(m, "small_linear",
         "small_linear(device, stream, x, ldx, w, ldw, bias, y, ldy, M, N, K): CPU only",
         check_small_linear,
         [](Ptr x, int64_t ldx, Ptr w, int64_t ldw, Ptr bias, Ptr y, int64_t ldy, int64_t M,
            int64_t N, int64_t K) {
           linear::small_linear_cpu(as<const float>(x), ldx, as<const float>(w), ldw,
                                    as<const float>(bias), as<float>(y), ldy, M, N, K);
         },
         fastdecode::NoCudaKernel{});
  m.def("small_linear_isa", [] { return std::string(linear::isa_name(linear::active_isa())); },
        "The instruction-set path small_linear takes: avx512, avx2 or scalar");
  m.def("small_linear_isas",
        [] {
          std::vector<std::string> names;
          for (linear::Isa isa : {linear::Isa::avx512, linear::Isa::avx2, linear::Isa::scalar})
            if (linear::isa_supported(isa)) names.emplace_back(linear::isa_name(isa));
          return names;
        },
        "The paths this build and CPU support, fastest first");
  m.def("set_small_linear_isa",
        [](const std::string& name) { linear::set_isa(linear::parse_isa(name, "the small-linear path")); },
        "Forces a path for every later small_linear call of the process");

  bind_trie(m);
}
