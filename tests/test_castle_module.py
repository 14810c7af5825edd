"""fastdecode.nn.CastleAttention: the training path against the cached path (token by token and
in chunks, with rotary embeddings, full and sliding-window), speculative rollback through the
module, torch.compile, parameter counts and bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import fastdecode
from fastdecode import _backend
from fastdecode.nn.castle import CastleAttention
from fastdecode.ops import CastleCache


def backends_on(device: str) -> list[str]:
    return [b for b in ("torch", "triton") if _backend._why_not(b, device) is None]


def layer(window=None, rope=True, seed=0, device="cpu", dtype=torch.float64) -> CastleAttention:
    torch.manual_seed(seed)
    return CastleAttention(48, 3, 16, window=window, rope=rope).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("rope", [True, False])
def test_cached_path_matches_training_path(device, window, rope):
    m = layer(window, rope, device=device)
    x = torch.randn(2, 19, 48, dtype=torch.float64, device=device)
    for backend in backends_on(device):
        with fastdecode.use_backend(backend):
            want = m(x)
            for sizes in ([1] * 19, [7, 1, 4, 1, 6]):
                cache = CastleCache(window=window)
                outs, pos = [], 0
                for n in sizes:
                    outs.append(m(x[:, pos:pos + n], cache=cache))
                    pos += n
                torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-12, rtol=1e-12)


def test_rollback_through_the_module():
    m = layer()
    x = torch.randn(1, 14, 48, dtype=torch.float64)
    want = m(x)
    cache = CastleCache()
    m(x[:, :8], cache=cache)
    cache.checkpoint()
    m(torch.cat([x[:, 8:10], torch.randn(1, 3, 48, dtype=torch.float64)], 1), cache=cache)
    cache.crop(10)
    got = m(x[:, 10:], cache=cache)
    torch.testing.assert_close(got, want[:, 10:], atol=1e-12, rtol=1e-12)


def test_layers_share_one_cache():
    torch.manual_seed(1)
    layers = [CastleAttention(32, 2, 16, layer_idx=i).double() for i in range(2)]
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    want = layers[1](layers[0](x))
    cache = CastleCache(num_layers=2)
    outs = [layers[1](layers[0](x[:, t:t + 1], cache=cache), cache=cache) for t in range(9)]
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-12, rtol=1e-12)
    assert cache.length(0) == cache.length(1) == 9


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_matches_eager(backend):
    """The training path compiled in one graph (the ops are torch.library custom ops with fake
    kernels and registered autograd), forward and backward, against eager."""
    if _backend._why_not(backend, "cpu") is not None:
        pytest.skip(_backend._why_not(backend, "cpu"))
    m = layer(window=4, dtype=torch.float32)
    x = torch.randn(2, 21, 48, requires_grad=True)
    with fastdecode.use_backend(backend):
        want = m(x)
        (gx_want,) = torch.autograd.grad(want.square().sum(), x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        (gx,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_want, atol=1e-4, rtol=1e-4)


def test_torch_compile_cached_path():
    """The cached path compiled (graph breaks at the cache's Python bookkeeping; the decode op
    is a custom op that mutates U) equals the training path."""
    m = layer(window=4, dtype=torch.float32)
    x = torch.randn(2, 12, 48)
    with torch.no_grad():
        want = m(x)
        compiled = torch.compile(m, backend="aot_eager")
        cache = CastleCache(window=4)
        outs = [compiled(x[:, :5], cache=cache)]
        outs += [compiled(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-5, rtol=1e-5)


def test_parameter_count_and_repr():
    m = CastleAttention(128, 4, 32, window=8)
    assert sum(p.numel() for p in m.parameters()) == 7 * 4 * 32 * 128
    assert "window=8" in repr(m)


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_dim must be a multiple of 16"):
        CastleAttention(64, 2, 24)
    with pytest.raises(ValueError, match="window must be in"):
        CastleAttention(64, 2, 16, window=-1)
    m = layer()
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(1, 3, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have 3 dims"):
        m(torch.randn(3, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match="window"):
        m(torch.randn(1, 3, 48, dtype=torch.float64), cache=CastleCache(window=2))
    with pytest.raises(TypeError, match="CastleCache"):
        m(torch.randn(1, 3, 48, dtype=torch.float64), cache={})
