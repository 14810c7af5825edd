"""CASTLE attention: the dense torch reference and the torch backend (blocked) against the naive
per-step oracle, every backend (parallel form, its gradients and decode) against this file's own
step-by-step reading of the definition, the blocked implementation against the dense reference
at several block sizes, every backend against the dense reference (forward and gradients, fp32/bf16/fp16, full and sliding-window lookahead,
B > 1, odd L, L = 1), fp64 gradcheck per backend, token-by-token decode and chunked prefill
at random splits against the parallel form, checkpoint/crop rollback, causality, the reduction to
causal SDPA, and bad arguments.

Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors with small shapes; D = 64/128 and
long sequences run only on a GPU (mark ``gpu``).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_CUDA

import fastdecode
from fastdecode import _backend
from fastdecode.ops import CastleCache, castle_attention, castle_decode, castle_prefill
from fastdecode.ops.castle import blocked, reference
from fastdecode.ops.castle.reference import (
    castle_attention_backward_reference,
    castle_attention_naive,
    castle_attention_reference,
)

GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backends_on(device: str) -> list[str]:
    """The backends of the CASTLE ops that run on ``device`` here."""
    return [b for b in ("torch", "triton", "cuda") if b in _backend._REGISTRY["castle_attention"]
            and _backend._why_not(b, device) is None]


def need(backend: str, device: str) -> None:
    reason = _backend._why_not(backend, device)
    if reason is not None:
        pytest.skip(f"{backend} backend: {reason}")


def inputs(B: int, H: int, L: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0,
           grad: bool = False) -> list[torch.Tensor]:
    """qc, kc, vc, qu, ku, vu ``[B, H, L, D]``, standard normal."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
            .requires_grad_(grad) for _ in range(6)]


def on(backend: str, fn, *args, **kwargs):
    with fastdecode.use_backend(backend):
        return fn(*args, **kwargs)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Max error relative to the largest entry of ``want`` (gradients vary in scale)."""
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    assert err <= TOL[dtype] * scale, f"max |error| {err:.3g} (scale {scale:.3g})"


# ---- references -------------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """The torch backend's blocked implementation with blocks of 8 rows (64 by default)."""
    monkeypatch.setattr(blocked, "BLOCK", 8)


@pytest.mark.parametrize("window", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("L", [1, 2, 17, 37])
def test_reference_matches_naive_recurrence(L, window, small_blocks):
    """The dense reference and the torch backend (blocked) against the naive oracle."""
    x = inputs(2, 3, L, 16, torch.float64, seed=L)
    want = castle_attention_naive(*x, window=window)
    dense = castle_attention_reference(*x, -1 if window is None else window, 0.25)[0]
    torch.testing.assert_close(dense, castle_attention_naive(*x, window=window, scale=0.25),
                               atol=1e-12, rtol=1e-12)
    got = on("torch", castle_attention, *x, window=window)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def dense_reference(x: list[torch.Tensor], dout: torch.Tensor, window: int | None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The output and the six gradients by the dense reference (the test oracle)."""
    w, c = -1 if window is None else window, 1 / math.sqrt(x[0].shape[3])
    out, lse, ul = castle_attention_reference(*x, w, c)
    return out, castle_attention_backward_reference(dout, *x, out, lse, ul, w, c)


BLOCKED = {"L1": (1, 64), "L37-b16": (37, 16), "L64-b16": (64, 16), "L70-b64": (70, 64),
           "L23-b1": (23, 1)}


@pytest.mark.parametrize("window", [None, 0, 5, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(BLOCKED))
def test_blocked_matches_dense_reference(case, dtype, window):
    """The blocked torch implementation (forward: out, lse, U^L; backward: six gradients)
    against the dense reference on the same inputs, B = 2, L around and below the block."""
    L, block = BLOCKED[case]
    x = inputs(2, 2, L, 16, dtype, seed=L)
    dout = torch.randn(2, 2, L, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    w, c = -1 if window is None else window, 0.25
    want = castle_attention_reference(*x, w, c)
    got = blocked.castle_attention_blocked(*x, w, c, block=block)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.is_contiguous()
        assert_close(g, r, dtype)
    grads = blocked.castle_attention_backward_blocked(dout, *x, *got, w, c, block=block)
    want_grads = castle_attention_backward_reference(dout, *x, *want, w, c)
    for g, r in zip(grads, want_grads):
        assert g.dtype == dtype and g.is_contiguous()
        assert_close(g, r, dtype)


@pytest.mark.parametrize("window", [None, 3])
def test_torch_backend_gradients_match_naive(window, small_blocks):
    """The torch backend through autograd (blocks of 8, L = 29) against plain autograd through
    the naive oracle, fp64."""
    x = inputs(2, 2, 29, 16, torch.float64, seed=13, grad=True)
    dout = torch.randn_like(x[0])
    got = on("torch", castle_attention, *x, window=window)
    want = castle_attention_naive(*x, window=window)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for g, r in zip(torch.autograd.grad(got, x, dout), torch.autograd.grad(want, x, dout)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def by_definition(x: list[torch.Tensor], window: int | None) -> torch.Tensor:
    """CASTLE's outputs read off its definition, one query row t and one key s at a time, fp64,
    c = 1 / sqrt(D): row t is the softmax over s <= t of ``c qc_t . kc_s - SiLU(c qc_t . u)``
    against ``vc``, where ``u`` is the lookahead key of s with tokens 0..t present, the sum of
    ``sigmoid(c qu_s . ku_r) vu_r`` over s < r <= t (and r <= s + window). Differentiable."""
    qc, kc, vc, qu, ku, vu = (v.double() for v in x)
    c = qc.shape[3] ** -0.5
    rows = []
    for t in range(qc.shape[2]):
        q = qc[:, :, t]
        scores = []
        for s in range(t + 1):
            writers = slice(s + 1, (t if window is None else min(t, s + window)) + 1)
            weight = torch.sigmoid(c * (qu[:, :, s, None] * ku[:, :, writers]).sum(-1))
            u = (weight[..., None] * vu[:, :, writers]).sum(2)
            scores.append(c * (q * kc[:, :, s]).sum(-1) - F.silu(c * (q * u).sum(-1)))
        p = torch.softmax(torch.stack(scores, -1), -1)
        rows.append((p[..., None] * vc[:, :, :t + 1]).sum(2))
    return torch.stack(rows, 2)


def by_recurrence(x: list[torch.Tensor], window: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same outputs token by token, as a decoder with a cache of lookahead keys computes
    them (fp64, c = 1 / sqrt(D)): token t adds ``sigmoid(c qu_s . ku_t) vu_t`` to the key of
    every earlier s it reaches (s >= t - window), its own key starts at zero, and query t
    attends over keys 0..t. Returns the outputs and the final lookahead keys ``[B, H, L, D]``."""
    qc, kc, vc, qu, ku, vu = (v.detach().double() for v in x)
    c = qc.shape[3] ** -0.5
    u = torch.zeros_like(qc)
    rows = []
    for t in range(qc.shape[2]):
        reached = slice(0 if window is None else max(0, t - window), t)
        weight = torch.sigmoid(c * (qu[:, :, reached] * ku[:, :, t, None]).sum(-1))
        u[:, :, reached] += weight[..., None] * vu[:, :, t, None]
        q = qc[:, :, t, None]
        z = c * (q * kc[:, :, :t + 1]).sum(-1) - F.silu(c * (q * u[:, :, :t + 1]).sum(-1))
        rows.append((torch.softmax(z, -1)[..., None] * vc[:, :, :t + 1]).sum(2))
    return torch.stack(rows, 2), u


DEFINITION_CASES = {"B2-H2-L21": (2, 2, 21, 16, None), "B2-H2-L21-W2": (2, 2, 21, 16, 2),
                    "B2-H2-L21-W0": (2, 2, 21, 16, 0), "L1": (1, 1, 1, 16, None),
                    "L1-W3": (1, 3, 1, 16, 3), "B3-L6-D32-W1": (3, 1, 6, 32, 1),
                    "B3-L6-D32-W40": (3, 1, 6, 32, 40)}


@pytest.mark.parametrize("case", list(DEFINITION_CASES))
def test_matches_the_definition(case):
    """Every backend on the CPU, fp64, against this file's own two readings of CASTLE (which
    first agree with each other): castle_attention's outputs, its gradients against autograd
    through :func:`by_definition`, and token-by-token castle_decode with its final lookahead
    keys against :func:`by_recurrence`."""
    *shape, window = DEFINITION_CASES[case]
    x = inputs(*shape, torch.float64, seed=5)
    dout = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    leaves = [v.clone().requires_grad_() for v in x]
    want = by_definition(leaves, window)
    want_grads = torch.autograd.grad(want, leaves, dout)
    recurrent, keys = by_recurrence(x, window)
    torch.testing.assert_close(recurrent, want.detach(), atol=1e-13, rtol=0)
    for backend in backends_on("cpu"):
        xs = [v.clone().requires_grad_() for v in x]
        with fastdecode.use_backend(backend):
            got = castle_attention(*xs, window=window)
            grads = torch.autograd.grad(got, xs, dout)
            cache = CastleCache(window=window)
            steps = [castle_decode(cache, *(v[:, :, t:t + 1] for v in x))
                     for t in range(shape[2])]
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=backend)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0, msg=backend)
        torch.testing.assert_close(torch.cat(steps, 2), recurrent, atol=1e-12, rtol=0,
                                   msg=backend)
        torch.testing.assert_close(cache.lookahead_keys(), keys, atol=1e-12, rtol=0,
                                   msg=backend)


# ---- every backend against the reference -------------------------------------------------------

SHAPES = {"B2-H3-L37-D16": (2, 3, 37, 16), "L1": (1, 2, 1, 16), "L16-D32": (1, 1, 16, 32),
          "B3-L33-D48": (3, 1, 33, 48)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_backends_match_reference(device, shape, dtype, window, small_blocks):
    """Outputs and the gradients of all six inputs of every backend (torch: blocks of 8),
    against the dense reference on the same (rounded) inputs."""
    x = inputs(*SHAPES[shape], dtype, device, seed=1, grad=True)
    dout = torch.randn_like(x[0])
    want, want_grads = dense_reference([t.detach() for t in x], dout, window)
    for backend in backends_on(device):
        got = on(backend, castle_attention, *x, window=window)
        assert got.dtype == dtype and got.is_contiguous()
        assert_close(got, want, dtype)
        for g, w in zip(torch.autograd.grad(got, x, dout), want_grads):
            assert g.dtype == dtype
            assert_close(g, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 2])
def test_gradcheck_fp64(device, window, monkeypatch):
    """torch.autograd.gradcheck in fp64 through each backend (full Jacobian on the torch
    backend, three blocks of 3 rows; fast mode, random projections, through the kernels)."""
    monkeypatch.setattr(blocked, "BLOCK", 3)
    for backend in backends_on(device):
        x = inputs(1, 1, 8 if backend == "torch" else 19, 16, torch.float64, device, seed=2,
                   grad=True)
        with fastdecode.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda *t: castle_attention(*t, window=window), x,
                fast_mode=backend != "torch", atol=1e-7, rtol=1e-5)


def test_block_boundaries():
    """Lengths around multiples of the Triton block (16 under the interpreter, forced here) and
    windows that are not multiples of it."""
    need("triton", "cpu")
    from fastdecode.triton_kernels.castle.parallel import castle_forward_triton

    for L, window in ((15, None), (16, 7), (17, 16), (32, 17), (33, None)):
        x = inputs(1, 1, L, 16, torch.float64, seed=L)
        w = -1 if window is None else window
        want = castle_attention_naive(*x, window=window, scale=0.25)
        for block in (16, 32, 64):  # the interpreter's block and the GPU's
            out, _, ul = castle_forward_triton(*x, w, 0.25, block=block)
            torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
        # the final D is U^L: the last step of a token-by-token decode
        cache = CastleCache(window=window)
        for t in range(L):
            castle_decode(cache, *(v[:, :, t:t + 1] for v in x), scale=0.25)
        torch.testing.assert_close(ul, cache.lookahead_keys(), atol=1e-12, rtol=1e-12)


# ---- decoding with the cache --------------------------------------------------------------------


def splits_of(L: int, rng: random.Random) -> list[int]:
    sizes = []
    while sum(sizes) < L:
        sizes.append(min(L - sum(sizes), rng.choice([1, 1, 2, 3, 5, 8, 13])))
    return sizes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 0, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_decode_and_prefill_match_parallel(device, window, dtype):
    """Token-by-token decode, chunked prefill at random splits, and a whole-prompt prefill
    followed by decode all equal the parallel form; the final cache holds U^L."""
    B, H, L, D = 2, 2, 41, 16
    x = inputs(B, H, L, D, dtype, device, seed=3)
    want = on("torch", castle_attention, *x, window=window, scale=0.25)
    _, _, ul = castle_attention_reference(*x, -1 if window is None else window, 0.25)
    rng = random.Random(window)
    for backend in backends_on(device):
        with fastdecode.use_backend(backend):
            runs = {"decode": [1] * L, "random chunks": splits_of(L, rng),
                    "prompt + decode": [9] + [1] * (L - 9)}
            for name, sizes in runs.items():
                cache = CastleCache(num_layers=2, window=window)
                outs, pos = [], 0
                for n in sizes:
                    step = castle_decode if n == 1 else castle_prefill
                    outs.append(step(cache, *(v[:, :, pos:pos + n] for v in x), layer=1,
                                     scale=0.25))
                    pos += n
                assert cache.length(1) == L and cache.length(0) == 0
                got = torch.cat(outs, 2)
                assert got.dtype == dtype, name
                assert_close(got, want, dtype)
                assert_close(cache.lookahead_keys(1), ul, dtype)
                if window is not None:  # old lookahead queries were dropped
                    state = cache.layers[1]
                    assert state.qu.shape[2] <= 2 * (window + max(sizes)) + 16 < L + 16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 96])  # row tiles of 64 and of 32
def test_decode_kernel_split_kv(device, D):
    """The decode kernel cut into cache slices (split-KV and its merge) equals one slice."""
    need("triton", device)
    from fastdecode.triton_kernels.castle.decode import castle_decode_triton

    B, H, L = 2, 3, 150
    x = inputs(B, H, L, D, torch.float32, device, seed=4)
    for window in (-1, 20):
        results = []
        for splits in (1, 3, 7):
            cache = CastleCache(window=None if window < 0 else window)
            castle_prefill(cache, *(v[:, :, :L - 1] for v in x))
            state = cache._append(0, *(v[:, :, L - 1:] for v in x), cache.layers[0].scale)
            out = castle_decode_triton(state.u, state.qu, state.qu_base, state.kc, state.vc, L - 1,
                                       x[0][:, :, L - 1:], x[4][:, :, L - 1:],
                                       x[5][:, :, L - 1:], window, 1 / math.sqrt(D), splits)
            results.append((out, state.u[:, :, :L].clone()))
        for out, u in results[1:]:
            torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(u, results[0][1], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 3])
def test_checkpoint_and_crop(device, window):
    """A speculative step: checkpoint, feed 6 draft tokens (3 right, then wrong ones), crop to
    the accepted length and go on with the true tokens; the result equals the parallel form of
    the true sequence, with nothing subtracted."""
    B, H, L, D = 1, 2, 20, 16
    x = inputs(B, H, L, D, torch.float64, device, seed=7)
    wrong = inputs(B, H, 3, D, torch.float64, device, seed=8)
    want = on("torch", castle_attention, *x, window=window)
    for backend in backends_on(device):
        with fastdecode.use_backend(backend):
            cache = CastleCache(window=window)
            first = castle_prefill(cache, *(v[:, :, :10] for v in x))
            cache.checkpoint()
            draft = [torch.cat([v[:, :, 10:13], w], 2) for v, w in zip(x, wrong)]
            verified = castle_prefill(cache, *draft)
            assert cache.length() == 16
            cache.crop(13)
            rest = [castle_decode(cache, *(v[:, :, t:t + 1] for v in x)) for t in range(13, L)]
            got = torch.cat([first, verified[:, :, :3], *rest], 2)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
            with pytest.raises(ValueError, match="checkpoint"):
                cache.crop(5)


# ---- structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 3])
def test_causality(device, window):
    """Changing every input at positions > t leaves outputs 0..t unchanged, in every backend."""
    L, t = 29, 12
    x = inputs(2, 2, L, 16, torch.float64, device, seed=9)
    y = [v.clone() for v in x]
    for v in y:
        v[:, :, t + 1:] += torch.randn_like(v[:, :, t + 1:])
    for backend in backends_on(device):
        a = on(backend, castle_attention, *x, window=window)
        b = on(backend, castle_attention, *y, window=window)
        torch.testing.assert_close(a[:, :, :t + 1], b[:, :, :t + 1], atol=1e-13, rtol=0)
        assert (a[:, :, t + 1:] - b[:, :, t + 1:]).abs().max() > 1e-3
        torch.testing.assert_close(a[:, :, 0], x[2][:, :, 0], atol=1e-13, rtol=0)  # o_0 = v^C_0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reduces_to_causal_sdpa(device, dtype):
    """V^U = 0, or a window of 0, gives standard causal attention on (Q^C, K^C, V^C); a window
    of at least L - 1 gives full CASTLE."""
    qc, kc, vc, qu, ku, vu = inputs(2, 2, 25, 32, dtype, device, seed=10)
    sdpa = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for backend in backends_on(device):
        got = on(backend, castle_attention, qc, kc, vc, qu, ku, torch.zeros_like(vu))
        torch.testing.assert_close(got, sdpa, atol=tol, rtol=tol)
        got = on(backend, castle_attention, qc, kc, vc, qu, ku, vu, window=0)
        torch.testing.assert_close(got, sdpa, atol=tol, rtol=tol)
        full = on(backend, castle_attention, qc, kc, vc, qu, ku, vu)
        torch.testing.assert_close(on(backend, castle_attention, qc, kc, vc, qu, ku, vu,
                                      window=24), full, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_large_lookahead_values_stay_finite(device):
    """Lookahead scores in the hundreds (scaled-up V^U) give no NaN or inf."""
    qc, kc, vc, qu, ku, vu = inputs(1, 2, 40, 16, torch.float32, device, seed=11, grad=True)
    for backend in backends_on(device):
        out = on(backend, castle_attention, qc, kc, vc, qu, ku, vu * 100)
        grads = torch.autograd.grad(out.sum(), (qc, kc, vc, qu, ku, vu))
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(g).all() for g in grads)


# ---- the namespace ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["castle_attention_naive", "castle_attention_reference"])
def test_oracles_left_the_public_namespace(name):
    """The oracles are no public ops: fastdecode.ops still hands them out, with a deprecation
    warning that names their module."""
    assert name not in fastdecode.ops.__all__
    with pytest.warns(DeprecationWarning, match=r"fastdecode\.ops\.castle\.reference"):
        assert getattr(fastdecode.ops, name) is getattr(reference, name)


# ---- bad arguments --------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    x = inputs(1, 2, 5, 16)
    qc, kc, vc, qu, ku, vu = x
    cases = [
        ((qc[0], kc, vc, qu, ku, vu), {}, ValueError, "qc must have 4 dims"),
        ((qc, kc[:, :, :4], vc, qu, ku, vu), {}, ValueError, r"kc must have shape"),
        ((qc, kc, vc.double(), qu, ku, vu), {}, TypeError, "vc must have dtype torch.float32"),
        ((qc.int(), kc, vc, qu, ku, vu), {}, TypeError, "qc must have dtype float16"),
        ((qc, kc, vc, qu, ku, "vu"), {}, TypeError, "vu must be a torch.Tensor"),
        (tuple(v[..., :12] for v in x), {}, ValueError, "multiple of 16"),
        (tuple(v[:, :, :0] for v in x), {}, ValueError, "L >= 1"),
        (x, {"window": -1}, ValueError, "window must be in"),
        (x, {"window": 2.0}, TypeError, "window must be an int"),
        (x, {"scale": float("nan")}, ValueError, "scale must be finite"),
        (x, {"scale": "big"}, TypeError, "scale must be a float"),
        ((qc, kc, vc, qu, ku, vu.to("meta")), {}, ValueError, "vu is on meta"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            castle_attention(*args, **kwargs)

    cache = CastleCache()
    with pytest.raises(ValueError, match="one token"):
        castle_decode(cache, *(v[:, :, :2] for v in x))
    with pytest.raises(TypeError, match="cache must be a CastleCache"):
        castle_decode(None, *(v[:, :, :1] for v in x))
    castle_prefill(cache, *x)
    with pytest.raises(ValueError, match=r"qc must have shape \[B, H, C, D\]"):
        castle_decode(cache, *(v[:, :1, :1] for v in x))
    with pytest.raises(TypeError, match="holds torch.float32"):
        castle_decode(cache, *(v[:, :, :1].double() for v in x))
    with pytest.raises(ValueError, match="scale"):
        castle_decode(cache, *(v[:, :, :1] for v in x), scale=0.5)
    with pytest.raises(ValueError, match="layer must be in"):
        castle_decode(cache, *(v[:, :, :1] for v in x), layer=1)
    with pytest.raises(ValueError, match="checkpoint"):
        cache.crop(3)
    with pytest.raises(ValueError, match="length must be in"):
        cache.crop(9)
    with pytest.raises(ValueError, match="window must be in"):
        CastleCache(window=-2)


# ---- GPU sizes ----------------------------------------------------------------------------------

GPU_CASES = {
    "D64-L1000-bf16": (2, 4, 1000, 64, torch.bfloat16, None),
    "D128-L777-fp16-swl": (1, 3, 777, 128, torch.float16, 64),
    "D128-L512-bf16": (1, 2, 512, 128, torch.bfloat16, None),
    "D256-L300-fp16": (1, 2, 300, 256, torch.float16, 100),
    "D64-L400-fp32": (1, 2, 400, 64, torch.float32, None),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=GPU_ONLY) for n in GPU_CASES])
def test_triton_matches_reference_gpu(name):
    B, H, L, D, dtype, window = GPU_CASES[name]
    x = inputs(B, H, L, D, dtype, "cuda", seed=12, grad=True)
    dout = torch.randn_like(x[0])
    want, want_grads = dense_reference([t.detach() for t in x], dout, window)
    got = on("triton", castle_attention, *x, window=window)
    assert_close(got, want, dtype)
    for g, w in zip(torch.autograd.grad(got, x, dout), want_grads):
        assert_close(g, w, dtype)
    cache = CastleCache(window=window)
    with fastdecode.use_backend("triton"):
        castle_prefill(cache, *(v[:, :, :L - 4] for v in x))
        outs = [castle_decode(cache, *(v[:, :, t:t + 1] for v in x)) for t in range(L - 4, L)]
    assert_close(torch.cat(outs, 2), want[:, :, L - 4:], dtype)
