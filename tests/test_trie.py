"""TrieCache: a worked example of four sentences, a pure-Python oracle (a Counter of window
prefixes) over random insert / end_request / retrieve sequences, the node budget under heavy
insertion, concurrent inserts and retrievals from 8 threads with exact counts, save/load (round
trip, every truncation, every flipped byte, hand-made inconsistent files) and bad arguments."""

from __future__ import annotations

import math
import struct
import threading
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode import _native, ops
from fastdecode.decoding import TrieCache

pytestmark = pytest.mark.skipif(not _native.cpu_built(), reason="native extension not built")


# ---- oracle ---------------------------------------------------------------------------------


class Oracle:
    """The trie's counts as Counters of window prefixes, and its retrieval rules (no eviction:
    compare only with a budget the test never reaches)."""

    def __init__(self, match_len, branch_length, eos=()):
        self.M, self.W, self.eos = match_len, match_len + branch_length, set(eos)
        self.out = Counter()
        self.prompt = defaultdict(Counter)

    def insert(self, seq, source, rid=None):
        seq = list(seq)
        for i, t in enumerate(seq):
            if t in self.eos:
                seq = seq[:i]
                break
        counts = self.out if source == "shared" else self.prompt[rid]
        for i in range(len(seq) - 1):
            w = tuple(seq[i:i + self.W])
            for j in range(1, len(w) + 1):
                counts[w[:j]] += 1

    def end(self, rid):
        self.prompt.pop(rid, None)

    def key(self, path, rid):
        return (self.prompt[rid][path] if rid in self.prompt else 0, self.out[path])

    def live(self, path, rid):
        return self.key(path, rid) != (0, 0)

    def children(self, path, rid):
        paths = set(self.out) | (set(self.prompt[rid]) if rid in self.prompt else set())
        return [p for p in paths if len(p) == len(path) + 1 and p[:-1] == path
                and self.live(p, rid)]

    def matched(self, path, rid):
        return all(self.live(path[:j], rid) for j in range(1, len(path) + 1))

    def subtree_keys(self, path, rid, depth):
        """Keys of the live nodes strictly below ``path`` down to ``depth`` levels."""
        keys, frontier = [], [path]
        for _ in range(depth):
            frontier = [c for p in frontier for c in self.children(p, rid)]
            keys += [self.key(c, rid) for c in frontier]
        return keys

    def hier(self, ctx, K, D, rid):
        """(matched path, sorted keys of the kept drafts) as the trie must choose them."""
        best = (None, [])
        if K == 1 or D == 0:
            return best
        for k in range(min(self.M, len(ctx)), 0, -1):
            path = tuple(ctx[-k:])
            if not self.matched(path, rid):
                continue
            keys = sorted(self.subtree_keys(path, rid, D), reverse=True)[:K - 1]
            if len(keys) > len(best[1]):
                best = (path, keys)
            if len(keys) >= min(D, K - 1):
                break
        return best


def tree_paths(tokens, parents):
    """Each node's token path below the root (the root's is empty), checking the format."""
    tokens, parents = tokens.tolist(), parents.tolist()
    assert parents[0] == -1
    paths = [()]
    for j in range(1, len(tokens)):
        assert 0 <= parents[j] < j
        paths.append(paths[parents[j]] + (tokens[j],))
    assert len(set(paths)) == len(paths), "siblings must carry distinct tokens"
    return paths


def check_preorder(paths, keys):
    """Depth-first pre-order, children in non-increasing key order."""
    for j in range(1, len(paths)):
        assert paths[j][:-1] == paths[j - 1][:len(paths[j]) - 1], "not a pre-order"
    for j in range(1, len(paths)):
        later = [i for i in range(j + 1, len(paths)) if paths[i][:-1] == paths[j][:-1]]
        assert all(keys[i] <= keys[j] for i in later), "siblings out of rank order"


def check_hier(trie, oracle, ctx, K, D, rid):
    tokens, parents = trie.retrieve(ctx, max_nodes=K, max_depth=D, mode="hier", request_id=rid)
    assert tokens.dtype == parents.dtype == torch.int64 and tokens.device.type == "cpu"
    assert tokens[0] == ctx[-1]
    paths = tree_paths(tokens, parents)
    path, want = oracle.hier(ctx, K, D, rid)
    assert len(paths) == len(want) + 1
    if path is None:
        return
    assert all(len(p) <= D for p in paths)
    keys = [oracle.key(path + p, rid) for p in paths]
    assert all(k != (0, 0) for k in keys[1:]), "a drafted node is not a live trie path"
    assert sorted(keys[1:], reverse=True) == want, "not the best-ranked nodes"
    check_preorder(paths, keys)


def check_parallel(trie, oracle, ctx, K, D, rid):
    tokens, parents = trie.retrieve(ctx, max_nodes=K, max_depth=D, mode="parallel",
                                    request_id=rid)
    assert tokens[0] == ctx[-1]
    paths = tree_paths(tokens, parents)
    assert len(paths) <= K
    parents = parents.tolist()
    if len(paths) == 1:
        assert oracle.hier(ctx, K, D, rid)[0] is None  # nothing below any matched context
        return
    assert all(parents[j] in (0, j - 1) for j in range(1, len(paths))), "chains only"

    def explains(path):  # the tree is the parallel layout below matched path ``path``
        if not oracle.matched(path, rid):
            return False
        heads = [p for p in paths[1:] if len(p) == 1]
        top = sorted((oracle.key(c, rid) for c in oracle.children(path, rid)), reverse=True)
        if [oracle.key(path + h, rid) for h in heads] != top[:len(heads)]:
            return False
        for j in range(1, len(paths)):
            full = path + paths[j]
            if not oracle.live(full, rid):
                return False
            kids = oracle.children(full, rid)
            last = j + 1 == len(paths) or parents[j + 1] != j
            if not last:  # the chain goes on with a best child
                best = max((oracle.key(c, rid) for c in kids), default=None)
                if best != oracle.key(path + paths[j + 1], rid):
                    return False
            elif j + 1 < len(paths) and kids and len(paths[j]) < D:
                return False  # a chain may end early only for lack of children
        return True

    assert any(explains(tuple(ctx[-k:])) for k in range(min(oracle.M, len(ctx)), 0, -1))


# ---- worked example -------------------------------------------------------------------------

THE, CAT, SAT, ON, DOWN, DOT, IS, BLACK = range(1, 9)


def example_trie(**kw):
    trie = TrieCache(16, branch_length=3, decoding_length=8, **kw)
    for seq in ([THE, CAT, SAT, ON, THE], [THE, CAT, SAT, ON, THE], [THE, CAT, SAT, DOWN, DOT],
                [THE, CAT, IS, BLACK]):
        trie.insert(seq, source="shared")
    return trie


def test_worked_example():
    trie = example_trie()
    tokens, parents = trie.retrieve(torch.tensor([THE, CAT]))
    assert tokens.tolist() == [CAT, SAT, ON, THE, DOWN, DOT, IS, BLACK]
    assert parents.tolist() == [-1, 0, 1, 2, 1, 4, 0, 6]
    tokens, parents = trie.retrieve([THE, CAT], mode="parallel")
    assert tokens.tolist() == [CAT, SAT, ON, THE, IS, BLACK]
    assert parents.tolist() == [-1, 0, 1, 2, 0, 4]
    # Smaller budgets keep the best nodes; depth 1 keeps the root's children.
    assert trie.retrieve([THE, CAT], max_nodes=3)[0].tolist() == [CAT, SAT, ON]
    assert trie.retrieve([THE, CAT], max_depth=1)[0].tolist() == [CAT, SAT, IS]
    assert trie.retrieve([THE, CAT], max_nodes=1)[0].tolist() == [CAT]
    # Unknown contexts give the root alone; a 1-token fallback finds "cat" anywhere.
    assert trie.retrieve([12, 13])[0].tolist() == [13]
    assert trie.retrieve([12, CAT])[0].tolist()[:4] == [CAT, SAT, ON, THE]
    assert trie.count([THE, CAT]) == 4 and trie.count([CAT, SAT, ON]) == 2


def test_default_request_id_matches_the_native_one():
    from fastdecode.decoding import trie_cache

    assert trie_cache._NO_REQUEST == _native._C.trie_no_request


def test_retrieved_tree_feeds_verify_tree():
    trie = example_trie()
    tokens, parents = trie.retrieve([THE, CAT])
    predicted = torch.full_like(tokens, 15)
    predicted[0], predicted[1], predicted[4] = SAT, DOWN, DOT  # model says "sat down ."
    res = ops.verify_tree(tokens[None], parents[None], predicted[None])
    assert res.accept_len.tolist() == [3] and res.best_node.tolist() == [5]
    assert ops.tree_mask(parents[None]).shape == (1, 8, 8)


# ---- oracle comparisons ---------------------------------------------------------------------

V = 5
seqs = st.lists(st.integers(0, V - 1), min_size=0, max_size=12)
rids = st.sampled_from([None, 0, 1])
op = st.one_of(
    st.tuples(st.just("insert"), seqs, st.sampled_from(["request", "shared"]), rids),
    st.tuples(st.just("end"), rids),
)


@settings(max_examples=40)
@given(ops_=st.lists(op, min_size=1, max_size=14), match_len=st.integers(1, 3),
       branch_length=st.integers(1, 4),
       queries=st.lists(st.tuples(st.lists(st.integers(0, V - 1), min_size=1, max_size=4),
                                  st.integers(1, 12), st.integers(0, 5), rids),
                        min_size=1, max_size=6))
def test_matches_oracle(ops_, match_len, branch_length, queries):
    trie = TrieCache(V, match_len=match_len, branch_length=branch_length)
    oracle = Oracle(match_len, branch_length)
    for o in ops_:
        if o[0] == "insert":
            _, seq, source, rid = o
            trie.insert(seq, source=source, request_id=rid)
            oracle.insert(seq, source, rid)
        else:
            trie.end_request(o[1])
            oracle.end(o[1])
        trie.check()
    for path in set(oracle.out) | {p for c in oracle.prompt.values() for p in c}:
        assert trie.count(list(path)) == oracle.out[path]
        for rid in (None, 0, 1):
            assert trie.count(list(path), "request", rid) == oracle.key(path, rid)[0]
    # Nodes held only by released prompts are gone.
    live = {p for p in oracle.out if oracle.out[p]} | {p for c in oracle.prompt.values()
                                                        for p in c if c[p]}
    assert trie.num_nodes == len(live)
    for ctx, K, D, rid in queries:
        check_hier(trie, oracle, ctx, K, D, rid)
        check_parallel(trie, oracle, ctx, K, D, rid)


def test_prompt_counts_are_per_request():
    trie = TrieCache(32, branch_length=4)
    trie.insert([1, 2, 3, 4, 5], source="request", request_id=7)
    assert trie.retrieve([1, 2], request_id=7)[0].tolist() == [2, 3, 4, 5]
    assert trie.retrieve([1, 2], request_id=8)[0].tolist() == [2]  # invisible to others
    assert trie.retrieve([1, 2])[0].tolist() == [2]
    trie.insert([2, 3, 9], source="shared")
    # Request 7 ranks its prompt branch first, others see only the output branch.
    assert trie.retrieve([2], request_id=7)[0].tolist() == [2, 3, 4, 5, 9]
    assert trie.retrieve([2], request_id=8)[0].tolist() == [2, 3, 9]
    n = trie.num_nodes
    assert trie.end_request(7) > 0 and trie.end_request(7) == 0
    assert trie.num_nodes == 5 < n  # only the output windows' nodes are left
    assert trie.retrieve([1, 2], request_id=7)[0].tolist() == [2, 3, 9]
    trie.check()


def test_prompt_outranks_output():
    trie = TrieCache(32, branch_length=2)
    for _ in range(5):
        trie.insert([1, 2, 3], source="shared")
    trie.insert([1, 2, 4], source="request", request_id=0)
    assert trie.retrieve([1, 2], max_depth=1, request_id=0)[0].tolist() == [2, 4, 3]
    assert trie.retrieve([1, 2], max_depth=1, request_id=1)[0].tolist() == [2, 3]


def test_prompt_child_found_past_the_first_entries():
    trie = TrieCache(64, branch_length=2)
    for k in range(10, 40):  # 30 output children of "1", each above the prompt child
        trie.insert([1, k], source="shared")
        trie.insert([1, k], source="shared")
    trie.insert([1, 5, 6], source="request", request_id=0)
    tokens, parents = trie.retrieve([1], max_nodes=5, request_id=0)
    assert tokens.tolist()[:3] == [1, 5, 6] and parents.tolist()[:3] == [-1, 0, 1]
    assert trie.retrieve([1], max_nodes=3, max_depth=1)[0].tolist() == [1, 10, 11]


def test_eos_cuts_insertions():
    trie = TrieCache(32, eos_token_ids=[0])
    trie.insert([5, 6, 7, 0, 8, 9], source="shared")
    assert trie.count([7, 0]) == 0 and trie.count([8]) == 0 and trie.count([6, 7]) == 1
    assert trie.eos_token_ids == (0,)


def test_longest_context_first_then_fallback():
    trie = TrieCache(32, match_len=2, branch_length=3)
    trie.insert([1, 5, 6, 7, 8], source="shared")  # "5" continues with 6 7 8 after 1 ...
    trie.insert([2, 5, 9], source="shared")         # ... and with 9 after 2
    assert trie.retrieve([2, 5], max_depth=1)[0].tolist() == [5, 9]  # longest context first
    assert trie.retrieve([1, 5])[0].tolist() == [5, 6, 7, 8]
    # "2 5" gives 1 draft < min(max_depth, max_nodes - 1) = 3: the 1-token context "5" has more.
    t, _ = trie.retrieve([2, 5])
    assert sorted(t.tolist()) == [5, 6, 7, 8, 9]
    assert trie.retrieve([4, 5])[0].tolist() == t.tolist()  # "4 5" unknown: "5" alone


def test_retrieve_batch_matches_rows():
    trie = example_trie()
    trie.insert([SAT, DOWN, 12], source="request", request_id=3)
    contexts = [torch.tensor([THE, CAT]), [CAT, SAT], np.array([15], dtype=np.int64), [DOWN]]
    rids = [None, 3, 3, None]
    tokens, parents = trie.retrieve_batch(contexts, request_ids=rids)
    rows = [trie.retrieve(c, request_id=r) for c, r in zip(contexts, rids)]
    T = max(len(t) for t, _ in rows)
    assert tokens.shape == parents.shape == (4, T)
    for b, (t, p) in enumerate(rows):
        assert tokens[b, :len(t)].tolist() == t.tolist()
        assert parents[b, :len(p)].tolist() == p.tolist()
        assert (tokens[b, len(t):] == 0).all() and (parents[b, len(p):] == -2).all()
    tokens, parents = trie.retrieve_batch(contexts, max_nodes=16, pad_to_max_nodes=True)
    assert tokens.shape == (4, 16)
    assert ops.verify_tree(tokens, parents, torch.zeros_like(tokens)).accept_len.shape == (4,)
    tokens, parents = trie.retrieve_batch([])
    assert tokens.shape == (0, 1)


# ---- memory bound ---------------------------------------------------------------------------


def test_budget_holds_under_heavy_insertion():
    budget = 300
    trie = TrieCache(1000, branch_length=6, max_nodes_total=budget)
    gen = torch.Generator().manual_seed(0)
    for step in range(400):  # ~16k windows, ~100k nodes' worth
        seq = torch.randint(0, 1000, (40,), generator=gen)
        trie.insert(seq, source="shared")
        assert trie.num_nodes <= budget
        if step % 50 == 0:
            trie.check()
    assert trie.num_nodes == budget and trie.stats()["evictions"] > 10_000
    trie.check()
    # The most recent sequence survives; retrieval still works.
    seq = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    trie.insert(seq, source="shared")
    assert trie.retrieve([7, 8])[0].tolist() == [8, 9, 10, 11, 12, 13, 14]
    assert trie.num_nodes <= budget
    trie.check()


def test_eviction_is_least_recently_used():
    trie = TrieCache(100, branch_length=2, max_nodes_total=12)
    trie.insert([1, 2, 3, 4], source="shared")   # 3 windows: 1 2 3 4 | 2 3 4 | 3 4 -> 9 nodes
    trie.insert([50, 51, 52], source="shared")  # needs 5 nodes: evicts the oldest leaves
    assert trie.num_nodes <= 12
    assert trie.retrieve([50, 51])[0].tolist() == [51, 52]
    assert trie.count([3, 4]) == 1  # the most recent windows of the first sequence survive
    assert trie.count([1, 2, 3, 4]) == 0
    trie.insert([3, 4, 60], source="shared")  # refreshes "3 4"
    trie.insert([70, 71, 72], source="shared")
    assert trie.count([3, 4, 60]) == 1 and trie.count([3, 4]) == 2  # recent: kept
    assert trie.count([50, 51, 52]) == 0  # older: evicted
    trie.check()


def test_pinned_prompts_truncate_but_never_exceed_budget():
    trie = TrieCache(1000, branch_length=4, max_nodes_total=50)
    trie.insert(list(range(100)), source="request", request_id=0)  # needs ~500 nodes
    assert trie.num_nodes == 50 and trie.stats()["truncated_windows"] > 0
    trie.insert(list(range(200, 230)), source="shared")  # no room: all pinned
    assert trie.num_nodes == 50
    trie.check()
    trie.end_request(0)
    assert trie.num_nodes == 0
    trie.insert(list(range(200, 230)), source="shared")
    assert trie.num_nodes == 50
    trie.check()


@settings(max_examples=25)
@given(ops_=st.lists(op, min_size=1, max_size=30), budget=st.integers(1, 40),
       match_len=st.integers(1, 3), branch_length=st.integers(1, 4))
def test_budget_and_invariants_random(ops_, budget, match_len, branch_length):
    trie = TrieCache(V, match_len=match_len, branch_length=branch_length, max_nodes_total=budget)
    for o in ops_:
        if o[0] == "insert":
            trie.insert(o[1], source=o[2], request_id=o[3])
        else:
            trie.end_request(o[1])
        assert trie.num_nodes <= budget
        trie.check()
        for ctx in ([0], [1, 2], [3, 4, 0]):
            tree_paths(*trie.retrieve(ctx, max_nodes=8))


# ---- threads --------------------------------------------------------------------------------


def test_threads_lose_no_count():
    n_threads, repeats, width = 8, 30, 200
    trie = TrieCache(n_threads * width, branch_length=6)
    oracle = Oracle(2, 6)
    plan = []
    for t in range(n_threads):  # distinct token ranges per thread: known, disjoint counts
        gen = torch.Generator().manual_seed(t)
        seqs = [torch.randint(t * width, (t + 1) * width, (int(n),), generator=gen)
                for n in torch.randint(2, 40, (5,), generator=gen)]
        plan.append(seqs)
        for _ in range(repeats):
            for s in seqs:
                oracle.insert(s.tolist(), "shared")
    errors = []
    barrier = threading.Barrier(n_threads)

    def work(t):
        try:
            barrier.wait()
            for r in range(repeats):
                for s in plan[t]:
                    trie.insert(s, source="shared")
                    trie.insert(s, source="request", request_id=t)
                    tokens, parents = trie.retrieve(s[:3], request_id=t)
                    tree_paths(tokens, parents)
                    trie.retrieve_batch([s[:2], s[:1]], max_nodes=16)
                trie.end_request(t)
        except Exception as e:  # surfaced after join
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for path, c in oracle.out.items():
        assert trie.count(list(path)) == c
    assert trie.stats()["pinned"] == 0 and trie.stats()["requests"] == 0
    assert trie.num_nodes == len(oracle.out)
    trie.check()


# ---- persistence ----------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """trie_io.cpp's checksum, for hand-made files."""
    mask, prime = 2**64 - 1, 0x100000001B3
    h, n, i = 0xCBF29CE484222325, len(data), 0
    for i in range(0, n - n % 8, 8):
        h = ((h ^ int.from_bytes(data[i:i + 8], "little")) * prime) & mask
    tail = data[n - n % 8:]
    h = ((h ^ int.from_bytes(tail + bytes(8 - len(tail)), "little")) * prime) & mask
    h = ((h ^ n) * prime) & mask
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    return h ^ (h >> 33)


def reseal(body: bytes) -> bytes:
    return body + struct.pack("<Q", checksum(body))


def small_saved_trie():
    trie = TrieCache(64, branch_length=3, decoding_length=9, max_nodes_total=40,
                     eos_token_ids=[63])
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        trie.insert(torch.randint(0, 20, (12,), generator=gen), source="shared")
    trie.insert([1, 2, 3, 4, 5], source="request", request_id=4)
    return trie


def test_save_load_round_trip(tmp_path):
    trie = small_saved_trie()
    path = tmp_path / "trie.bin"
    trie.save(path)
    back = TrieCache.load(path)
    back.check()
    assert (back.vocab_size, back.branch_length, back.decoding_length, back.max_nodes_total,
            back.match_len, back.eos_token_ids) == (64, 3, 9, 40, 2, (63,))
    assert back.to_bytes() == trie.to_bytes()
    assert back.stats()["nodes"] == trie.num_nodes and back.stats()["requests"] == 1
    gen = torch.Generator().manual_seed(2)
    for _ in range(8):  # same future: same evictions, same trees
        seq = torch.randint(0, 20, (10,), generator=gen)
        for t in (trie, back):
            t.insert(seq, source="shared")
        for ctx in ([1, 2], [seq[3].item(), seq[4].item()], [5]):
            for rid in (None, 4):
                a, b = trie.retrieve(ctx, request_id=rid), back.retrieve(ctx, request_id=rid)
                assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert back.to_bytes() == trie.to_bytes()
    assert back.count([1, 2, 3], "request", 4) == 1
    back.end_request(4)
    back.check()


def test_load_rejects_every_truncation_and_flipped_byte(tmp_path):
    data = small_saved_trie().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(ValueError, match="invalid trie file"):
            TrieCache.from_bytes(data[:cut])
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(ValueError, match="invalid trie file"):
            TrieCache.from_bytes(bytes(bad))
    with pytest.raises(ValueError, match="trailing|truncated or padded"):
        TrieCache.from_bytes(data + b"\0")
    with pytest.raises(ValueError, match="bad magic"):
        TrieCache.from_bytes(b"x" * 100)
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        TrieCache.load(path)
    with pytest.raises(FileNotFoundError):
        TrieCache.load(tmp_path / "missing.bin")


def test_load_rejects_inconsistent_files_with_valid_checksums():
    trie = TrieCache(16, branch_length=2)
    trie.insert([1, 2, 3], source="shared")
    body = trie.to_bytes()[:-8]
    assert TrieCache.from_bytes(reseal(body)).count([1, 2, 3]) == 1
    head, payload = body[:64], body[64:]
    nodes = payload[8:]  # after decoding_length (no EOS ids)
    records = [list(struct.unpack_from("<IiII", nodes, 16 * i)) for i in range(len(nodes) // 16)]

    def build(recs, header=head):
        return reseal(header + payload[:8] + b"".join(struct.pack("<IiII", *r) for r in recs))

    cases = {
        "outside the vocabulary": lambda r: r[1].__setitem__(1, 99),
        "before its parent": lambda r: r[0].__setitem__(0, 5),
        "duplicate edge": lambda r: r[3].__setitem__(1, r[0][1]),  # a 2nd root child "1"
        "grows below": lambda r: r[1].__setitem__(2, 1000),
        "holds no count": lambda r: [x.__setitem__(2, 0) for x in r],
        "permutation": lambda r: r[1].__setitem__(3, r[0][3]),
    }
    for message, edit in cases.items():
        recs = [list(x) for x in records]
        edit(recs)
        with pytest.raises(ValueError, match=message):
            TrieCache.from_bytes(build(recs))
    version = bytearray(head)
    version[8] = 2
    with pytest.raises(ValueError, match="unsupported version 2"):
        TrieCache.from_bytes(build(records, bytes(version)))
    settings_ = bytearray(head)
    settings_[24:28] = struct.pack("<i", 0)  # match_len 0
    with pytest.raises(ValueError, match="match_len"):
        TrieCache.from_bytes(build(records, bytes(settings_)))


# ---- bad arguments --------------------------------------------------------------------------


def test_bad_arguments():
    trie = example_trie()
    with pytest.raises(ValueError, match="vocab_size"):
        TrieCache(0)
    with pytest.raises(ValueError, match="branch_length"):
        TrieCache(10, branch_length=-1)
    with pytest.raises(ValueError, match="max_nodes_total"):
        TrieCache(10, max_nodes_total=0)
    with pytest.raises(ValueError, match="decoding_length"):
        TrieCache(10, decoding_length=5000)
    with pytest.raises(TypeError, match="match_len"):
        TrieCache(10, match_len=1.5)
    with pytest.raises(ValueError, match="eos"):
        TrieCache(10, eos_token_ids=[10])
    with pytest.raises(ValueError, match="max_nodes"):
        trie.retrieve([1], max_nodes=-1)
    with pytest.raises(ValueError, match="max_nodes"):
        trie.retrieve([1], max_nodes=0)
    with pytest.raises(ValueError, match="max_depth"):
        trie.retrieve([1], max_depth=-3)
    with pytest.raises(ValueError, match="at least one token"):
        trie.retrieve([])
    with pytest.raises(ValueError, match="unknown mode"):
        trie.retrieve([1], mode="tree")
    with pytest.raises(ValueError, match="unknown source"):
        trie.insert([1, 2], source="input")
    with pytest.raises(TypeError, match="dtype"):
        trie.insert(torch.tensor([1.0, 2.0]), source="shared")
    with pytest.raises(TypeError, match="dtype"):
        trie.retrieve(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        trie.insert(np.array([1, 2], dtype=np.int32))
    with pytest.raises(TypeError, match="ints"):
        trie.insert([1, 2.5])
    with pytest.raises(TypeError, match="ints"):
        trie.insert([1, True])
    with pytest.raises(TypeError):
        trie.insert("abc")
    with pytest.raises(ValueError, match="1-D"):
        trie.insert(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trie.insert([1, 16], source="shared")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trie.insert([-1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trie.retrieve([3, 99])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trie.count([99])
    with pytest.raises(ValueError, match="int64"):
        trie.insert([1, 2**70])
    with pytest.raises(ValueError, match="request_id"):
        trie.insert([1, 2], request_id=-4)
    with pytest.raises(TypeError, match="request_id"):
        trie.insert([1, 2], request_id="a")
    with pytest.raises(ValueError, match="request_ids"):
        trie.retrieve_batch([[1], [2]], request_ids=[0])
    with pytest.raises(TypeError, match="contexts"):
        trie.retrieve_batch(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="bytes"):
        TrieCache.from_bytes("not bytes")
    # A rejected insertion changes nothing.
    before = trie.to_bytes()
    with pytest.raises(ValueError):
        trie.insert([1, 2, 3, 4, 5, 6, 7, 100], source="shared")
    assert trie.to_bytes() == before
    trie.check()


@pytest.mark.parametrize("old, new", [("prompt", "request"), ("output", "shared")])
def test_old_source_names_warn_and_still_work(old, new):
    trie, same = TrieCache(10), TrieCache(10)
    with pytest.warns(DeprecationWarning, match=f"source='{old}' is deprecated; use source='{new}'"):
        trie.insert([1, 2, 3], source=old, request_id=4)
    same.insert([1, 2, 3], source=new, request_id=4)
    assert trie.count([1, 2], new, 4) == same.count([1, 2], new, 4) == 1
    with pytest.warns(DeprecationWarning):
        assert trie.count([1, 2], old, 4) == 1


# ---- chains for engines that verify chains --------------------------------------------------


def test_draft_chains_worked_example():
    trie = TrieCache(100, match_len=4, branch_length=8)
    trie.insert([1, 2, 3, 4, 5, 6, 1, 2, 3, 7], source="request", request_id=5)
    trie.insert([1, 2, 3, 4, 5, 9, 9], source="shared")
    # request 5: "1 2 3" goes on to 4 or 7 (1/2 each); shared: once, to 4 5 9 9 (1 each)
    tokens, probs, lengths, matched = trie.draft_chains([[1, 2, 3], [9], [42]], 6,
                                                         request_ids=[5, None, 5])
    assert tokens.dtype == torch.int64 and probs.dtype == torch.float64
    assert tokens[0].tolist() == [4, 5, 9, 9, 0, 0] and probs[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert lengths.tolist() == [4, 1, 0] and matched.tolist() == [3, 1, 0]
    assert tokens[2].tolist() == [0] * 6 and probs[2].tolist() == [0.0] * 6
    # the request's own chain alone: "1 2 3" went on to 4 twice and to 7 once
    solo = TrieCache(100, match_len=4, branch_length=8)
    solo.insert([1, 2, 3, 4, 5, 6] * 2 + [1, 2, 3, 7], source="request", request_id=5)
    t, p, n, _ = solo.draft_chains([[1, 2, 3]], 6, request_ids=[5])
    assert t[0, :3].tolist() == [4, 5, 6] and p[0, :3].tolist() == pytest.approx([2 / 3] * 3)
    assert solo.draft_chains([[1, 2, 3]], 6, request_ids=[5], min_prob=0.7)[2].tolist() == [0]
    # another request sees none of request 5's counts
    assert solo.draft_chains([[1, 2, 3]], 6, request_ids=[6])[2].tolist() == [0]
    # a chain is at most ceil(k * match_factor) long for a k-token match
    assert trie.draft_chains([[1, 2, 3]], 6, request_ids=[5], match_factor=1.0)[2].tolist() == [3]
    assert trie.draft_chains([[3]], 6, request_ids=[5], match_factor=0.5)[2].tolist() == [1]


def test_draft_chains_are_paths_of_running_count_ratios():
    rng = np.random.default_rng(0)
    trie = TrieCache(12, match_len=3, branch_length=6)
    for rid in (0, 1):
        trie.insert(rng.integers(0, 12, 80).tolist(), source="request", request_id=rid)
    trie.insert(rng.integers(0, 12, 200).tolist(), source="shared")
    contexts = [rng.integers(0, 12, int(rng.integers(1, 6))).tolist() for _ in range(40)]
    rids = [int(r) if r < 2 else None for r in rng.integers(0, 3, 40)]
    tokens, probs, lengths, matched = trie.draft_chains(contexts, 5, rids, min_prob=0.05,
                                                        match_factor=1.5)
    for ctx, rid, tok, pr, n, k in zip(contexts, rids, tokens.tolist(), probs.tolist(),
                                       lengths.tolist(), matched.tolist()):
        assert 0 <= n <= min(5, math.ceil(1.5 * k)) and k <= min(3, len(ctx))
        assert tok[n:] == [0] * (5 - n) and pr[n:] == [0.0] * (5 - n)
        if n == 0:
            continue
        path = ctx[len(ctx) - k:]
        ok = False
        for source in ("request", "shared"):
            if source == "request" and rid is None:
                continue
            p, fits = 1.0, True
            for j in range(n):
                above = trie.count(path + tok[:j], source, rid)
                below = trie.count(path + tok[:j + 1], source, rid)
                p *= below / above if above else 0.0
                fits = fits and abs(p - pr[j]) < 1e-12 and p >= 0.05
            ok = ok or fits
        assert ok, (ctx, rid, tok[:n], pr[:n])


def test_draft_chains_bad_arguments():
    trie = TrieCache(10, match_len=2, branch_length=4)
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 1024\], found 0"):
        trie.draft_chains([[1]], 0)
    with pytest.raises(ValueError, match="min_prob must be a number in"):
        trie.draft_chains([[1]], 4, min_prob=1.5)
    with pytest.raises(ValueError, match="match_factor must be a number"):
        trie.draft_chains([[1]], 4, match_factor=float("nan"))
    with pytest.raises(ValueError, match="request_ids has 2 entries for 1 contexts"):
        trie.draft_chains([[1]], 4, request_ids=[1, 2])
    with pytest.raises(TypeError, match="contexts must be a list"):
        trie.draft_chains(torch.tensor([1]), 4)
    with pytest.raises(ValueError):
        trie.draft_chains([[1, 10]], 4)  # outside the vocabulary
