"""The ops are torch.library custom ops with fake implementations: torch.compile traces them
into one graph (no graph break) and gets the eager results, on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from fastdecode.ops import compact_kv, pack_tree_mask, tree_mask, tree_positions, verify_tree


def step(draft, parents, predicted, prefix, k, v):
    res = verify_tree(draft, parents, predicted, max_depth=2, validate=False)
    mask = tree_mask(parents, validate=False)
    packed = pack_tree_mask(mask)
    pos = tree_positions(parents, prefix, validate=False)
    compact_kv([k, v], prefix, res.path, res.accept_len + 1, validate=False)
    return res.tokens, packed, pos


@pytest.mark.parametrize("device", DEVICES)
def test_full_graph_compile_matches_eager(device):
    torch._dynamo.reset()
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, -2]], device=device)
    draft = torch.tensor([[1, 2, 3, 4], [1, 5, 6, 0]], device=device)
    predicted = torch.tensor([[2, 4, 0, 9], [5, 6, 7, 0]], device=device)
    prefix = torch.tensor([3, 5], device=device)
    k = torch.randn(2, 2, 9, 4, device=device)
    v = torch.randn(2, 2, 9, 4, device=device)
    k2, v2 = k.clone(), v.clone()
    want = step(draft, parents, predicted, prefix, k, v)
    got = torch.compile(step, fullgraph=True)(draft, parents, predicted, prefix, k2, v2)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_fake_tensors_take_the_registered_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        parents = torch.empty(3, 7, dtype=torch.int64)
        res = verify_tree(parents, parents, parents, max_depth=4, validate=False)
        assert [tuple(t.shape) for t in res] == [(3,), (3,), (3, 5), (3, 5)]
        mask = tree_mask(parents, validate=False)
        assert mask.shape == (3, 7, 7) and mask.dtype == torch.bool
        assert pack_tree_mask(mask).shape == (3, 7, 1)
        prefix = torch.empty(3, dtype=torch.int64)
        assert tree_positions(parents, prefix, validate=False).shape == (3, 7)
        compact_kv([torch.empty(3, 2, 9, 4)], prefix, parents, prefix, validate=False)
