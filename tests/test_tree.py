"""verify_tree, tree_mask, tree_positions and pack_tree_mask: hand-worked examples, every backend
against a pure-Python oracle on random trees, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS_ON, DEVICES
from hypothesis import given
from hypothesis import strategies as st

import fastdecode
from fastdecode import _native
from fastdecode.ops import (
    MAX_TREE_NODES,
    pack_tree_mask,
    tree_mask,
    tree_positions,
    verify_tree,
)

# ---- a pure-Python oracle, written from the spec alone ---------------------------------------


def oracle_tree(parents: list[int], max_depth: int) -> tuple[list[int], list[bool]]:
    """Depth and realness of each node: a node is real when its parent is a real earlier node
    and it is at most max_depth deep."""
    T = len(parents)
    depth, real = [0] * T, [False] * T
    real[0] = True
    for j in range(1, T):
        p = parents[j]
        if 0 <= p < j and real[p] and depth[p] < max_depth:
            real[j], depth[j] = True, depth[p] + 1
    return depth, real


def oracle_verify(draft: list[int], parents: list[int], predicted: list[int], max_depth: int):
    depth, real = oracle_tree(parents, max_depth)
    accepted = [True] + [False] * (len(parents) - 1)
    for j in range(1, len(parents)):
        p = parents[j]
        accepted[j] = real[j] and accepted[p] and draft[j] == predicted[p]
    best = max((j for j in range(len(parents)) if accepted[j]), key=lambda j: (depth[j], -j))
    path, node = [], best
    while node != 0:
        path.append(node)
        node = parents[node]
    path = [0] + path[::-1]
    n = depth[best]
    tokens = [draft[j] for j in path[1:]] + [predicted[best]]
    pad = [-1] * (max_depth + 1 - len(path))
    return n, best, path + pad, tokens + pad


def oracle_mask(parents: list[int]) -> list[list[bool]]:
    T = len(parents)
    _, real = oracle_tree(parents, T)
    rows = []
    for i in range(T):
        row = [False] * T
        row[i] = True
        node = i
        while real[i] and node != 0:
            node = parents[node]
            row[node] = True
        rows.append(row)
    return rows


def oracle_positions(parents: list[int], prefix: int) -> list[int]:
    depth, real = oracle_tree(parents, len(parents))
    return [prefix + (d if r else 0) for d, r in zip(depth, real)]


# ---- random trees ---------------------------------------------------------------------------

KINDS = ("chain", "bushy", "star", "trie", "padded")


def random_tree(rng: np.random.Generator, T: int, kind: str, vocab: int = 4):
    """parents, draft tokens and predictions of one row. Predictions copy a child's token often
    enough that long paths get accepted."""
    parents = [-1]
    real = T if kind != "padded" else int(rng.integers(1, T + 1))
    for j in range(1, real):
        if kind == "chain":
            parents.append(j - 1)
        elif kind == "star":
            parents.append(0)
        elif kind == "trie":  # few children per node, deep branches
            parents.append(int(max(0, j - 1 - rng.integers(0, 3))))
        else:
            parents.append(int(rng.integers(0, j)))
    parents += [-2] * (T - real)
    draft = rng.integers(0, vocab, T).tolist()
    predicted = rng.integers(0, vocab, T).tolist()
    for j in range(1, real):
        if rng.random() < 0.6:
            predicted[parents[j]] = draft[j]
    return parents, draft, predicted


def random_batch(seed: int, B: int, T: int, kind: str):
    rng = np.random.default_rng(seed)
    rows = [random_tree(rng, T, kind) for _ in range(B)]
    parents, draft, predicted = ([r[k] for r in rows] for k in range(3))
    return parents, draft, predicted


def as_tensor(rows, device: str) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), -1)


def check_all(parents, draft, predicted, device: str, max_depth: int | None = None,
              validate: bool = True, prefix: list[int] | None = None) -> None:
    """Every backend on `device` equals the oracle on all four ops."""
    B, T = len(parents), len(parents[0]) if parents else 1
    P, Dr, Pr = (as_tensor(x, device) if B else torch.empty(0, T, dtype=torch.int64, device=device)
                 for x in (parents, draft, predicted))
    prefix = prefix if prefix is not None else list(range(3, 3 + B))
    if max_depth is None:
        max_depth = max((max(oracle_tree(p, T)[0]) for p in parents), default=0)
    want = [oracle_verify(Dr_, P_, Pr_, max_depth) for P_, Dr_, Pr_ in zip(parents, draft, predicted)]
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            res = verify_tree(Dr, P, Pr, max_depth=max_depth, validate=validate)
            mask = tree_mask(P, validate=validate)
            pos = tree_positions(P, torch.tensor(prefix, dtype=torch.int64, device=device),
                                 validate=validate)
            packed = pack_tree_mask(mask)
        got = list(zip(res.accept_len.tolist(), res.best_node.tolist(), res.path.tolist(),
                       res.tokens.tolist()))
        assert got == [tuple(w) for w in want], backend
        assert mask.tolist() == [oracle_mask(p) for p in parents], backend
        assert pos.tolist() == [oracle_positions(p, n) for p, n in zip(parents, prefix)], backend
        words = [[sum(1 << k for k in range(32) if 32 * w + k < T and row[32 * w + k])
                  for w in range((T + 31) // 32)] for rows in mask.tolist() for row in rows]
        signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in r] for r in words]
        assert packed.reshape(B * T, -1).tolist() == signed, backend
        assert {res.path.dtype, res.tokens.dtype, pos.dtype} == {torch.int64}
        assert packed.dtype == torch.int32 and mask.dtype == torch.bool


# ---- hand-worked examples -------------------------------------------------------------------

# root 5 -> 7 (node 1) -> 9 (node 3);  root 5 -> 8 (node 2) -> 10 (node 4);  node 5 padding.
# The model predicts 7 after the root and 9 after node 1: nodes 1 and 3 are accepted, node 2 is
# not (8 != 7), so node 4 is not either. The bonus token is the prediction after node 3: 3.
HAND_PARENTS = [[-1, 0, 0, 1, 2, -2]]
HAND_DRAFT = [[5, 7, 8, 9, 10, 0]]
HAND_PRED = [[7, 9, 0, 3, 3, 3]]


@pytest.mark.parametrize("device", DEVICES)
def test_verify_hand_worked(device):
    P, D, Q = (as_tensor(x, device) for x in (HAND_PARENTS, HAND_DRAFT, HAND_PRED))
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            res = verify_tree(D, P, Q)
        assert res.accept_len.tolist() == [2]
        assert res.best_node.tolist() == [3]
        assert res.path.tolist() == [[0, 1, 3]]  # D = 2: the tree is two deep
        assert res.tokens.tolist() == [[7, 9, 3]]


@pytest.mark.parametrize("device", DEVICES)
def test_verify_ties_go_to_lowest_index_and_padding_width(device):
    # Two accepted depth-1 nodes (1 and 2) after a root predicting 4 (duplicate siblings).
    P, D, Q = (as_tensor(x, device) for x in ([[-1, 0, 0]], [[1, 4, 4]], [[4, 6, 8]]))
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            res = verify_tree(D, P, Q, max_depth=2)
        assert res.best_node.tolist() == [1]
        assert res.path.tolist() == [[0, 1, -1]]
        assert res.tokens.tolist() == [[4, 6, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_mask_positions_pack_hand_worked(device):
    P = as_tensor(HAND_PARENTS, device)
    want_mask = [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 0, 1, 0, 0, 0],
                 [1, 1, 0, 1, 0, 0],
                 [1, 0, 1, 0, 1, 0],
                 [0, 0, 0, 0, 0, 1]]  # the padding node sees only itself
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            mask = tree_mask(P)
            assert mask.int().tolist() == [want_mask]
            assert tree_positions(P, 10).tolist() == [[10, 11, 11, 12, 12, 10]]
            # LSB first: row 3 attends to columns 0, 1, 3 -> 0b1011 = 11.
            assert pack_tree_mask(mask).tolist() == [[[1], [3], [5], [11], [21], [32]]]


@pytest.mark.parametrize("device", DEVICES)
def test_pack_sets_bit_31_as_negative_and_spans_words(device):
    mask = torch.zeros(1, 33, 33, dtype=torch.bool, device=device)
    mask[0, 0, 31] = True
    mask[0, 0, 32] = True
    mask[0, 1, 0] = True
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            packed = pack_tree_mask(mask)
        assert packed.shape == (1, 33, 2)
        assert packed[0, 0].tolist() == [-(2**31), 1]
        assert packed[0, 1].tolist() == [1, 0]


# ---- every backend against the oracle -------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (1, 7), (5, 33), (1, 257), (5, 257)])
def test_shapes_and_tree_kinds(device, kind, B, T):
    check_all(*random_batch(B * 1000 + T, B, T, kind), device)


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 6), T=st.integers(1, 70),
       kind=st.sampled_from(KINDS), extra_depth=st.integers(0, 3))
def test_random_trees(device, seed, B, T, kind, extra_depth):
    parents, draft, predicted = random_batch(seed, B, T, kind)
    deepest = max(max(oracle_tree(p, T)[0]) for p in parents)
    check_all(parents, draft, predicted, device, max_depth=min(deepest + extra_depth, T - 1))


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), T=st.integers(2, 40),
       max_depth=st.integers(0, 5))
def test_unvalidated_malformed_trees_agree_and_stay_in_bounds(device, seed, B, T, max_depth):
    """validate=False: rule-breaking parents and over-deep nodes count as padding, alike on
    every backend."""
    rng = np.random.default_rng(seed)
    parents = rng.integers(-4, T + 3, (B, T)).tolist()
    draft = rng.integers(0, 3, (B, T)).tolist()
    predicted = rng.integers(0, 3, (B, T)).tolist()
    check_all(parents, draft, predicted, device, max_depth=min(max_depth, T - 1), validate=False)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    empty = torch.empty(0, 4, dtype=torch.int64, device=device)
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            res = verify_tree(empty, empty, empty, max_depth=3)
            assert res.path.shape == (0, 4) and res.accept_len.shape == (0,)
            assert tree_mask(empty).shape == (0, 4, 4)
            assert tree_positions(empty, 0).shape == (0, 4)
            assert pack_tree_mask(torch.zeros(0, 4, 4, dtype=torch.bool, device=device)).shape == (0, 4, 1)


def test_max_tree_nodes_matches_native():
    assert _native._C.max_tree_nodes == MAX_TREE_NODES


# ---- bad inputs -----------------------------------------------------------------------------

GOOD = [[-1, 0, 1]]


def call_verify(parents=GOOD, draft=None, predicted=None, **kw):
    P = parents if isinstance(parents, torch.Tensor) else torch.tensor(parents)
    D = draft if draft is not None else torch.zeros_like(P)
    Q = predicted if predicted is not None else torch.zeros_like(P)
    return verify_tree(D, P, Q, **kw)


@pytest.mark.parametrize("parents,match", [
    ([[-1, 0, 2]], r"parents\[0, 2\] = 2 must be -2 \(padding\) or in \[0, j\)"),
    ([[-1, 0, 5]], r"parents\[0, 2\] = 5"),
    ([[-1, -1, 0]], r"parents\[0, 1\] = -1"),
    ([[-1, 0, -3]], r"parents\[0, 2\] = -3"),
    ([[0, 0, 1]], r"parents\[0, 0\] must be -1"),
    ([[-1, -2, 1]], r"parents\[0, 2\] = 1 is a padding node"),
    ([[-1, 0, 1], [-1, 0, 2]], r"parents\[1, 2\] = 2"),
])
def test_bad_parent_values(parents, match):
    with pytest.raises(ValueError, match=match):
        call_verify(parents)
    with pytest.raises(ValueError, match=match):
        tree_mask(torch.tensor(parents))
    with pytest.raises(ValueError, match=match):
        tree_positions(torch.tensor(parents), 0)


def test_bad_dtypes_and_types():
    with pytest.raises(TypeError, match="parents must have dtype torch.int64, found torch.int32"):
        call_verify(torch.tensor(GOOD, dtype=torch.int32))
    with pytest.raises(TypeError, match="draft_tokens must have dtype torch.int64"):
        call_verify(draft=torch.zeros(1, 3))
    with pytest.raises(TypeError, match="parents must be a torch.Tensor, found list"):
        tree_mask(GOOD)
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        pack_tree_mask(torch.zeros(1, 3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="prefix_len must be an int"):
        tree_positions(torch.tensor(GOOD), 1.5)
    with pytest.raises(TypeError, match="prefix_len must have dtype torch.int64"):
        tree_positions(torch.tensor(GOOD), torch.tensor([1], dtype=torch.int32))


def test_bad_ranks_and_shapes():
    with pytest.raises(ValueError, match=r"parents must have 2 dims \[B, T\], found shape \(3,\)"):
        tree_mask(torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match=r"predicted must have shape \[B, T\] = \(1, 3\), found \(1, 4\)"):
        call_verify(predicted=torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask must have 3 dims"):
        pack_tree_mask(torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T, T\]"):
        pack_tree_mask(torch.zeros(1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"T in \[1, 2048\]"):
        tree_mask(torch.empty(1, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"T in \[1, 2048\]"):
        tree_mask(torch.full((1, MAX_TREE_NODES + 1), 0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"prefix_len must have shape \[B\] = \(1,\), found \(2,\)"):
        tree_positions(torch.tensor(GOOD), torch.tensor([1, 2]))


def test_bad_max_depth_and_prefix():
    with pytest.raises(ValueError, match="max_depth must be >= the tree's depth 2, found 1"):
        call_verify(max_depth=1)
    with pytest.raises(ValueError, match=r"max_depth must be in \[0, 2\], found 3"):
        call_verify(max_depth=3)
    with pytest.raises(ValueError, match="max_depth is required when validate=False"):
        call_verify(validate=False)
    with pytest.raises(ValueError, match=r"prefix_len must be in \[0, inf\], found -1"):
        tree_positions(torch.tensor(GOOD), -1)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        tree_positions(torch.tensor(GOOD), torch.tensor([-4]))


def test_device_mismatch():
    P = torch.tensor(GOOD)
    with pytest.raises(ValueError, match="draft_tokens is on meta but parents is on cpu"):
        verify_tree(torch.zeros(1, 3, dtype=torch.int64, device="meta"), P, torch.zeros_like(P))
    with pytest.raises(ValueError, match="prefix_len is on meta but parents is on cpu"):
        tree_positions(P, torch.zeros(1, dtype=torch.int64, device="meta"))


def test_native_checks_again():
    """The C++ entry points reject bad sizes themselves, before touching memory."""
    C = _native._C
    with pytest.raises(ValueError, match="T must be in"):
        C.tree_mask("cpu", 0, 1, 1, 0, 1)
    with pytest.raises(ValueError, match="max_depth must be in"):
        C.verify_tree("cpu", 0, 1, 1, 1, 1, 3, 3, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="parents is a null pointer"):
        C.tree_positions("cpu", 0, 0, 1, 1, 3, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ("chain", "trie", "padded"))
@pytest.mark.parametrize("B,T", [(3, 16), (2, 48), (2, 128), (1, 512)])
def test_sizes_with_16_byte_mask_stores_and_many_jump_rounds(device, kind, B, T):
    """T % 16 == 0 takes the 16-byte mask stores; deep chains need every pointer-jumping round."""
    check_all(*random_batch(B * 7000 + T, B, T, kind), device)


def test_native_mask_at_an_unaligned_address_matches():
    """The C++ mask falls back to byte stores where the output is not 16-byte aligned."""
    parents = as_tensor(random_batch(5, 2, 32, "trie")[0], "cpu")
    buffer = torch.zeros(2 * 32 * 32 + 1, dtype=torch.uint8)
    _native._C.tree_mask("cpu", 0, parents.data_ptr(), 2, 32, buffer.data_ptr() + 1)
    assert buffer[1:].view(2, 32, 32).bool().tolist() == tree_mask(parents).tolist()
    assert buffer[0] == 0
