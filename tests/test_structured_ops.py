"""Structured ops (fastdecode.ops.structured): every backend against the plain-torch reference
across fp32/bf16/fp16 and odd sizes (the fused BlockShuffle forward and backward, the SwiGLU
up-projection, the decoding products with and without split-K), the references against
independent code, fp64 gradcheck through the custom ops' autograd, fp64 on the ``torch``
backend only (the ``triton`` one refuses it when forced), torch.compile, and bad arguments.

Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors with small shapes; larger
shapes run only on a GPU (mark ``gpu``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_CUDA

from fastdecode import BackendUnavailableError, _backend, use_backend
from fastdecode.ops import (
    block_dense_decode,
    block_shuffle,
    block_shuffle_decode,
    dense_decode,
    lowrank_decode,
    swiglu_up,
)
from fastdecode.ops.structured import (
    block_shuffle_backward_reference,
    block_shuffle_reference,
    swiglu_up_reference,
)

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]
# (T, b, p, s): odd widths, m = min(p, s) not a multiple of b, one block, T = 1.
SHUFFLE_SHAPES = [(5, 2, 8, 12), (7, 3, 10, 6), (1, 4, 4, 4), (3, 1, 9, 5), (19, 4, 6, 10)]


def backends(device: str) -> list[str]:
    """The backends that run on ``device`` here, reference first."""
    names = ["torch"] + (["triton"] if _backend._why_not("triton", device) is None else [])
    return names


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randn(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)


# ---- references against independent code ---------------------------------------------------


def test_block_shuffle_reference_matches_loops() -> None:
    b, m, p, s = 3, 6, 10, 6
    x = torch.randn(4, b * p, dtype=torch.float64)
    w1 = torch.randn(b, m, p, dtype=torch.float64)
    w2 = torch.randn(b, s, m, dtype=torch.float64)
    y, z = block_shuffle_reference(x, w1, w2)
    h = torch.cat([x[:, k * p:(k + 1) * p] @ w1[k].T for k in range(b)], dim=1)
    for j in range(b):
        for i in range(m):
            torch.testing.assert_close(z[:, j, i], h[:, i * b + j])
        for o in range(s):
            torch.testing.assert_close(y[:, o * b + j], z[:, j] @ w2[j, o])


def test_gradcheck_ops() -> None:
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block_shuffle, (x, w1, w2))
    v = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_up, (x, v, u))


def test_opcheck_prefill_ops() -> None:
    """The differentiable custom ops pass torch.library.opcheck: schema, fake implementation,
    register_autograd and AOT dispatch."""
    from fastdecode.ops import structured

    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(structured._block_shuffle_op, (x, w1, w2))
    torch.library.opcheck(structured._swiglu_up_op, (x, v, u))


def fp64_calls() -> dict[str, tuple]:
    """Each public op and fp64 arguments, keyed by the op it dispatches."""
    x = torch.randn(3, 12, dtype=torch.float64)
    w1, w2 = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, dtype=torch.float64)
    v, u = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    w = torch.randn(5, 12, dtype=torch.float64)
    return {
        "block_shuffle": (block_shuffle, (x, w1, w2)),
        "swiglu_up": (swiglu_up, (x, v, u)),
        "dense_decode": (dense_decode, (x, w)),
        "block_dense_decode": (block_dense_decode, (x, v, u)),
        "block_shuffle_decode": (block_shuffle_decode, (x, w1, w2)),
    }


@pytest.fixture
def triton_runs_anywhere(monkeypatch):
    """The ``triton`` backend counts as runnable on every device, whether or not it is here
    (the calls below never reach a kernel): the automatic choice prefers it on CUDA."""
    monkeypatch.delenv("FASTDECODE_BACKEND", raising=False)
    why_not = _backend._why_not
    monkeypatch.setattr(_backend, "_why_not",
                        lambda backend, device: None if backend == "triton" else why_not(
                            backend, device))


def test_fp64_runs_on_torch_under_the_automatic_choice(triton_runs_anywhere) -> None:
    cuda = torch.device("cuda")  # select() reads the device type and the arguments' dtypes
    for op, (fn, args) in fp64_calls().items():
        assert _backend.select(op, cuda, tuple(a.float() for a in args))[0] == "triton", op
        assert _backend.select(op, cuda, args)[0] == "torch", op
        with use_backend("torch"):
            want = fn(*args)
        torch.testing.assert_close(fn(*args), want)  # CPU tensors: the automatic choice
    x, w1, w2 = fp64_calls()["block_shuffle"][1]
    gy = torch.randn(3, 12, dtype=torch.float64)
    assert _backend.select("block_shuffle_backward", cuda, (gy, x, w1, w2, w2))[0] == "torch"


@pytest.mark.parametrize("force", ["use_backend", "env"])
def test_forced_triton_refuses_fp64(triton_runs_anywhere, monkeypatch, force: str) -> None:
    source = r"use_backend\(\)" if force == "use_backend" else "FASTDECODE_BACKEND"
    for op, (fn, args) in fp64_calls().items():
        grads = [False, True] if op in ("block_shuffle", "swiglu_up") else [False]
        for grad in grads:
            leaves = [a.clone().requires_grad_(grad) for a in args]
            match = (rf"backend 'triton' of {op} cannot run \(requested by {source}\): it "
                     "does not take float64 tensors")
            with pytest.raises(BackendUnavailableError, match=match):
                if force == "use_backend":
                    with use_backend("triton"):
                        fn(*leaves)
                else:
                    with monkeypatch.context() as m:
                        m.setenv("FASTDECODE_BACKEND", "triton")
                        fn(*leaves)


def test_swiglu_up_reference() -> None:
    x = torch.randn(4, 12, dtype=torch.float64)
    v = torch.randn(3, 2, 4, dtype=torch.float64)
    u = torch.randn(8, 6, dtype=torch.float64)
    t = x @ torch.block_diag(*v).T
    g, up = (t @ u.T).chunk(2, -1)
    out, t2 = swiglu_up_reference(x, v, u)
    torch.testing.assert_close(t2, t)
    torch.testing.assert_close(out, F.silu(g) * up)


# ---- backends against the reference --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,b,p,s", SHUFFLE_SHAPES)
def test_block_shuffle_backends(device: str, dtype: torch.dtype, T: int, b: int, p: int,
                                s: int) -> None:
    m = min(p, s)
    x = randn(T, b * p, dtype=dtype, device=device)
    w1 = randn(b, m, p, dtype=dtype, device=device, scale=0.5)
    w2 = randn(b, s, m, dtype=dtype, device=device, scale=0.5)
    gy = randn(T, b * s, dtype=dtype, device=device)
    results = {}
    for name in backends(device):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        with use_backend(name):
            y = block_shuffle(*leaves)
            y.backward(gy)
            results[name] = [y.detach()] + [t.grad for t in leaves]
    ref = results.pop("torch")
    for name, got in results.items():
        for what, a, r in zip(("y", "gx", "gw1", "gw2"), got, ref):
            assert a.dtype == dtype and a.shape == r.shape
            assert rel(a, r) < TOL[dtype], f"{name} {what}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,b,rb,p,f", [(5, 1, 6, 12, 10), (3, 2, 4, 5, 7), (17, 4, 2, 4, 20)])
def test_swiglu_up_backends(device: str, dtype: torch.dtype, T: int, b: int, rb: int, p: int,
                            f: int) -> None:
    x = randn(T, b * p, dtype=dtype, device=device)
    v = randn(b, rb, p, dtype=dtype, device=device, scale=0.5)
    u = randn(2 * f, b * rb, dtype=dtype, device=device, scale=0.5)
    with use_backend("torch"):
        ref = swiglu_up(x, v, u)
    for name in backends(device)[1:]:
        with use_backend(name):
            got = swiglu_up(x, v, u)
        assert got.dtype == dtype and rel(got, ref) < TOL[dtype], name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 8, 16])
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_backends(device: str, dtype: torch.dtype, T: int, splits: int | None) -> None:
    b, p, s, rb = 3, 70, 50, 6
    x = randn(T, b * p, dtype=dtype, device=device)
    w = randn(b * s, b * p, dtype=dtype, device=device, scale=0.1)
    v = randn(b, rb, p, dtype=dtype, device=device, scale=0.1)
    vr = randn(b * rb, b * p, dtype=dtype, device=device, scale=0.1)
    u = randn(b * s, b * rb, dtype=dtype, device=device, scale=0.1)
    w1 = randn(b, s, p, dtype=dtype, device=device, scale=0.1)
    w2 = randn(b, s, s, dtype=dtype, device=device, scale=0.1)
    calls = {
        "dense": (dense_decode, (x, w)),
        "block_dense": (block_dense_decode, (x, v, u)),
        "lowrank": (lowrank_decode, (x, vr, u)),
        "block_shuffle": (block_shuffle_decode, (x, w1, w2)),
    }
    for what, (fn, args) in calls.items():
        with use_backend("torch"):
            ref = fn(*args)
        for name in backends(device)[1:]:
            if splits is None:
                with use_backend(name):
                    got = fn(*args)
            else:  # force split-K (atomics) on the stage-1 products
                from fastdecode.triton_kernels import structured as kernels

                if what == "lowrank":
                    continue
                launcher = getattr(kernels, f"{what}_decode_triton")
                got = launcher(*[a.contiguous() for a in args], splits=splits)
            assert got.dtype == dtype and got.shape == ref.shape
            assert rel(got, ref) < TOL[dtype], f"{name} {what}"
        # The decoding products against the prefill ones (independent of the backend).
        if what == "block_shuffle":
            assert rel(ref, block_shuffle(x, w1, w2)) < 2 * TOL[dtype]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU_ONLY)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_shapes_gpu(device: str, dtype: torch.dtype) -> None:
    T, b, d, f = 300, 4, 512, 1024
    x = randn(T, d, dtype=dtype, device=device)
    w1 = randn(b, d // b, d // b, dtype=dtype, device=device, scale=0.05)
    w2 = randn(b, f // b, d // b, dtype=dtype, device=device, scale=0.05)
    with use_backend("torch"):
        ref = block_shuffle(x, w1, w2)
    assert rel(block_shuffle(x, w1, w2), ref) < TOL[dtype]
    v = randn(1, 256, d, dtype=dtype, device=device, scale=0.05)
    u = randn(2 * f, 256, dtype=dtype, device=device, scale=0.05)
    with use_backend("torch"):
        ref = swiglu_up(x, v, u)
    assert rel(swiglu_up(x, v, u), ref) < TOL[dtype]
    for T in (1, 8):
        with use_backend("torch"):
            ref = block_shuffle_decode(x[:T], w1, w2)
        assert rel(block_shuffle_decode(x[:T], w1, w2), ref) < TOL[dtype]


def test_compile_runs_the_custom_ops() -> None:
    w1 = torch.randn(2, 4, 6)
    w2 = torch.randn(2, 4, 4)
    x = torch.randn(5, 12)
    compiled = torch.compile(block_shuffle, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w1, w2), block_shuffle(x, w1, w2))


# ---- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: block_shuffle(torch.randn(3, 12), torch.randn(2, 4, 6), torch.randn(3, 4, 4)),
     ValueError, "w2 must have shape"),
    (lambda: block_shuffle(torch.randn(3, 10), torch.randn(2, 4, 6), torch.randn(2, 4, 4)),
     ValueError, "d_in = b\\*p = 12"),
    (lambda: block_shuffle(torch.randn(3, 12), torch.randn(2, 3, 6), torch.randn(2, 4, 3)),
     ValueError, "m = min"),
    (lambda: block_shuffle(torch.randn(3, 12), torch.randn(2, 4, 6).half(), torch.randn(2, 4, 4)),
     TypeError, "w1 must have dtype"),
    (lambda: block_shuffle(torch.randn(12), torch.randn(2, 4, 6), torch.randn(2, 4, 4)),
     ValueError, "x must have 2 dims"),
    (lambda: block_shuffle(torch.randn(3, 12).int(), torch.randn(2, 4, 6), torch.randn(2, 4, 4)),
     TypeError, "x must have dtype"),
    (lambda: swiglu_up(torch.randn(3, 12), torch.randn(2, 3, 6), torch.randn(9, 6)),
     ValueError, "even number"),
    (lambda: swiglu_up(torch.randn(3, 12), torch.randn(2, 3, 6), torch.randn(8, 5)),
     ValueError, "u must have r = 6"),
    (lambda: dense_decode(torch.randn(17, 8), torch.randn(4, 8)), ValueError, "T in \\[1, 16\\]"),
    (lambda: dense_decode(torch.randn(2, 8), torch.randn(4, 7)), ValueError, "d_in = 8"),
    (lambda: lowrank_decode(torch.randn(2, 8), torch.randn(3, 8, 1), torch.randn(4, 3)),
     ValueError, "v must have 2 dims"),
    (lambda: block_dense_decode(torch.randn(2, 9), torch.randn(2, 3, 4), torch.randn(4, 6)),
     ValueError, "d_in"),
    (lambda: block_shuffle(torch.randn(3, 12), torch.randn(0, 4, 6), torch.randn(0, 4, 4)),
     ValueError, "w1 must not be empty"),
])
def test_bad_arguments(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs two devices")
def test_mixed_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        block_shuffle(torch.randn(3, 12), torch.randn(2, 4, 6).cuda(), torch.randn(2, 4, 4).cuda())


def test_every_autotune_config() -> None:
    """Each config the GPU autotuner may pick, launched directly (the interpreter cannot
    autotune): the same results as the reference."""
    if _backend._why_not("triton", "cpu") is not None:
        pytest.skip("needs TRITON_INTERPRET=1")
    import triton

    from fastdecode.triton_kernels.structured import block_shuffle as bs
    from fastdecode.triton_kernels.structured import swiglu_up as su

    T, b, p, s = 70, 2, 40, 24
    m = min(p, s)
    x, w1, w2 = torch.randn(T, b * p), torch.randn(b, m, p), torch.randn(b, s, m)
    y_ref, z_ref = block_shuffle_reference(x, w1, w2)
    flags = bs._dot_flags(x)
    for config in bs._block_shuffle_fwd_tuned.configs:
        y, z = torch.empty_like(y_ref), torch.empty_like(z_ref)
        grid = (triton.cdiv(T, config.kwargs["BLOCK_T"]), b)
        bs._block_shuffle_fwd_kernel[grid](x, w1, w2, z, y, T, b, p, m, s, 128,
                                           **config.kwargs, **flags)
        assert rel(y, y_ref) < 1e-5 and rel(z, z_ref) < 1e-5, config
    gy = torch.randn_like(y_ref)
    gx_ref = block_shuffle_backward_reference(gy, x, w1, w2, z_ref)[0]
    for config in bs._block_shuffle_bwd_tuned.configs:
        gh, gx = torch.empty(T, b * m), torch.empty_like(x)
        grid = (triton.cdiv(T, config.kwargs["BLOCK_T"]), b)
        bs._block_shuffle_bwd_kernel[grid](gy, w1, w2, gh, gx, T, b, p, m, s, 128,
                                           **config.kwargs, **flags)
        assert rel(gx, gx_ref) < 1e-5, config
    c_ref = x[:, :p] @ w1[0].T  # block 0 of stage 1: [T, m]
    for config in bs._block_mm_tuned.configs:
        c = torch.empty(T, m)
        grid = (triton.cdiv(T, config.kwargs["BLOCK_M"]),
                triton.cdiv(m, config.kwargs["BLOCK_N"]), 1)
        bs._block_mm_kernel[grid](x, w1, c, T, m, p, 128, 64, b * p, 0, 1, 0, 1, p, m, 0, 1,
                                  **config.kwargs, **flags)
        assert rel(c, c_ref) < 1e-5, config
    v, u = torch.randn(1, 16, b * p), torch.randn(2 * 30, 16)
    out_ref, t = swiglu_up_reference(x, v, u)
    for config in su._swiglu_up_tuned.configs:
        out = torch.empty_like(out_ref)
        grid = (triton.cdiv(T, config.kwargs["BLOCK_T"]),
                triton.cdiv(30, config.kwargs["BLOCK_N"]))
        su._swiglu_up_kernel[grid](t, u, out, T, 30, 16, 128, **config.kwargs, **flags)
        assert rel(out, out_ref) < 1e-5, config
