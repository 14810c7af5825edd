"""NGramPool: a pure-Python oracle (a dict of lists per row) against every backend over random
operation sequences, hand-worked examples, the memory bound, torch.compile / CUDA graphs, and
bad inputs (which raise and leave the pool unchanged)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BACKENDS_ON, DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdecode
from fastdecode.decoding import NGramPool


class Oracle:
    """The pool's semantics on plain Python lists: ``rows[b][key]`` lists value tuples, most
    recently used first."""

    def __init__(self, B, V, N, G):
        self.V, self.N, self.G = V, N, G
        self.rows = [{} for _ in range(B)]

    def insert(self, b, key, value):
        value = tuple(value)
        if self.G == 0 or not 0 <= key < self.V or not all(0 <= t < self.V for t in value):
            return
        entries = self.rows[b].setdefault(key, [])
        if value in entries:
            entries.remove(value)
        elif len(entries) == self.G:
            entries.pop()
        entries.insert(0, value)

    def lookup(self, b, key):
        return list(self.rows[b].get(key, [])) if 0 <= key < self.V else []

    def apply(self, op):
        kind, args = op
        if kind == "insert":
            keys, values, valid, _ = args
            for b, row in enumerate(keys):
                for m, key in enumerate(row):
                    if valid is None or valid[b][m]:
                        self.insert(b, key, values[b][m])
        elif kind == "harvest":
            window, new = args
            for b, levels in enumerate(window):
                for j, key in enumerate(levels[0]):
                    self.insert(b, key, [lv[j] for lv in levels[1:]] + [new[b][j]])
        elif kind == "sequence":
            tokens, start, end = args
            for b, seq in enumerate(tokens):
                lo, hi = max(start[b], 0), min(end[b], len(seq))
                for i in range(lo, hi - self.N + 1):
                    self.insert(b, seq[i], seq[i + 1:i + self.N])
        else:  # lookup
            (keys,) = args
            return [self.lookup(b, k) for b, k in enumerate(keys)]
        return None


def ints(x, device):
    return torch.tensor(x, dtype=torch.int64, device=device)


def apply_pool(pool, op, B, device):
    """Runs one oracle operation on the pool; returns lookup results as Python lists."""
    kind, args = op
    if kind == "insert":
        keys, values, valid, dtype = args
        M = len(keys[0])
        mask = None if valid is None else torch.tensor(valid, device=device).to(dtype).view(B, M)
        pool.insert(ints(keys, device).view(B, M), ints(values, device).view(B, M, pool.n - 1),
                    mask)
    elif kind == "harvest":
        window, new = args
        W = len(new[0])
        pool.harvest(ints(window, device).view(B, pool.n - 1, W), ints(new, device).view(B, W))
    elif kind == "sequence":
        tokens, start, end = args
        pool.insert_sequence(ints(tokens, device).view(B, len(tokens[0])), ints(start, device),
                             ints(end, device))
    else:
        cand, count = pool.lookup(ints(args[0], device))
        assert cand.shape == (B, pool.g, pool.n - 1) and cand.dtype == torch.int64
        assert count.shape == (B,) and count.dtype == torch.int64
        cand, count = cand.tolist(), count.tolist()
        for b in range(B):  # padding past the count is -1
            assert all(t == -1 for e in cand[b][count[b]:] for t in e)
        return [[tuple(e) for e in cand[b][:count[b]]] for b in range(B)]
    return None


def state(pool):
    """The pool's content as the oracle's rows (keys with no entries left out)."""
    count, tokens = pool.count.tolist(), pool.tokens.tolist()
    return [{v: [tuple(e) for e in tokens[b][v][:c]] for v, c in enumerate(row) if c}
            for b, row in enumerate(count)]


def check_all(device, B, V, N, G, ops):
    """Every backend runs ``ops`` on a fresh pool and matches the oracle after every op; all
    backends end with identical pool tensors."""
    oracle, want = Oracle(B, V, N, G), []
    for op in ops:
        result = oracle.apply(op)
        want.append((result, copy.deepcopy(oracle.rows)))
    finals = []
    for backend in BACKENDS_ON[device]:
        pool = NGramPool(B, V, N, G, device)
        with fastdecode.use_backend(backend):
            for i, op in enumerate(ops):
                got = apply_pool(pool, op, B, device)
                assert (got, state(pool)) == want[i], (backend, i, op)
        assert pool.nbytes == B * V * (G * (N - 1) + 1) * 4
        assert 0 <= int(pool.count.min()) and int(pool.count.max()) <= G
        finals.append((pool.tokens, pool.count))
    for tokens, count in finals[1:]:
        assert torch.equal(tokens, finals[0][0]) and torch.equal(count, finals[0][1])


# ---- random operation sequences -------------------------------------------------------------


def grid(elem, *shape):
    """A strategy for nested lists of ``shape``."""
    if not shape:
        return elem
    return st.lists(grid(elem, *shape[1:]), min_size=shape[0], max_size=shape[0])


@st.composite
def operations(draw, B, V, N):
    # Mostly few distinct in-vocabulary tokens (repeats, full keys), sometimes out of range.
    tok = st.one_of(st.integers(0, min(V - 1, 2)), st.integers(0, V - 1), st.integers(-2, V + 1))
    kind = draw(st.sampled_from(["insert", "harvest", "sequence", "lookup"]))
    if kind == "insert":
        M = draw(st.integers(0, 6))
        dtype = draw(st.sampled_from([None, torch.bool, torch.uint8]))
        valid = None if dtype is None else draw(grid(st.integers(0, 3), B, M))
        return kind, (draw(grid(tok, B, M)), draw(grid(tok, B, M, N - 1)), valid, dtype)
    if kind == "harvest":
        W = draw(st.integers(0, 5))
        return kind, (draw(grid(tok, B, N - 1, W)), draw(grid(tok, B, W)))
    if kind == "sequence":
        L = draw(st.integers(0, 12))
        bound = st.one_of(st.integers(0, L), st.integers(-2, L + 2))  # mostly in [0, L]
        return kind, (draw(grid(tok, B, L)), draw(grid(bound, B)), draw(grid(bound, B)))
    return kind, (draw(grid(tok, B)),)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=200)
@given(data=st.data(), B=st.integers(1, 3), V=st.integers(1, 6), N=st.integers(2, 4),
       G=st.integers(0, 3))
def test_random_operations(device, data, B, V, N, G):
    ops = data.draw(st.lists(operations(B, V, N), min_size=1, max_size=6))
    check_all(device, B, V, N, G, ops)


# ---- hand-worked examples -------------------------------------------------------------------


def each_backend(device, B, V, N, G):
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            yield backend, NGramPool(B, V, N, G, device)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_worked_sequence(device):
    # 3-grams of 1 2 3 1 2 4 1 2 3: key 1 gets (2, 3), then (2, 4) in front, then (2, 3) again
    # moves back to the front; key 2 gets (3, 1) then (4, 1); keys 3 and 4 one entry each.
    # Row 1 takes the 3-grams inside [2, 6) of 0 1 2 ... 8 only: (2; 3, 4) and (3; 4, 5).
    for _, pool in each_backend(device, 2, 10, 3, 2):
        seq = ints([[1, 2, 3, 1, 2, 4, 1, 2, 3], list(range(9))], device)
        pool.insert_sequence(seq, ints([-3, 2], device), ints([100, 6], device))
        cand, count = pool.lookup(ints([1, 2], device))
        assert count.tolist() == [2, 1]
        assert cand.tolist() == [[[2, 3], [2, 4]], [[3, 4], [-1, -1]]]
        cand, count = pool.lookup(ints([2, 3], device))
        assert count.tolist() == [2, 1]
        assert cand.tolist() == [[[4, 1], [3, 1]], [[4, 5], [-1, -1]]]
        cand, count = pool.lookup(ints([4, 4], device))
        assert count.tolist() == [1, 0]
        assert cand[0, 0].tolist() == [1, 2] and cand[1].tolist() == [[-1, -1], [-1, -1]]
        assert pool.count[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
        cand, count = pool.lookup(ints([-1, 10], device))  # keys outside [0, V)
        assert count.tolist() == [0, 0] and (cand == -1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hand_worked_lru(device):
    # Key 5, G = 2: a, b, c go in (a drops), b moves to the front, a invalid one is skipped.
    a, b, c = [1, 1], [2, 2], [3, 3]
    for _, pool in each_backend(device, 1, 8, 3, 2):
        pool.insert(ints([[5, 5, 5, 5, 5]], device), ints([[a, b, c, b, a]], device),
                    torch.tensor([[True, True, True, True, False]], device=device))
        cand, count = pool.lookup(ints([5], device))
        assert count.tolist() == [2] and cand.tolist() == [[b, c]]
        pool.insert(ints([[5, 8, 5]], device), ints([[a, a, [1, 8]]], device))  # 8 >= V: skipped
        cand, count = pool.lookup(ints([5], device))
        assert count.tolist() == [2] and cand.tolist() == [[a, b]]
        assert pool.count.sum().item() == 2


@pytest.mark.parametrize("device", DEVICES)
def test_hand_worked_harvest(device):
    # N = 4, W = 3: the columns of the window, each completed by the newest token.
    window = ints([[[5, 8, 11], [6, 9, 12], [5, 10, 13]]], device).transpose(1, 2)  # strided
    new = ints([[14, 15, 16]], device)
    assert window.tolist() == [[[5, 6, 5], [8, 9, 10], [11, 12, 13]]] and not window.is_contiguous()
    for _, pool in each_backend(device, 1, 20, 4, 3):
        pool.harvest(window, new)
        cand, count = pool.lookup(ints([5], device))
        assert count.tolist() == [2]
        assert cand.tolist() == [[[10, 13, 16], [8, 11, 14], [-1, -1, -1]]]
        cand, count = pool.lookup(ints([6], device))
        assert count.tolist() == [1] and cand[0, 0].tolist() == [9, 12, 15]


@pytest.mark.parametrize("device", DEVICES)
def test_bigrams_and_empty_pool(device):
    for _, pool in each_backend(device, 2, 4, 2, 1):  # N = 2: the window has one level
        pool.harvest(ints([[[0, 1, 0]], [[3, 3, 3]]], device), ints([[1, 2, 3], [0, 1, 2]], device))
        cand, count = pool.lookup(ints([0, 3], device))
        assert count.tolist() == [1, 1] and cand.tolist() == [[[3]], [[2]]]
    for _, pool in each_backend(device, 2, 4, 3, 0):  # G = 0 stores nothing
        pool.insert_sequence(ints([[0, 1, 2, 3], [1, 1, 1, 1]], device), ints([0, 0], device),
                             ints([4, 4], device))
        pool.harvest(ints([[[0], [1]], [[1], [1]]], device), ints([[2], [1]], device))
        cand, count = pool.lookup(ints([0, 1], device))
        assert cand.shape == (2, 0, 2) and count.tolist() == [0, 0]
        assert pool.nbytes == 2 * 4 * 4 and int(pool.count.abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_reset(device):
    for _, pool in each_backend(device, 1, 6, 3, 2):
        pool.insert_sequence(ints([[1, 2, 3, 4, 5]], device), ints([0], device), ints([5], device))
        pool.reset()
        assert pool.lookup(ints([1], device))[1].tolist() == [0]
        pool.insert(ints([[1]], device), ints([[[4, 4]]], device))
        assert pool.lookup(ints([1], device))[0].tolist() == [[[4, 4], [-1, -1]]]


# ---- bounded memory -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_memory_stays_bounded(device):
    """Far more n-grams than fit: the storage is the same tensors, every key holds <= G
    entries, and the content still matches the oracle."""
    B, V, N, G, L = 2, 8, 3, 2, 300
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (B, L), generator=gen).tolist()
    window = torch.randint(0, V, (B, N - 1, 16), generator=gen).tolist()
    new = torch.randint(0, V, (B, 16), generator=gen).tolist()
    ops = [("sequence", (seq, [0, 0], [L, L])), ("harvest", (window, new))]
    check_all(device, B, V, N, G, ops)
    for _, pool in each_backend(device, B, V, N, G):
        tokens, count = pool.tokens, pool.count
        for op in ops:
            apply_pool(pool, op, B, device)
        assert pool.tokens is tokens and pool.count is count
        assert tokens.shape == (B, V, G, N - 1) and count.shape == (B, V)
        assert pool.nbytes == B * V * (G * (N - 1) + 1) * 4 == 320
        assert int(count.max()) == G and int(count.min()) >= 0


# ---- torch.compile, fake tensors, CUDA graphs -----------------------------------------------


def jacobi_step(pool, window, new_tokens, last):
    pool.harvest(window, new_tokens)
    return pool.lookup(last)


def test_compile_full_graph_matches_eager():
    torch._dynamo.reset()
    window = ints([[[1, 2, 1], [3, 4, 5]], [[0, 0, 0], [1, 2, 1]]], "cpu")
    new = ints([[6, 7, 8], [2, 3, 2]], "cpu")
    last = ints([1, 0], "cpu")
    eager, compiled = NGramPool(2, 10, 3, 2, "cpu"), NGramPool(2, 10, 3, 2, "cpu")
    want = jacobi_step(eager, window, new, last)
    got = torch.compile(jacobi_step, fullgraph=True, backend="eager")(compiled, window, new, last)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(compiled.count, eager.count)


def test_fake_tensors_take_the_registered_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pool = NGramPool(3, 50, 4, 5, "cpu")
        keys = torch.empty(3, dtype=torch.int64)
        pool.insert(torch.empty(3, 2, dtype=torch.int64), torch.empty(3, 2, 3, dtype=torch.int64))
        pool.harvest(torch.empty(3, 3, 7, dtype=torch.int64), torch.empty(3, 7, dtype=torch.int64))
        pool.insert_sequence(torch.empty(3, 9, dtype=torch.int64), keys, keys)
        cand, count = pool.lookup(keys)
        assert cand.shape == (3, 5, 3) and count.shape == (3,) and cand.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_capture_and_replay():
    """A harvest and a lookup captured in a CUDA graph replay correctly on new inputs (no host
    sync in the step)."""
    dev = "cuda"
    window = ints([[[1, 2, 1], [3, 4, 5]]], dev)
    new = ints([[6, 7, 8]], dev)
    last = ints([1], dev)
    pool, twin = NGramPool(1, 10, 3, 2, dev), NGramPool(1, 10, 3, 2, dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on a throwaway pool
        jacobi_step(NGramPool(1, 10, 3, 2, dev), window, new, last)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = jacobi_step(pool, window, new, last)
    for trial in range(3):
        window.copy_(ints([[[1, 2, 1], [3 + trial, 4, 5]]], dev))
        new.copy_(ints([[6, 7, 8 + trial]], dev))
        graph.replay()
        want = jacobi_step(twin, window, new, last)
        torch.cuda.synchronize()
        for g, w in zip(out, want):
            assert torch.equal(g, w)
        assert torch.equal(pool.tokens, twin.tokens) and torch.equal(pool.count, twin.count)


# ---- bad inputs: clear errors, and the pool stays as it was ---------------------------------


def filled_pool():
    pool = NGramPool(2, 10, 3, 2, "cpu")  # B = 2, N-1 = 2
    pool.insert_sequence(ints([[1, 2, 3, 1, 2, 4], [5, 6, 7, 8, 9, 5]], "cpu"), ints([0, 0], "cpu"),
                         ints([6, 6], "cpu"))
    return pool


def rejects(call, match, exc=ValueError):
    pool = filled_pool()
    tokens, count = pool.tokens.clone(), pool.count.clone()
    with pytest.raises(exc, match=match):
        call(pool)
    assert torch.equal(pool.tokens, tokens) and torch.equal(pool.count, count)


K = ints([[1, 2, 3], [4, 5, 6]], "cpu")  # [B, M] keys
VAL = torch.ones(2, 3, 2, dtype=torch.int64)  # [B, M, N-1] values


def test_bad_insert():
    rejects(lambda p: p.insert(K.int(), VAL), "keys must have dtype torch.int64, found torch.int32",
            TypeError)
    rejects(lambda p: p.insert([[1, 2]], VAL), "keys must be a torch.Tensor, found list", TypeError)
    rejects(lambda p: p.insert(K[0], VAL), r"keys must have 2 dims \[B, M\], found shape \(3,\)")
    rejects(lambda p: p.insert(K[:1], VAL[:1]),
            r"keys must have shape \[B, M\] = \(2, 3\), found \(1, 3\)")
    rejects(lambda p: p.insert(K, torch.ones(2, 3, 3, dtype=torch.int64)),
            r"values must have shape \[B, M, N-1\] = \(2, 3, 2\), found \(2, 3, 3\)")
    rejects(lambda p: p.insert(K, VAL[:, :2]),
            r"values must have shape \[B, M, N-1\] = \(2, 3, 2\), found \(2, 2, 2\)")
    rejects(lambda p: p.insert(K, VAL.float()), "values must have dtype torch.int64", TypeError)
    rejects(lambda p: p.insert(K, VAL, torch.ones(2, 3, dtype=torch.int64)),
            "valid must have dtype torch.bool or torch.uint8, found torch.int64", TypeError)
    rejects(lambda p: p.insert(K, VAL, torch.ones(2, 2, dtype=torch.bool)),
            r"valid must have shape \[B, M\] = \(2, 3\), found \(2, 2\)")
    rejects(lambda p: p.insert(K.to("meta"), VAL),
            "keys is on meta but pool_tokens is on cpu; all tensors must be on one device")
    rejects(lambda p: p.insert(K, VAL, torch.ones(2, 3, dtype=torch.bool, device="meta")),
            "valid is on meta but pool_tokens is on cpu")


def test_bad_harvest_sequence_lookup():
    window, new = torch.zeros(2, 2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64)
    rejects(lambda p: p.harvest(window[:, :1], new),
            r"window must have shape \[B, N-1, W\] = \(2, 2, 4\), found \(2, 1, 4\)")
    rejects(lambda p: p.harvest(window, new[:, :3]),
            r"new_tokens must have shape \[B, W\] = \(2, 4\), found \(2, 3\)")
    rejects(lambda p: p.harvest(window[0], new), r"window must have 3 dims \[B, N-1, W\]")
    rejects(lambda p: p.harvest(window, new.to("meta")), "new_tokens is on meta")
    seq, se = torch.zeros(2, 5, dtype=torch.int64), ints([0, 5], "cpu")
    rejects(lambda p: p.insert_sequence(seq[:1], se, se),
            r"tokens must have shape \[B, L\] = \(2, 5\), found \(1, 5\)")
    rejects(lambda p: p.insert_sequence(seq, se.float(), se), "start must have dtype torch.int64",
            TypeError)
    rejects(lambda p: p.insert_sequence(seq, se, se[:1]),
            r"end must have shape \[B\] = \(2,\), found \(1,\)")
    rejects(lambda p: p.lookup(ints([[1], [2]], "cpu")), r"keys must have 1 dims \[B\]")
    rejects(lambda p: p.lookup(ints([1, 2, 3], "cpu")), r"keys must have shape \[B\] = \(2,\)")
    rejects(lambda p: p.lookup(ints([1, 2], "cpu").int()), "keys must have dtype torch.int64",
            TypeError)


def test_bad_construction():
    with pytest.raises(ValueError, match=r"n must be in \[2, inf\], found 1"):
        NGramPool(1, 10, 1, 2, "cpu")
    with pytest.raises(ValueError, match=r"g must be in \[0, inf\], found -1"):
        NGramPool(1, 10, 3, -1, "cpu")
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 2147483647\], found 0"):
        NGramPool(1, 0, 3, 2, "cpu")
    with pytest.raises(ValueError, match=r"batch must be in \[0, inf\], found -2"):
        NGramPool(-2, 10, 3, 2, "cpu")
    with pytest.raises(TypeError, match="n must be an int, found float"):
        NGramPool(1, 10, 3.0, 2, "cpu")


def test_native_checks_again():
    from fastdecode import _native

    pool = filled_pool()
    keys = ints([1, 2], "cpu")
    out, count = torch.empty(2, 2, 2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for V, G, W, match in ((0, 2, 2, "V must be in"), (10, 2, 0, "W = N - 1 must be >= 1"),
                           (10, -1, 2, "G must be >= 0")):
        with pytest.raises(ValueError, match=match):
            _native._C.ngram_lookup("cpu", 0, pool.tokens.data_ptr(), pool.count.data_ptr(), 2,
                                    V, G, W, keys.data_ptr(), out.data_ptr(), count.data_ptr())
    with pytest.raises(ValueError, match="keys is a null pointer"):
        _native._C.ngram_insert("cpu", 0, pool.tokens.data_ptr(), pool.count.data_ptr(), 2, 10,
                                2, 2, 0, VAL.data_ptr(), 0, 3)
