"""tree_attention: the torch reference against a per-query loop, the Triton kernel against the
reference (dtypes, head dims, GQA/MQA, T=1 and odd T, per-row prefixes, empty prefixes, chain and
bushy trees, split-KV, strided inputs, sliding windows and soft-capping), queries that see
nothing, and bad inputs.

Under TRITON_INTERPRET=1 the kernel runs on CPU tensors with small shapes; D=128/256 and larger
shapes run only on a GPU (mark ``gpu``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICES, HAS_CUDA

import fastdecode
from fastdecode import _backend
from fastdecode.ops import pack_tree_mask, tree_attention, tree_mask
from fastdecode.ops.attention import tree_attention_reference

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]


def need_triton(device: str) -> None:
    """Skips unless the triton backend runs on ``device`` here (CPU needs TRITON_INTERPRET=1)."""
    reason = _backend._why_not("triton", device)
    if reason is not None:
        pytest.skip(f"triton backend: {reason}")


# ---- inputs ---------------------------------------------------------------------------------


def parents_of(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Draft trees: ``chain`` (node j's parent is j-1) or ``bushy`` (a random earlier node)."""
    j = torch.arange(T)
    if kind == "chain":
        parents = (j - 1).expand(B, T).clone()
    else:
        parents = (torch.rand(B, T, generator=gen) * j).long()
    parents[:, 0] = -1
    return parents


@dataclass
class Case:
    """One call's shapes: ``prefix[b] = (kv_start, kv_len)``; the tree starts at ``seg_start``
    (default: the longest prefix) and S leaves ``pad`` rows after it."""

    B: int = 1
    Hq: int = 2
    Hkv: int = 1
    T: int = 5
    D: int = 16
    dtype: torch.dtype = torch.float32
    prefix: tuple = ((0, 7),)
    kind: str = "bushy"
    seg_start: int | None = None
    pad: int = 3
    splits: int | None = None  # force split-KV in the launcher
    window: int | None = None
    softcap: float | None = None

    def inputs(self, device: str, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        seg = self.seg_start if self.seg_start is not None else max(e for _, e in self.prefix)
        S = seg + self.T + self.pad

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(self.dtype).to(device)

        mask = pack_tree_mask(tree_mask(parents_of(self.kind, self.B, self.T, gen)))
        return dict(q=randn(self.B, self.Hq, self.T, self.D), k=randn(self.B, self.Hkv, S, self.D),
                    v=randn(self.B, self.Hkv, S, self.D),
                    kv_start=torch.tensor([s for s, _ in self.prefix], device=device),
                    kv_len=torch.tensor([e for _, e in self.prefix], device=device),
                    seg_start=seg, mask=mask.to(device), window=self.window,
                    softcap=self.softcap)


def reference(a: dict, scale: float | None = None) -> torch.Tensor:
    with fastdecode.use_backend("torch"):
        return tree_attention(**a, scale=scale)


def triton_out(a: dict, splits: int | None = None, scale: float | None = None) -> torch.Tensor:
    """The kernel through the public op, or straight through the launcher to force a number
    of prefix slices."""
    if splits is None:
        with fastdecode.use_backend("triton"):
            return tree_attention(**a, scale=scale)
    from fastdecode.triton_kernels.tree.attention import tree_attention_triton

    D = a["q"].shape[-1]
    return tree_attention_triton(a["q"], a["k"], a["v"], a["kv_start"], a["kv_len"],
                                 a["seg_start"], a["mask"], scale or 1 / math.sqrt(D),
                                 a["window"] or 0, a["softcap"] or 0.0, splits)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous()
    tol = TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


# ---- the reference against an independent per-query computation ------------------------------


def loop_attention(q, k, v, kv_start, kv_len, seg_start, dense_mask, scale, window=None,
                   softcap=None):
    """Per (row, head, query): gather the visible keys (by position, within ``window``),
    soft-cap the scores, torch.softmax, weighted sum. Prefix key n sits at position
    ``n - kv_start``, tree node t at ``kv_len - kv_start + depth(t)``."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, T, Hq, D)
    for b in range(B):
        start, end = int(kv_start[b]), int(kv_len[b])
        depth = [sum(dense_mask[b][t]) - 1 for t in range(T)]
        for h in range(Hq):
            for i in range(T):
                here = end - start + depth[i]
                keys = [(n, n - start) for n in range(start, end)]
                keys += [(seg_start + t, end - start + depth[t]) for t in range(T)
                         if dense_mask[b][i][t]]
                keys = [n for n, pos in keys if window is None or here - pos < window]
                if not keys:
                    continue
                kk, vv = k[b, h // G, keys].double(), v[b, h // G, keys].double()
                x = kk @ q[b, h, i].double() * scale
                if softcap is not None:
                    x = softcap * torch.tanh(x / softcap)
                w = torch.softmax(x, dim=0)
                out[b, i, h] = (w @ vv).float()
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (1, None), (3, None), (8, None),
                                            (None, 2.0), (4, 0.7)])
def test_reference_matches_a_per_query_loop(window, softcap):
    B, Hq, Hkv, T, D, S = 3, 4, 2, 6, 16, 20
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((B, Hq, T, D), (B, Hkv, S, D),
                                                        (B, Hkv, S, D)))
    dense = tree_mask(parents_of("bushy", B, T, gen))
    dense[1, 2] = False  # row 1 has an empty prefix too: query 2 there sees nothing
    kv_start, kv_len = torch.tensor([0, 4, 2]), torch.tensor([9, 4, 11])
    want = loop_attention(q, k, v, kv_start, kv_len, 12, dense.tolist(), 0.3, window, softcap)
    with fastdecode.use_backend("torch"):
        got = tree_attention(q, k, v, kv_start, kv_len, 12, pack_tree_mask(dense), scale=0.3,
                             window=window, softcap=softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[1, 2] == 0)


# ---- the kernel against the reference ---------------------------------------------------------

SMALL = {
    "T1-fp32": Case(T=1, prefix=((0, 9),)),
    "T37-chain-fp32": Case(T=37, kind="chain", prefix=((2, 20),)),
    "T37-bushy-gqa-B3-fp32": Case(B=3, Hq=4, Hkv=2, T=37, prefix=((0, 19), (5, 5), (3, 11))),
    "D64-gqa-B3-fp16": Case(B=3, Hq=4, Hkv=2, T=9, D=64, dtype=torch.float16,
                            prefix=((4, 30), (0, 0), (1, 17))),
    "D80-mqa-B3-fp16": Case(B=3, Hq=4, Hkv=1, T=5, D=80, dtype=torch.float16,
                            prefix=((0, 12), (7, 12), (12, 12))),
    "D64-chain-bf16": Case(Hq=2, Hkv=2, T=20, D=64, dtype=torch.bfloat16, kind="chain",
                           prefix=((0, 40),)),
    "empty-prefix-bf16": Case(B=2, T=7, dtype=torch.bfloat16, prefix=((0, 0), (6, 6)), seg_start=6),
    "split3-gqa-B3-fp32": Case(B=3, Hq=4, Hkv=2, T=6, prefix=((0, 70), (10, 11), (33, 33)),
                               splits=3),
    "split2-fp16": Case(T=33, D=64, dtype=torch.float16, prefix=((3, 50),), splits=2),
    "split4-mqa-bf16": Case(B=2, Hq=3, Hkv=1, T=3, D=80, dtype=torch.bfloat16,
                            prefix=((0, 64), (1, 2)), splits=4),
    "window1-T5-fp32": Case(T=5, window=1),
    "window6-T37-bushy-gqa-B3-fp32": Case(B=3, Hq=4, Hkv=2, T=37, window=6,
                                         prefix=((0, 19), (5, 5), (3, 11))),
    "window9-chain-fp16": Case(T=20, D=64, dtype=torch.float16, kind="chain", window=9,
                               prefix=((2, 90),)),
    "window70-B2-bf16": Case(B=2, T=7, dtype=torch.bfloat16, window=70, prefix=((0, 100), (9, 40))),
    "softcap-gqa-B3-bf16": Case(B=3, Hq=4, Hkv=2, T=9, D=64, dtype=torch.bfloat16, softcap=1.5,
                                prefix=((4, 30), (0, 0), (1, 17))),
    "window-softcap-split3-fp32": Case(B=3, Hq=4, Hkv=2, T=6, window=23, softcap=0.9,
                                       prefix=((0, 70), (10, 11), (33, 33)), splits=3),
}

LARGE = {  # the split heuristic engages by itself here: few programs, long prefixes
    "D128-gqa-fp16": Case(B=2, Hq=8, Hkv=2, T=64, D=128, dtype=torch.float16,
                          prefix=((0, 1500), (37, 800)), pad=100),
    "D128-llama-bf16": Case(B=1, Hq=32, Hkv=32, T=16, D=128, dtype=torch.bfloat16,
                            prefix=((5, 1200),)),
    "D256-T256-fp16": Case(B=2, Hq=4, Hkv=4, T=256, D=256, dtype=torch.float16,
                           prefix=((0, 300), (100, 333))),
    "D256-mqa-bf16": Case(B=3, Hq=8, Hkv=1, T=37, D=256, dtype=torch.bfloat16,
                          prefix=((0, 600), (0, 0), (200, 700))),
    "D128-fp32": Case(B=2, Hq=4, Hkv=2, T=40, D=128, prefix=((0, 513), (2, 90))),
    "D96-T2048-fp16": Case(B=1, Hq=2, Hkv=1, T=2048, D=96, dtype=torch.float16,
                           prefix=((0, 100),)),
    "D256-window-softcap-bf16": Case(B=2, Hq=8, Hkv=4, T=64, D=256, dtype=torch.bfloat16,
                                     window=512, softcap=50.0, prefix=((0, 1500), (37, 800))),
    "D128-window40-T100-fp16": Case(B=2, Hq=4, Hkv=1, T=100, D=128, dtype=torch.float16,
                                    kind="chain", window=40, prefix=((0, 1300), (3, 300))),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SMALL))
def test_triton_matches_reference(device, name):
    need_triton(device)
    case = SMALL[name]
    a = case.inputs(device)
    assert_close(triton_out(a, case.splits), reference(a))


@pytest.mark.parametrize("name", [pytest.param(n, marks=GPU_ONLY) for n in LARGE])
def test_triton_matches_reference_gpu(name):
    case = LARGE[name]
    a = case.inputs("cuda")
    assert_close(triton_out(a, case.splits), reference(a))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_scale(device):
    """q as the transposed view of a [B, T, H, D] buffer, q with a non-unit last stride
    (copied), and k/v as views of [B, S, H, D] caches; an explicit scale."""
    need_triton(device)
    a = Case(B=2, Hq=4, Hkv=2, T=6, D=16, prefix=((0, 8), (3, 9))).inputs(device)
    want = reference(a, scale=0.7)
    views = [
        dict(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
        dict(q=a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)),
        dict(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2),
             v=a["v"].transpose(1, 2).contiguous().transpose(1, 2)),
    ]
    for view in views:
        assert not next(iter(view.values())).is_contiguous()
        assert_close(triton_out({**a, **view}, scale=0.7), want)
        assert_close(reference({**a, **view}, scale=0.7), want)


@pytest.mark.parametrize("device", DEVICES)
def test_query_that_sees_nothing_gets_zeros(device):
    """Row 0: empty prefix and query 1's mask row cleared; row 1: nothing visible at all."""
    need_triton(device)
    a = Case(B=2, Hq=2, Hkv=1, T=3, prefix=((4, 4), (0, 0)), seg_start=4).inputs(device)
    a["mask"][0, 1] = 0
    a["mask"][1] = 0
    for out in (reference(a), triton_out(a), triton_out(a, splits=2)):
        assert torch.all(out[0, 1] == 0) and torch.all(out[1] == 0)
        assert torch.all(out[0, 0] != 0) and not out.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_prefix_is_clamped_alike(device):
    """With validate=False a prefix past seg_start or a negative start is clamped into
    [0, seg_start) by every backend."""
    need_triton(device)
    a = Case(B=2, T=4, prefix=((-3, 6), (2, 11)), seg_start=8).inputs(device)
    with fastdecode.use_backend("torch"):
        want = tree_attention(**a, validate=False)
    with fastdecode.use_backend("triton"):
        got = tree_attention(**a, validate=False)
    assert_close(got, want)
    clamped = {**a, "kv_start": a["kv_start"].clamp(min=0), "kv_len": a["kv_len"].clamp(max=8)}
    assert_close(want, reference(clamped))


def test_split_heuristic(monkeypatch):
    from fastdecode.triton_kernels.tree import attention as kernels

    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # B=1, Hkv=8, T=64, G=4: 4 row blocks of 64, 32 programs; prefix up to 4096 keys.
    assert kernels.choose_splits(32, 4096, cuda) == 8
    assert kernels.choose_splits(32, 600, cuda) == 2  # slices keep >= 256 keys
    assert kernels.choose_splits(32, 200, cuda) == 1
    assert kernels.choose_splits(256, 4096, cuda) == 1  # B=8 fills the GPU
    assert kernels.choose_splits(1, 1 << 20, cuda) == kernels.MAX_SPLITS
    assert kernels.choose_splits(1, 4096, torch.device("cpu")) == 1


def test_default_backends():
    assert _backend.select("tree_attention", torch.device("cpu"))[0] == "torch"
    if _backend._why_not("triton", "cuda") is None:
        assert _backend.select("tree_attention", torch.device("cuda"))[0] == "triton"


def test_fake_tensors_give_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 5, 8, 64, dtype=torch.float16).transpose(1, 2)
        k = torch.empty(2, 2, 30, 64, dtype=torch.float16)
        ints = torch.empty(2, dtype=torch.int64)
        out = tree_attention(q, k, k, ints, ints, 20, torch.empty(2, 5, 1, dtype=torch.int32),
                             validate=False)
        assert out.shape == (2, 5, 8, 64) and out.dtype == torch.float16


# ---- bad inputs -------------------------------------------------------------------------------


def bad(**change):
    a = Case(B=2, Hq=4, Hkv=2, T=3, prefix=((0, 5), (1, 4))).inputs("cpu")
    for key, f in change.items():
        a[key] = f(a[key]) if callable(f) else f
    return a


BAD = [
    (bad(q=lambda q: q.half()), TypeError,
     r"k must have dtype torch.float16, found torch.float32"),
    (bad(q=lambda q: q.double()), TypeError,
     r"q must have dtype float16, bfloat16 or float32, found torch.float64"),
    (bad(q=lambda q: q[0]), ValueError,
     r"q must have 4 dims \[B, Hq, T, D\], found shape \(4, 3, 16\)"),
    (bad(q=lambda q: q[:, :3]), ValueError,
     r"q's heads Hq=3 must be a multiple of k's heads Hkv=2"),
    (bad(v=lambda v: v[:, :1]), ValueError,
     r"v must have shape \[B, Hkv, S, D\] = \(2, 2, 11, 16\), found \(2, 1, 11, 16\)"),
    (bad(k=lambda k: k[..., :8], v=lambda v: v[..., :8]), ValueError,
     r"k must have shape .* = \(2, 2, 11, 16\), found \(2, 2, 11, 8\)"),
    (bad(q=lambda q: q[..., :8], k=lambda k: k[..., :8], v=lambda v: v[..., :8]), ValueError,
     r"head dim D must be a multiple of 16 in \[16, 256\]"),
    (bad(k=lambda k: k.transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError,
     r"k must have stride 1 on its last dim D"),
    (bad(kv_start=lambda x: x.int()), TypeError,
     r"kv_start must have dtype torch.int64, found torch.int32"),
    (bad(kv_len=lambda x: x[:1]), ValueError,
     r"kv_len must have shape \[B\] = \(2,\), found \(1,\)"),
    (bad(mask=lambda m: m[:, :2]), ValueError,
     r"mask must have shape \[B, T, ceil\(T/32\)\] = \(2, 3, 1\), found \(2, 2, 1\)"),
    (bad(mask=lambda m: m.long()), TypeError,
     r"mask must have dtype torch.int32, found torch.int64"),
    (bad(seg_start=9), ValueError, r"seg_start must be in \[0, 8\], found 9"),
    (bad(seg_start=5.0), TypeError, r"seg_start must be an int, found float"),
    (bad(kv_len=lambda x: torch.tensor([6, 4])), ValueError,
     r"kv_len must be <= seg_start=5 .* found \[6, 4\]"),
    (bad(kv_start=lambda x: torch.tensor([0, 5])), ValueError,
     r"kv_len must be >= kv_start in every row"),
    (bad(kv_start=lambda x: torch.tensor([-1, 0])), ValueError,
     r"kv_start must be >= 0, found \[-1, 0\]"),
    (bad(q="q"), TypeError, r"q must be a torch.Tensor, found str"),
    (bad(window=0), ValueError, r"window must be >= 1 \(positions a query sees\), found 0"),
    (bad(window=2.0), TypeError, r"window must be an int or None, found float"),
    (bad(softcap=0.0), ValueError, r"softcap must be a finite float > 0, found 0.0"),
    (bad(softcap=-1), ValueError, r"softcap must be a finite float > 0, found -1"),
    (bad(softcap=math.inf), ValueError, r"softcap must be a finite float > 0, found inf"),
    (bad(softcap="50"), TypeError, r"softcap must be a float or None, found str"),
]


@pytest.mark.parametrize("args,error,match", BAD)
def test_bad_inputs_raise_clearly(args, error, match):
    with pytest.raises(error, match=match):
        tree_attention(**args)


def test_bad_scale_and_devices():
    a = bad()
    with pytest.raises(TypeError, match="scale must be a float or None, found str"):
        tree_attention(**a, scale="0.1")
    with pytest.raises(ValueError, match="scale must be finite, found inf"):
        tree_attention(**a, scale=math.inf)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="mask is on cuda:0 but q is on cpu"):
            tree_attention(**{**a, "mask": a["mask"].cuda()})
