"""compact_kv: a hand-worked example, overlapping moves, every backend against an oracle over
dtypes, layouts and batch shapes, DynamicCache, and bad inputs (which change nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS_ON, DEVICES
from hypothesis import given
from hypothesis import strategies as st

import fastdecode
from fastdecode.ops import compact_kv


def oracle(caches, start, src, count):
    """Copies, then moves one row at a time from the untouched copy."""
    out = [t.clone() for t in caches]
    for t, o in zip(caches, out):
        for b in range(len(start)):
            for i in range(count[b]):
                o[b, :, start[b] + i] = t[b, :, start[b] + src[b][i]]
    return out


def ints(rows, device):
    return torch.tensor(rows, dtype=torch.int64, device=device)


def run_all(caches, start, src, count, device):
    """Each backend on fresh copies equals the oracle."""
    want = oracle(caches, start, src, count)
    for backend in BACKENDS_ON[device]:
        got = [t.clone() for t in caches]
        with fastdecode.use_backend(backend):
            compact_kv(got, ints(start, device), ints(src, device), ints(count, device))
        for g, w in zip(got, want):
            assert torch.equal(g, w), backend


@pytest.mark.parametrize("device", DEVICES)
def test_hand_worked(device):
    # One row, prefix 2, a tree of 5 nodes at rows 2..6; the accepted path is nodes 0, 2, 4.
    k = torch.arange(8, dtype=torch.float32, device=device).view(1, 1, 8, 1)
    v = 10 * k
    for backend in BACKENDS_ON[device]:
        kk, vv = k.clone(), v.clone()
        with fastdecode.use_backend(backend):
            compact_kv([kk, vv], ints([2], device), ints([[0, 2, 4]], device), ints([3], device))
        assert kk.flatten().tolist() == [0, 1, 2, 4, 6, 5, 6, 7]  # rows 3, 4 <- 4, 6
        assert vv.flatten().tolist() == [0, 10, 20, 40, 60, 50, 60, 70]


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_shift_by_one(device):
    """Every destination is the source of the next move: a parallel copy would race."""
    S, n = 40, 30
    k = torch.arange(S, dtype=torch.float32, device=device).view(1, 1, S, 1).repeat(2, 3, 1, 4)
    src = [list(range(1, n + 1)), list(range(1, n + 1))]
    run_all([k], [3, 0], src, [n, n - 7], device)
    for backend in BACKENDS_ON[device]:
        kk = k.clone()
        with fastdecode.use_backend(backend):
            compact_kv([kk], ints([3, 0], device), ints(src, device), ints([n, n - 7], device))
        assert kk[0, 0, :, 0].tolist() == [0, 1, 2] + list(range(4, 4 + n)) + list(range(3 + n, S))
        assert kk[0, 2, 3:3 + n, 1].tolist() == list(range(4, 4 + n))
        assert kk[1, 1, :n - 7, 3].tolist() == list(range(1, n - 6))
        assert kk[1, 1, n - 7:, 3].tolist() == list(range(n - 7, S))  # untouched


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32]


def random_case(seed, B, n_tensors, H, S, D, dtype, device, layout):
    rng = np.random.default_rng(seed)
    caches = []
    for _ in range(n_tensors):
        if layout == "contiguous":
            t = torch.randn(B, H, S, D, device=device)
        elif layout == "bshd":  # a [B, S, H, D] buffer seen as [B, H, S, D]
            t = torch.randn(B, S, H, D, device=device).transpose(1, 2)
        else:  # "strided_d": every other element of a wider buffer
            t = torch.randn(B, H, S, 2 * D, device=device)[..., ::2]
        caches.append((t * 50).to(dtype))
    start, src, count = [], [], []
    N = int(rng.integers(0, S + 1))
    for _ in range(B):
        st_ = int(rng.integers(0, S))
        room = S - st_
        c = int(rng.integers(0, min(N, room) + 1))
        rows = sorted(rng.choice(room, size=c, replace=False).tolist())
        start.append(st_)
        count.append(c)
        src.append(rows + [int(rng.integers(-5, 10**6))] * (N - c))  # junk past count is ignored
    return caches, start, src, count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "bshd", "strided_d"])
def test_dtypes_and_layouts(device, dtype, layout):
    run_all(*random_case(7, 3, 4, 2, 23, 9, dtype, device, layout), device)


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), n=st.integers(1, 5), H=st.integers(1, 3),
       S=st.integers(1, 40), D=st.sampled_from([1, 3, 8, 64, 80]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "bshd", "strided_d"]))
def test_random(device, seed, B, n, H, S, D, dtype, layout):
    run_all(*random_case(seed, B, n, H, S, D, dtype, device, layout), device)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_beyond_one_launch(device):
    """More tensors than one CUDA launch carries (256) still all move."""
    caches, start, src, count = random_case(3, 2, 300, 1, 12, 8, torch.float16, device, "contiguous")
    run_all(caches, start, src, count, device)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    k = torch.randn(2, 2, 5, 4, device=device)
    for backend in BACKENDS_ON[device]:
        with fastdecode.use_backend(backend):
            compact_kv([], ints([0, 0], device), ints([[0], [0]], device), ints([0, 0], device))
            kk = k.clone()
            compact_kv([kk], ints([1, 2], device), ints([[], []], device).view(2, 0), ints([0, 0], device))
            assert torch.equal(kk, k)
            e = torch.empty(0, 2, 5, 4, device=device)
            compact_kv([e], ints([], device), ints([], device).view(0, 3), ints([], device))


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_cache(device):
    transformers = pytest.importorskip("transformers")
    cache = transformers.DynamicCache()
    keys = [torch.randn(2, 3, 10, 8, device=device) for _ in range(3)]
    values = [torch.randn(2, 3, 10, 8, device=device) for _ in range(3)]
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.clone(), v.clone(), i)
    start, src, count = [4, 6], [[0, 2, 5], [0, 3, 0]], [3, 2]
    want = oracle(keys + values, start, src, count)
    compact_kv(cache, ints(start, device), ints(src, device), ints(count, device))
    got = [layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    cache.crop(-3)
    assert cache.get_seq_length() == 7


# ---- bad inputs: clear errors, and the caches stay as they were -----------------------------


def bad_call(match, exc=ValueError, caches=None, start=(2,), src=((0, 1),), count=(2,), **kw):
    k = torch.arange(10.0).view(1, 1, 10, 1)
    caches = [k.clone()] if caches is None else caches
    real = [caches] if isinstance(caches, torch.Tensor) else [t for t in caches if t.device.type != "meta"]
    before = [t.clone() for t in real]
    args = [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64)
            for x in (start, src, count)]
    with pytest.raises(exc, match=match):
        compact_kv(caches, *args, **kw)
    for t, b in zip(real, before):
        assert torch.equal(t, b)


def test_bad_index_values():
    bad_call(r"index past the cache's end", src=((0, 8),))
    bad_call(r"count must be in \[0, N=2\]", count=(3,))
    bad_call(r"count must be in \[0, N=2\]", count=(-1,))
    bad_call(r"start must be >= 0", start=(-1,))
    bad_call(r"strictly increasing", src=((1, 1),))
    bad_call(r"strictly increasing", src=((3, 0),))
    bad_call(r"must be >= 0", src=((-1, 2),))


def test_bad_types_shapes_devices():
    bad_call("start must have dtype torch.int64, found torch.int32",
             exc=TypeError, start=torch.tensor([2], dtype=torch.int32))
    bad_call(r"src must have 2 dims \[B, N\], found shape \(2,\)", src=(0, 1))
    bad_call(r"count must have shape \[B\] = \(1,\), found \(2,\)", count=(1, 1))
    bad_call(r"caches\[1\] must have dtype torch.float32, found torch.float16", exc=TypeError,
             caches=[torch.zeros(1, 1, 10, 1), torch.zeros(1, 1, 10, 1, dtype=torch.float16)])
    bad_call(r"caches\[0\] must have 4 dims \[B, H, S, D\]", caches=[torch.zeros(1, 10, 1)])
    bad_call(r"caches\[0\] must have batch size B = 1", caches=[torch.zeros(2, 1, 10, 1)])
    bad_call("compact_kv moves 1, 2, 4 or 8-byte elements", exc=TypeError,
             caches=[torch.zeros(1, 1, 10, 1, dtype=torch.complex128)])
    bad_call("caches must be a sequence", exc=TypeError, caches=torch.zeros(1, 1, 10, 1))
    bad_call(r"caches\[0\] is on meta but start is on cpu",
             caches=[torch.zeros(1, 1, 10, 1, device="meta")])


def test_aliased_caches_are_rejected():
    k = torch.zeros(1, 1, 10, 4)
    bad_call(r"caches\[0\] and caches\[1\] share memory", caches=[k, k])
    buf = torch.zeros(2, 1, 10, 4)
    bad_call(r"caches\[0\] and caches\[1\] share memory", caches=[buf[:1], buf[:2, :, :, :2][:1]])
    bad_call("overlaps itself", caches=[torch.zeros(1, 1, 1, 4).expand(1, 1, 10, 4)])
    compact_kv([buf[:1], buf[1:]], torch.tensor([2]), torch.tensor([[0, 1]]), torch.tensor([2]))


@pytest.mark.parametrize("device", DEVICES)
def test_unvalidated_bad_indices_stay_in_bounds(device):
    """validate=False: source or destination rows outside the cache are skipped and count is
    clamped to src's width, on every backend (here checked to leave guard rows untouched)."""
    for backend in BACKENDS_ON[device]:
        if backend == "cpu":
            continue  # the C++ entry point always re-checks CPU values (test_native_checks_again)
        buf = torch.arange(3 * 12, dtype=torch.float32, device=device).view(3, 1, 12, 1)
        inner = buf[1:2]
        with fastdecode.use_backend(backend):
            compact_kv([inner], ints([10], device), ints([[0, 0, 5, 1]], device),
                       ints([99], device), validate=False)
        assert torch.equal(buf[0], torch.arange(12.0, device=device).view(1, 12, 1))
        assert torch.equal(buf[2], torch.arange(24.0, 36.0, device=device).view(1, 12, 1))


def test_native_checks_again():
    from fastdecode import _native

    k = torch.arange(10.0).view(1, 1, 10, 1)
    start, src, count = torch.tensor([2]), torch.tensor([[0, 9]]), torch.tensor([2])
    with pytest.raises(ValueError, match="past the cache's end"):
        _native._C.compact_kv("cpu", 0, [k.data_ptr()], [1, 10, 1], list(k.stride()), 4, 1,
                              start.data_ptr(), src.data_ptr(), 2, count.data_ptr())
    assert torch.equal(k, torch.arange(10.0).view(1, 1, 10, 1))
