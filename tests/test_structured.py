"""Structured linear layers and FFNs (fastdecode.nn): dense equivalence against independent
constructions, the BlockShuffle index maps, gradients (fp64 gradcheck), pre-merge, parameter and
FLOP counts (the paper's Table 1 exactly), from_dense fits, the paper's inits, and bad
configurations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.nn.ffn import StructuredFFN
from fastdecode.nn.structured_linear import (
    BlockDenseLinear,
    BlockShuffleLinear,
    LowRankLinear,
    StructuredLinear,
)
from fastdecode.nn.structured_linear import linear_from_dense, make_linear

SHAPES = [(16, 48), (48, 16), (24, 24), (12, 36)]  # (in, out): in < out, in > out, square


def layers(d_in: int, d_out: int, dtype: torch.dtype = torch.float64) -> list[StructuredLinear]:
    """One layer of every structure (several block counts) for these widths, with a bias."""
    r = min(d_in, d_out) // 2
    out = [LowRankLinear(d_in, d_out, r, bias=True, dtype=dtype)]
    for b in (1, 2, 4):
        if d_in % b == 0 and r % b == 0:
            out.append(BlockDenseLinear(d_in, d_out, r, b, bias=True, dtype=dtype))
    for b in (1, 2, 3, 4):
        if d_in % b == 0 and d_out % b == 0:
            out.append(BlockShuffleLinear(d_in, d_out, b, bias=True, dtype=dtype))
    with torch.no_grad():
        for layer in out:
            layer.bias.normal_()
    return out


def shuffle_dense_by_formula(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The entry formula of a BlockShuffle linear, element by element:
    ``W[o*b + j, k*p + c]`` is the sum over i with ``(i*b + j) // m == k`` of
    ``w2[j, o, i] * w1[k, (i*b + j) % m, c]``."""
    b, m, p = w1.shape
    s = w2.shape[1]
    W = torch.zeros(b * s, b * p, dtype=w1.dtype)
    for j in range(b):
        for i in range(m):
            k, row = divmod(i * b + j, m)
            W[j::b, k * p:(k + 1) * p] += torch.outer(w2[j, :, i], w1[k, row])
    return W


def shuffle_by_loops(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The per-token semantics of a BlockShuffle linear, written as loops over the index maps."""
    b, m, p = w1.shape
    s = w2.shape[1]
    y = torch.zeros(x.shape[0], b * s, dtype=x.dtype)
    h = torch.zeros(x.shape[0], b * m, dtype=x.dtype)
    for k in range(b):
        h[:, k * m:(k + 1) * m] = x[:, k * p:(k + 1) * p] @ w1[k].T
    for j in range(b):
        z = torch.stack([h[:, i * b + j] for i in range(m)], dim=1)
        u = z @ w2[j].T
        for o in range(s):
            y[:, o * b + j] = u[:, o]
    return y


# ---- dense equivalence ----------------------------------------------------------------------


@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_identity_probe_equals_to_dense(d_in: int, d_out: int) -> None:
    for layer in layers(d_in, d_out):
        probe = layer(torch.eye(d_in, dtype=torch.float64)) - layer.bias
        torch.testing.assert_close(probe.T, layer.to_dense(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_explicit_constructions(d_in: int, d_out: int) -> None:
    for layer in layers(d_in, d_out):
        if isinstance(layer, LowRankLinear):
            expected = layer.u @ layer.v
        elif isinstance(layer, BlockDenseLinear):
            expected = layer.u @ torch.block_diag(*layer.v)
        else:
            expected = shuffle_dense_by_formula(layer.w1, layer.w2)
        torch.testing.assert_close(layer.to_dense(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_in,d_out,b", [(16, 48, 4), (48, 16, 4), (24, 24, 2), (30, 45, 3),
                                          (8, 8, 1)])
def test_block_shuffle_index_maps(d_in: int, d_out: int, b: int) -> None:
    layer = BlockShuffleLinear(d_in, d_out, b, dtype=torch.float64)
    x = torch.randn(5, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), shuffle_by_loops(x, layer.w1, layer.w2))
    # Monarch block-rank property: rows j::b against input slice k have rank <= m/b.
    W, (_, m, p) = layer.to_dense(), layer.w1.shape
    if m % b == 0:
        for j in range(b):
            for k in range(b):
                assert torch.linalg.matrix_rank(W[j::b, k * p:(k + 1) * p]) <= m // b
    # One block: the plain product w2 w1.
    if b == 1:
        torch.testing.assert_close(W, layer.w2[0] @ layer.w1[0])


def test_block_dense_one_block_is_low_rank() -> None:
    bd = BlockDenseLinear(12, 20, 6, 1, dtype=torch.float64)
    lr = LowRankLinear(12, 20, 6, dtype=torch.float64)
    with torch.no_grad():
        lr.v.copy_(bd.v[0])
        lr.u.copy_(bd.u)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(bd(x), lr(x))


@pytest.mark.parametrize("d_in,d_out", SHAPES[:2])
def test_forward_matches_dense_any_leading_dims(d_in: int, d_out: int) -> None:
    for layer in layers(d_in, d_out):
        x = torch.randn(2, d_in, 3, dtype=torch.float64).transpose(1, 2)  # non-contiguous
        y = layer(x)
        assert y.shape == (2, 3, d_out)
        torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_tolerance(dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for layer in layers(24, 48, torch.float32):
        x = torch.randn(7, 24)
        ref = x @ layer.to_dense().T + layer.bias
        y = layer.to(dtype)(x.to(dtype)).float()
        assert y.dtype == torch.float32
        assert ((y - ref).norm() / ref.norm()).item() < tol


# ---- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("d_in,d_out", [(8, 12), (12, 8)])
def test_gradcheck_layers(d_in: int, d_out: int) -> None:
    for layer in layers(d_in, d_out):
        x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
        params = tuple(layer.parameters())

        def fn(x, *ps, layer=layer):
            return torch.func.functional_call(layer, dict(zip(
                [n for n, _ in layer.named_parameters()], ps)), (x,))

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_factor_gradients_follow_chain_rule() -> None:
    for layer in layers(12, 8):
        x = torch.randn(5, 12, dtype=torch.float64)
        gy = torch.randn(5, 8, dtype=torch.float64)
        layer(x).backward(gy)
        grads = [f.grad.clone() for f in layer.factors()]
        layer.zero_grad()
        (x @ layer.to_dense().T).backward(gy)
        for g, f in zip(grads, layer.factors()):
            torch.testing.assert_close(g, f.grad)


# ---- pre-merge ------------------------------------------------------------------------------


def test_merge_same_outputs_and_invalidation() -> None:
    for layer in layers(16, 24, torch.float32):
        x = torch.randn(4, 16)
        with torch.no_grad():
            expected = layer(x)
            layer.merge()
            assert layer.merged and layer.path(4, False, x.device) == "merged"
            assert layer.path(layer.merge_threshold + 1, False, x.device) == "structured"
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.merged_weight(), layer.to_dense())
            layer.factors()[0].mul_(2.0)  # an optimizer step: the merge is rebuilt
            torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias,
                                       rtol=1e-5, atol=1e-5)
        assert not any("merged" in k for k in layer.state_dict())
        assert layer.path(4, True, x.device) == "structured"  # training ignores the merge
        layer.unmerge()
        assert not layer.merged


# ---- counts ---------------------------------------------------------------------------------


def test_num_params_and_flops_formulas() -> None:
    d_in, d_out = 24, 48
    lr = LowRankLinear(d_in, d_out, 8)
    bd = BlockDenseLinear(d_in, d_out, 8, 4)
    bs = BlockShuffleLinear(d_in, d_out, 4)
    assert lr.num_params == 8 * (d_in + d_out)
    assert bd.num_params == 8 * (d_out + d_in // 4)
    assert bs.num_params == min(d_in, d_out) * (d_in + d_out) // 4
    for layer in (lr, bd, bs):
        assert layer.num_params == sum(p.numel() for p in layer.parameters())
        assert layer.flops(7) == 7 * layer.num_params


def paper_ffn_params(kind: str, rank: int | None, blocks: int | None) -> int:
    """Transformer-xl FFN parameters: d 2048, ffn 8192, 24 layers, the first FFN dense, GELU
    (built on the meta device)."""
    d, f, L = 2048, 8192, 24
    dense = StructuredFFN(d, f, "dense", activation="gelu", device="meta").num_params
    ffn = StructuredFFN(d, f, kind, rank=rank, blocks=blocks, activation="gelu", device="meta")
    return dense + (L - 1) * ffn.num_params


TABLE1 = [  # (kind, rank, blocks, FFN params, training FLOPs) of the paper's Table 1
    ("dense", None, None, 805_306_368, 2.102e20),
    ("lowrank", 1024, None, 515_899_392, 1.660e20),
    ("blockshuffle", None, 2, 515_899_392, 1.660e20),
    ("blockdense", 1536, 4, 485_752_832, 1.614e20),
    ("lowrank", 512, None, 274_726_912, 1.291e20),
    ("blockshuffle", None, 4, 274_726_912, 1.291e20),
    ("blockdense", 768, 4, 259_653_632, 1.268e20),
]


@pytest.mark.parametrize("kind,rank,blocks,params,train_flops", TABLE1)
def test_paper_table1(kind: str, rank: int | None, blocks: int | None, params: int,
                      train_flops: float) -> None:
    ffn_params = paper_ffn_params(kind, rank, blocks)
    assert ffn_params == params
    # The reference's accounting: per token 2 FLOPs per MAC of attention projections, QK^T and
    # AV over the full 1024 context, the FFNs and the logits; training = 3 x forward.
    d, L, seq, vocab, tokens = 2048, 24, 1024, 32000, 25.5e9
    attn = L * (4 * d * d + 4 * d * d + 4 * seq * d)
    forward = attn + 2 * ffn_params + 2 * vocab * d
    assert round(3 * forward * tokens, -17) == pytest.approx(train_flops, rel=1e-12)


# ---- from_dense and inits -------------------------------------------------------------------


def test_from_dense_full_rank_is_exact() -> None:
    w = nn.Linear(12, 20, bias=True, dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    for layer in (LowRankLinear.from_dense(w, 12), BlockDenseLinear.from_dense(w, 12, 2),
                  BlockDenseLinear.from_dense(w, 12, 3)):
        assert layer.u.dtype == torch.float64
        torch.testing.assert_close(layer(x), w(x))


def test_from_dense_recovers_its_own_family() -> None:
    for layer in layers(24, 48) + layers(48, 24):
        kind = {LowRankLinear: "lowrank", BlockDenseLinear: "blockdense",
                BlockShuffleLinear: "blockshuffle"}[type(layer)]
        rank = getattr(layer, "rank", None) if kind != "blockshuffle" else None
        blocks = getattr(layer, "blocks", None) if kind != "lowrank" else None
        fit = linear_from_dense(kind, layer.to_dense().detach(), rank=rank, blocks=blocks)
        torch.testing.assert_close(fit.to_dense(), layer.to_dense().detach(), rtol=1e-9,
                                   atol=1e-9)


def test_low_rank_fit_is_truncated_svd() -> None:
    w = torch.randn(20, 12, dtype=torch.float64)
    fit = LowRankLinear.from_dense(w, 5)
    sv = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(fit.to_dense() - w)
    torch.testing.assert_close(err, sv[5:].norm())


def test_block_shuffle_fit_beats_perturbations() -> None:
    w = torch.randn(16, 24, dtype=torch.float64)
    fit = BlockShuffleLinear.from_dense(w, 4)
    best = torch.linalg.matrix_norm(fit.to_dense() - w)
    for _ in range(5):
        other = BlockShuffleLinear(24, 16, 4, dtype=torch.float64)
        with torch.no_grad():
            other.w1.copy_(fit.w1 + 1e-3 * torch.randn_like(fit.w1))
            other.w2.copy_(fit.w2 + 1e-3 * torch.randn_like(fit.w2))
        assert torch.linalg.matrix_norm(other.to_dense() - w) >= best


def test_svd_init() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(64, 96, 16, dtype=torch.float64)
    sv_u = torch.linalg.svdvals(layer.u)
    sv_v = torch.linalg.svdvals(layer.v)
    torch.testing.assert_close(sv_u, sv_v, rtol=1e-5, atol=1e-7)
    assert torch.linalg.matrix_rank(layer.to_dense()) == 16
    # The singular values of a 96 x 64 N(0, 0.02^2) matrix are about 0.02 * (sqrt(96) +- sqrt(64)).
    top = torch.linalg.svdvals(layer.to_dense())[0].item()
    assert 0.02 * 8 < top < 0.02 * 20


def test_ortho_init() -> None:
    for layer in (BlockDenseLinear(32, 48, 16, 4), BlockShuffleLinear(32, 48, 4),
                  BlockShuffleLinear(48, 32, 2)):
        for w in layer.factors():
            blocks = w if w.dim() == 3 else w[None]
            for q in blocks:
                gram = q @ q.T if q.shape[0] <= q.shape[1] else q.T @ q
                torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)


def test_normal_init_scale() -> None:
    torch.manual_seed(0)
    layer = BlockShuffleLinear(256, 256, 2, init="normal")
    assert abs(layer.w1.std().item() - 0.02) < 2e-3


# ---- bad configurations ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: LowRankLinear(8, 12, 0),
    lambda: LowRankLinear(8, 12, 9),
    lambda: BlockDenseLinear(8, 12, 6, 4),  # blocks do not divide the rank
    lambda: BlockDenseLinear(10, 12, 4, 4),  # nor in_features
    lambda: BlockDenseLinear(8, 12, 9, 1),
    lambda: BlockDenseLinear(8, 12, 0, 1),
    lambda: BlockShuffleLinear(8, 12, 3),
    lambda: BlockShuffleLinear(9, 12, 2),
    lambda: BlockShuffleLinear(8, 12, 0),
    lambda: LowRankLinear(8, 12, 4, init="xavier"),
    lambda: StructuredFFN(16, 32, "lowrank"),  # rank missing
    lambda: StructuredFFN(16, 32, "lowrank", rank=4, blocks=2),  # blocks unused
    lambda: StructuredFFN(16, 32, "sparse", rank=4),
    lambda: StructuredFFN(16, 32, "lowrank", rank=4, activation="relu"),
    lambda: StructuredFFN(16, 32, "blockshuffle", blocks=3),
])
def test_bad_configurations(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="in_features = 8"):
        LowRankLinear(8, 12, 4)(torch.randn(3, 9))
    with pytest.raises(TypeError, match="rank must be an int"):
        LowRankLinear(8, 12, 4.0)


# ---- FFN ------------------------------------------------------------------------------------

FFN_CASES = [("dense", None, None), ("lowrank", 8, None), ("blockdense", 8, 2),
             ("blockshuffle", None, 2), ("blockshuffle", None, 4)]


@pytest.mark.parametrize("kind,rank,blocks", FFN_CASES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_ffn_matches_dense_matrices(kind: str, rank, blocks, activation: str) -> None:
    d, f = 16, 24
    ffn = StructuredFFN(d, f, kind, rank=rank, blocks=blocks, activation=activation, bias=True,
                        dtype=torch.float64)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0, 0.3)

    def dense(fc):
        return fc.weight if isinstance(fc, nn.Linear) else fc.to_dense()

    x = torch.randn(2, 5, d, dtype=torch.float64)
    h = x @ dense(ffn.fc1).T + ffn.fc1.bias
    h = F.silu(h[..., :f]) * h[..., f:] if activation == "swiglu" else F.gelu(h, approximate="tanh")
    expected = h @ dense(ffn.fc2).T + ffn.fc2.bias
    torch.testing.assert_close(ffn(x), expected)
    with torch.no_grad():
        ffn.merge()
        torch.testing.assert_close(ffn(x[:1, :3]), expected[:1, :3])
    up = 2 * f if activation == "swiglu" else f
    assert ffn.num_params == sum(p.numel() for n, p in ffn.named_parameters() if "bias" not in n)
    if kind == "lowrank":
        assert ffn.num_params == rank * (d + up) + rank * (f + d)
    assert ffn.flops(3) == 3 * ffn.num_params


@pytest.mark.parametrize("kind,rank,blocks", [("lowrank", 8, None), ("blockdense", 8, 4)])
def test_ffn_fused_swiglu_matches_unfused_with_grads(kind: str, rank, blocks) -> None:
    ffn = StructuredFFN(16, 24, kind, rank=rank, blocks=blocks, dtype=torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    assert ffn._fused_up(x)
    y = ffn(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ffn.parameters()], gy)
    # The unfused path: fc1 as a plain layer, chunk, SwiGLU.
    g, u = ffn.fc1(x).chunk(2, dim=-1)
    y2 = ffn.fc2(F.silu(g) * u)
    torch.testing.assert_close(y, y2)
    for a, b in zip(grads, torch.autograd.grad(y2, [x, *ffn.parameters()], gy)):
        torch.testing.assert_close(a, b)


def test_ffn_from_dense_full_rank_exact() -> None:
    d, f = 12, 20
    gate_up = nn.Linear(d, 2 * f, bias=False, dtype=torch.float64)
    down = nn.Linear(f, d, bias=False, dtype=torch.float64)
    x = torch.randn(3, d, dtype=torch.float64)
    g, u = gate_up(x).chunk(2, -1)
    expected = down(F.silu(g) * u)
    ffn = StructuredFFN.from_dense(gate_up, down, "lowrank", rank=d)
    torch.testing.assert_close(ffn(x), expected)
    with pytest.raises(ValueError, match="fc1 must be"):
        StructuredFFN.from_dense(down, down, "lowrank", rank=4)


def test_make_linear_dense_init() -> None:
    torch.manual_seed(0)
    layer = make_linear("dense", 256, 256)
    assert isinstance(layer, nn.Linear) and abs(layer.weight.std().item() - 0.02) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("kind,rank,blocks", FFN_CASES[1:])
def test_ffn_decode_path_on_gpu(kind: str, rank, blocks) -> None:
    """On CUDA, T <= 16 without grad runs the decoding kernels (and the merged GEMV once
    merged); both match the prefill path row for row and capture in a CUDA graph."""
    ffn = StructuredFFN(64, 128, kind, rank=rank, blocks=blocks, device="cuda",
                        dtype=torch.bfloat16).eval()
    x = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        prefill = ffn(x).float()
        assert ffn.fc1.path(3, False, x.device) == "decode"
        for merged in (False, True):
            if merged:
                ffn.merge()
            for T in (1, 3, 8):
                got = ffn(x[:T]).float()
                err = ((got - prefill[:T]).norm() / prefill[:T].norm()).item()
                assert err < 3e-2, (merged, T, err)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = ffn(x[:1])
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(y).all()


def test_llama7b_gate_up_counts() -> None:
    """The parameter counts of the LLaMA-7B-shaped SwiGLU (d 4096, f 11008, r 1024)."""
    d, f = 4096, 11008
    dense = StructuredFFN(d, f, "dense", device="meta")
    fused = StructuredFFN(d, f, "lowrank", rank=1024, device="meta")
    separate = StructuredFFN(d, f, "lowrank", rank=1024, gate_up="separate", device="meta")
    assert dense.num_params == 135_266_304
    assert fused.num_params == 42_205_184  # 31.2%
    assert separate.num_params == 46_399_488  # 34.3%


@pytest.mark.parametrize("kind,rank,blocks", FFN_CASES)
def test_separate_gate_up(kind: str, rank, blocks) -> None:
    d, f = 16, 24
    gate_up = nn.Linear(d, 2 * f, bias=True, dtype=torch.float64)
    down = nn.Linear(f, d, bias=True, dtype=torch.float64)
    ffn = StructuredFFN.from_dense(gate_up, down, kind, rank, blocks, gate_up="separate")
    assert ffn.fc1.out_features == f and ffn.up.out_features == f
    x = torch.randn(3, d, dtype=torch.float64)

    def dense(fc):
        return fc.weight if isinstance(fc, nn.Linear) else fc.to_dense()

    gate = x @ dense(ffn.fc1).T + ffn.fc1.bias
    up = x @ dense(ffn.up).T + ffn.up.bias
    torch.testing.assert_close(ffn(x), (F.silu(gate) * up) @ dense(ffn.fc2).T + ffn.fc2.bias)
    torch.testing.assert_close(ffn.up.bias, gate_up.bias[f:])
    with torch.no_grad():
        ffn.merge()
        torch.testing.assert_close(ffn(x), (F.silu(gate) * up) @ dense(ffn.fc2).T + ffn.fc2.bias)
    if kind == "lowrank":
        exact = StructuredFFN.from_dense(gate_up, down, kind, rank=d, gate_up="separate")
        g, u = gate_up(x).chunk(2, -1)
        torch.testing.assert_close(exact(x), down(F.silu(g) * u))
    with pytest.raises(ValueError, match="gate_up"):
        StructuredFFN(d, f, "dense", gate_up="split")
    with pytest.raises(ValueError, match="needs activation"):
        StructuredFFN(d, f, "dense", activation="gelu", gate_up="separate")


def test_ffn_compiles_in_one_graph() -> None:
    """torch.compile traces the structured FFNs (the custom ops and their register_autograd)
    without graph breaks, forward and backward."""
    for kind, kwargs in (("lowrank", dict(rank=8)), ("blockshuffle", dict(blocks=2))):
        ffn = StructuredFFN(16, 32, kind, **kwargs)
        x = torch.randn(4, 16, requires_grad=True)
        compiled = torch.compile(ffn, backend="aot_eager", fullgraph=True)
        y = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, ffn(x))
        assert x.grad is not None


@pytest.mark.parametrize("kind,rank,blocks", FFN_CASES)
def test_ffn_under_autocast(kind: str, rank, blocks) -> None:
    """fp32 weights under bf16 autocast: the custom ops get bf16 operands, like F.linear."""
    ffn = StructuredFFN(16, 32, kind, rank=rank, blocks=blocks)
    x = torch.randn(5, 16, requires_grad=True)
    want = ffn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
        with torch.no_grad():
            ffn.merge()
            y_merged = ffn(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for got in (y, y_merged):
        assert ((got.float() - want).norm() / want.norm()).item() < 3e-2
