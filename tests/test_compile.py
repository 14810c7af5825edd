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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_capture_and_replay():
    """One tree step captured in a CUDA graph replays correctly on new inputs (no host sync,
    no allocation outside the graph's pool)."""
    dev = "cuda"
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, -2]], device=dev)
    draft = torch.tensor([[1, 2, 3, 4], [1, 5, 6, 0]], device=dev)
    predicted = torch.tensor([[2, 4, 0, 9], [5, 6, 7, 0]], device=dev)
    prefix = torch.tensor([3, 5], device=dev)
    k, v = torch.randn(2, 2, 9, 4, device=dev), torch.randn(2, 2, 9, 4, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on copies
        step(draft, parents, predicted, prefix, k.clone(), v.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    k0, v0 = k.clone(), v.clone()
    with torch.cuda.graph(graph):
        out = step(draft, parents, predicted, prefix, k, v)
    for trial in range(2):
        predicted.copy_(torch.tensor([[2, 4, 0, 9], [7, 6, 7, 0]], device=dev) if trial else
                        torch.tensor([[2, 4, 0, 9], [5, 6, 7, 0]], device=dev))
        k.copy_(k0)
        v.copy_(v0)
        graph.replay()
        k2, v2 = k0.clone(), v0.clone()
        want = step(draft, parents, predicted, prefix, k2, v2)
        torch.cuda.synchronize()
        for g, w in zip(out, want):
            assert torch.equal(g, w)
        assert torch.equal(k, k2) and torch.equal(v, v2)
