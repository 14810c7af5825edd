"""small_linear (fastdecode.ops.linear) and use_cpu_linears (fastdecode.hf.cpu_linears): every
instruction-set path of the native kernel against a float64 reference over odd shapes, strides
and biases; bitwise row invariance (a row computed alone equals the same row in any batch, on
each path); bad arguments; torch.compile; and a tiny random Llama run through the patched
linears."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from fastdecode import _backend, _native, use_backend
from fastdecode.hf import CpuLinears, use_cpu_linears
from fastdecode.ops import linear as linear_ops
from fastdecode.ops import small_linear
from fastdecode.ops.linear import set_small_linear_isa, small_linear_isa, small_linear_isas

NATIVE = pytest.mark.skipif(not _native.cpu_built(), reason="fastdecode._C is not built")
ISAS = small_linear_isas()


@contextlib.contextmanager
def isa(name: str) -> Iterator[None]:
    """Runs the block on the kernel's ``name`` path, then restores the path in use before."""
    before = small_linear_isa()
    set_small_linear_isa(name)
    try:
        yield
    finally:
        set_small_linear_isa(before)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    ref = reference(x, w, b)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # fp32 dot products of length K: error grows like sqrt(K) * |x| |w| * eps.
    scale = (x.double().abs() @ w.double().abs().T).clamp_min(1.0)
    if b is not None:
        scale = scale + b.double().abs()
    assert ((y.double() - ref).abs() / scale).max().item() < 1e-6 if y.numel() else True


def test_paths_are_reported() -> None:
    if not _native.cpu_built():
        assert ISAS == [] and small_linear_isa() is None
        return
    assert ISAS[-1] == "scalar" and set(ISAS) <= {"avx512", "avx2", "scalar"}
    assert small_linear_isa() in ISAS
    with pytest.raises(ValueError, match="name must be one of the supported paths"):
        set_small_linear_isa("sse9")


# ---- values against float64, every path ----------------------------------------------------

SHAPES = list(itertools.product((0, 1, 2, 3, 5, 8, 17, 65), (0, 1, 3, 17, 100, 257),
                                (0, 1, 7, 16, 33, 577)))


@NATIVE
@pytest.mark.parametrize("name", ISAS)
def test_matches_float64_reference_on_every_path(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    with isa(name):
        for i, (M, N, K) in enumerate(SHAPES):
            if M * N * K > 3_000_000:
                continue
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g)
            b = torch.randn(N, generator=g) if i % 2 else None
            y = small_linear(x, w, b)
            assert_close(y, x, w, b)
            if K == 0:
                assert torch.equal(y, (b if b is not None else torch.zeros(N)).expand(M, N))


@NATIVE
@pytest.mark.parametrize("name", ISAS)
def test_leading_dims_strides_and_bias(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(19, 33, generator=g)
    b = torch.randn(19, generator=g)
    base = torch.randn(4, 3, 70, generator=g)
    cases = {
        "3-d": torch.randn(2, 3, 33, generator=g),
        "1-d": torch.randn(33, generator=g),
        "row stride > K": base[..., :33],  # rows read in place, ldx = 70
        "inner stride 2": base[..., ::2][..., :33],  # copied
        "transposed": torch.randn(33, 6, generator=g).t(),  # copied
        "expanded": torch.randn(1, 33, generator=g).expand(5, 33),
        "empty batch": torch.randn(0, 4, 33, generator=g),
    }
    strided_w = torch.randn(19, 50, generator=g)[:, 7:40]
    strided_b = torch.randn(38, generator=g)[::2]
    with isa(name):
        for label, x in cases.items():
            for bias in (None, b):
                y = small_linear(x, w, bias)
                assert y.shape == (*x.shape[:-1], 19), label
                assert_close(y.reshape(-1, 19), x.reshape(-1, 33), w, bias)
        x = cases["3-d"]
        assert_close(small_linear(x, strided_w, strided_b).reshape(-1, 19), x.reshape(-1, 33),
                     strided_w, strided_b)
        assert_close(small_linear(x, w.t().contiguous().t(), b).reshape(-1, 19),
                     x.reshape(-1, 33), w, b)


# ---- row invariance ------------------------------------------------------------------------


@NATIVE
@pytest.mark.parametrize("name", ISAS)
def test_rows_are_bitwise_independent_of_the_batch(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    with isa(name):
        for N, K in ((37, 577), (13, 35), (5, 16), (3, 1)):
            w = torch.randn(N, K, generator=g)
            b = torch.randn(N, generator=g)
            x = torch.randn(21, K, generator=g)
            for bias in (None, b):
                alone = torch.cat([small_linear(x[i:i + 1], w, bias) for i in range(21)])
                for M in (1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 21):
                    assert torch.equal(small_linear(x[:M], w, bias), alone[:M]), (N, K, M)
                # a row at every position of a tile: the same row in different batches
                for start in range(8):
                    assert torch.equal(small_linear(x[start:start + 9], w, bias),
                                       alone[start:start + 9])


@NATIVE
def test_backends_and_native_path_agree() -> None:
    x, w, b = torch.randn(6, 40), torch.randn(30, 40), torch.randn(30)
    assert _backend.select("small_linear", torch.device("cpu"))[0] == "cpu"
    with use_backend("torch"):
        assert torch.equal(small_linear(x, w, b), F.linear(x, w, b))
    assert_close(small_linear(x, w, b), x, w, b)


def test_grad_mode_falls_back_to_f_linear() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    y = small_linear(x, w)
    assert y.requires_grad
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, 8))
    with torch.no_grad():
        assert not small_linear(x, w).requires_grad


# ---- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: small_linear(torch.randn(2, 8).double(), torch.randn(3, 8)), TypeError,
     "x must have dtype torch.float32, found torch.float64"),
    (lambda: small_linear(torch.randn(2, 8), torch.randn(3, 8).half()), TypeError,
     "weight must have dtype torch.float32, found torch.float16"),
    (lambda: small_linear(torch.randn(2, 8), torch.randn(3, 8), torch.zeros(3, dtype=torch.int64)),
     TypeError, "bias must have dtype torch.float32"),
    (lambda: small_linear([[1.0]], torch.randn(3, 8)), TypeError, "x must be a torch.Tensor"),
    (lambda: small_linear(torch.randn(2, 8), torch.randn(3, 7)), ValueError,
     r"weight must have shape \[N, K\] with K = x.shape\[-1\] = 8, found \(3, 7\)"),
    (lambda: small_linear(torch.randn(2, 8), torch.randn(3, 8, 1)), ValueError,
     r"weight must have 2 dims \[N, K\], found shape \(3, 8, 1\)"),
    (lambda: small_linear(torch.tensor(1.0), torch.randn(3, 1)), ValueError,
     r"x must have at least 1 dim \[..., K\], found shape \(\)"),
    (lambda: small_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(4)), ValueError,
     r"bias must have shape \[N\] = \(3,\), found \(4,\)"),
    (lambda: small_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(1, 3)), ValueError,
     r"bias must have 1 dims \[N\], found shape \(1, 3\)"),
])
def test_bad_arguments(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


@NATIVE
def test_native_entry_checks_its_arguments() -> None:
    C = _native._C
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="M, N and K must be >= 0"):
        C.small_linear("cpu", 0, x.data_ptr(), 8, x.data_ptr(), 8, 0, x.data_ptr(), 8, -1, 4, 8)
    with pytest.raises(ValueError, match="ldx must be >= K=8, found 4"):
        C.small_linear("cpu", 0, x.data_ptr(), 4, x.data_ptr(), 8, 0, x.data_ptr(), 8, 2, 2, 8)
    with pytest.raises(ValueError, match="weight is a null pointer"):
        C.small_linear("cpu", 0, x.data_ptr(), 8, 0, 8, 0, x.data_ptr(), 8, 2, 2, 8)
    with pytest.raises(ValueError, match="must be avx512, avx2 or scalar, found 'x'"):
        C.set_small_linear_isa("x")


# ---- torch.compile -------------------------------------------------------------------------


def test_compile_fullgraph_uses_the_custom_op() -> None:
    torch._dynamo.reset()

    def f(x, w, b):
        return torch.relu(small_linear(x, w, b)) * 2

    x, w, b = torch.randn(2, 3, 24), torch.randn(10, 24), torch.randn(10)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b)
    assert torch.equal(got, f(x, w, b))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = small_linear(torch.empty(4, 5, 24), torch.empty(10, 24))
        assert y.shape == (4, 5, 10) and y.dtype == torch.float32


# ---- use_cpu_linears on a tiny Llama -------------------------------------------------------


def tiny_llama(tie: bool = True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tie,
                                   attention_bias=True)
    return transformers.LlamaForCausalLM(cfg).eval()


@NATIVE
def test_use_cpu_linears_matches_stock_model_and_restores() -> None:
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = model(ids).logits
        handle = use_cpu_linears(model)
        assert isinstance(handle, CpuLinears)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert handle.modules == linears and len(linears) == 2 * 7 + 1
        patched = model(ids).logits
        torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-5)
        # the tied head reads the embedding at call time: an update is seen, nothing copied
        model.model.embed_tokens.weight.mul_(2)
        doubled = model(ids).logits
        model.model.embed_tokens.weight.div_(2)
        assert not torch.allclose(doubled, patched)
        assert use_cpu_linears(model).modules == []  # already patched: left alone
        handle.restore()
        handle.restore()  # idempotent
    assert all("forward" not in m.__dict__ for m in linears)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock)
        with use_cpu_linears(model, max_rows=4) as h:
            assert len(h.modules) == 15
            torch.testing.assert_close(model(ids).logits, stock, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in linears)


@NATIVE
def test_use_cpu_linears_falls_back_when_the_call_does_not_qualify(monkeypatch) -> None:
    lin = torch.nn.Linear(8, 4)
    used = []
    real = linear_ops.small_linear_unchecked

    def spy(*args):
        used.append(args[0].shape)
        return real(*args)

    import fastdecode.hf.cpu_linears as cl

    monkeypatch.setattr(cl, "small_linear_unchecked", spy)
    with use_cpu_linears(lin, max_rows=6):
        x = torch.randn(2, 3, 8)
        y = lin(x)  # grad enabled and the weight requires grad: F.linear, differentiable
        assert y.requires_grad and used == []
        with torch.no_grad():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
            assert used == [(2, 3, 8)]
            lin(torch.randn(7, 8))  # 7 rows > max_rows
            assert len(used) == 1
            lin(torch.randn(4, 16)[:, ::2])  # strided rows qualify
            assert len(used) == 2
            lin.double()
            lin(torch.randn(2, 8).double())  # float64: the stock path
            assert len(used) == 2
    with pytest.raises(ValueError, match=r"max_rows must be in \[0, inf\], found -1"):
        use_cpu_linears(lin, max_rows=-1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        use_cpu_linears("model")


@NATIVE
def test_parameters_skip_the_custom_op_dispatcher(monkeypatch) -> None:
    """Module weights are nn.Parameters: eager calls still go straight to the backend."""
    lin = torch.nn.Linear(8, 4).requires_grad_(False)

    def boom(*args):
        raise AssertionError("went through the custom op")

    monkeypatch.setattr(linear_ops, "_small_linear_op", boom)
    with use_cpu_linears(lin), torch.no_grad():
        assert lin(torch.randn(3, 8)).shape == (3, 4)


@NATIVE
def test_tiny_llama_token_alone_equals_token_in_a_batch_of_five() -> None:
    """Under use_cpu_linears every linear of a tiny Llama gives a token's row bitwise the same
    output whether the token is computed alone or among the 5 rows of a forward."""
    model = tiny_llama(tie=False)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def record(name: str):
        def hook(module, args, out) -> None:
            seen.setdefault(name, (args[0].clone(), out.clone()))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    ids = torch.randint(0, 48, (1, 5), generator=torch.Generator().manual_seed(4))
    try:
        with use_cpu_linears(model), torch.no_grad():
            model(ids)
            assert seen.keys() == linears.keys()
            for name, (inp, out) in seen.items():
                assert inp.shape[:2] == (1, 5)
                for i in range(5):
                    alone = linears[name](inp[:, i:i + 1])
                    assert torch.equal(alone, out[:, i:i + 1]), (name, i)
            # five one-token sequences as a batch of 5, and each alone: same logits
            tokens = ids.reshape(5, 1)
            batch = model(tokens).logits
            for i in range(5):
                assert torch.equal(model(tokens[i:i + 1]).logits, batch[i:i + 1]), i
    finally:
        for h in hooks:
            h.remove()


@NATIVE
@pytest.mark.parametrize("value,expect", [("scalar", "scalar"), ("bogus", "error")])
def test_environment_variable_picks_the_path(value: str, expect: str) -> None:
    code = ("import torch\nfrom fastdecode.ops import small_linear\n"
            "from fastdecode.ops.linear import small_linear_isa\n"
            "try:\n    small_linear(torch.randn(2, 4), torch.randn(3, 4))\n"
            "    print(small_linear_isa())\n"
            "except ValueError as e:\n    print('error', e)\n")
    env = {**os.environ, "FASTDECODE_CPU_ISA": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(expect), out
    if expect == "error":
        assert "FASTDECODE_CPU_ISA must be avx512, avx2 or scalar, found 'bogus'" in out
