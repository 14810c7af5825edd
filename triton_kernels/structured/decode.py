"""Decoding kernels (1 to 16 tokens) of the structured linear layers and of a merged dense
weight. The ops and their plain-torch references live in :mod:`fastdecode.ops.structured`.

At decode time the weights are the whole cost (bytes read ~ 2 x parameters in bf16), so the
work is split over weight ROWS, never over tokens: a program owns BLOCK_N rows of one block's
weight (and, with split-K, one slice of their columns) and applies them to every token, so
each weight element is read once. All products are one kernel, :func:`_gemv_kernel`, a
block-diagonal GEMV whose input gather and output scatter are affine maps of (block, element);
that covers the dense weight (one block), both stages of LowRank and BlockDense, and both
BlockShuffle stages with the shuffle and the output interleave folded into the addressing.
A structured layer is two launches; the intermediate (r or b*m values per token) stays in an
fp32 buffer small enough to live in L2. Triton has no grid-wide barrier, so the stage-1 to
stage-2 dependency is the launch boundary (capture both in a CUDA graph to hide launches).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .block_shuffle import _on

BLOCK_K = 128
"""Columns per load: 256 contiguous bytes of a bf16 weight row."""
TILE = 4096
"""Elements of the [BLOCK_T, BLOCK_N, BLOCK_K] product a program holds per step."""


@triton.jit
def _gemv_kernel(A, W, C, T, N, K, k_per_split,
                 sat, sag, sak, swg, swn, sct, scg, scn,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ATOMIC: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N), G, splits)``:
    ``C[t*sct + g*scg + n*scn] (+)= sum_k A[t*sat + g*sag + k*sak] * W[g*swg + n*swn + k]``
    over this program's columns ``[split*k_per_split, (split+1)*k_per_split)``; fp32 math;
    ATOMIC adds into an fp32 C (split-K), else stores in C's dtype."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rt = tl.arange(0, BLOCK_T).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    t_ok = rt < T
    n_ok = rn < N
    a_base = A + g * sag + rt[:, None] * sat
    w_base = W + g * swg + rn[:, None] * swn
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        k_ok = k < k_hi
        a = tl.load(a_base + k[None, :] * sak, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    c_ptrs = C + g * scg + rt[:, None] * sct + rn[None, :] * scn
    c_mask = t_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(T: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_N)`` for T tokens: every token in one tile (at least 2 rows, so that
    no tile has a unit dim), and as many weight rows as keep the product tile at TILE."""
    block_t = max(2, triton.next_power_of_2(T))
    return block_t, max(2, TILE // (block_t * BLOCK_K))


def choose_splits(programs: int, K: int, device: torch.device) -> int:
    """Column slices per row block: 1 on the CPU or when the grid of ``programs`` fills two
    waves of the GPU's multiprocessors, else enough for about four waves, each slice keeping
    at least two BLOCK_K steps."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, programs), K // (2 * BLOCK_K)))


def gemv(a: torch.Tensor, a_strides: tuple[int, int, int], w: torch.Tensor,
         w_strides: tuple[int, int], c: torch.Tensor, c_strides: tuple[int, int, int],
         T: int, N: int, K: int, G: int, splits: int | None = None) -> None:
    """``C[t, g, n] = sum_k A[t, g, k] W[g, n, k]`` through the element strides
    ``a_strides = (sat, sag, sak)``, ``w_strides = (swg, swn)`` (unit stride along k) and
    ``c_strides = (sct, scg, scn)``. With ``splits > 1`` (default :func:`choose_splits`), c
    must be fp32 and zero: the column slices are added atomically."""
    block_t, block_n = _blocks(T)
    row_blocks = triton.cdiv(N, block_n)
    if splits is None:
        splits = choose_splits(row_blocks * G, K, a.device) if c.dtype == torch.float32 else 1
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, k_per_split)
    with _on(a.device):
        _gemv_kernel[(row_blocks, G, splits)](
            a, w, c, T, N, K, k_per_split, *a_strides, *w_strides, *c_strides,
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=BLOCK_K, ATOMIC=splits > 1,
            num_warps=4, num_stages=3)


def dense_decode_triton(x: torch.Tensor, w: torch.Tensor, splits: int | None = None
                        ) -> torch.Tensor:
    """``x @ w.T`` for contiguous ``x [T, K]`` and ``w [N, K]``: ``[T, N]`` in x's dtype."""
    T, K = x.shape
    N = w.shape[0]
    if splits is None:
        splits = choose_splits(triton.cdiv(N, _blocks(T)[1]), K, x.device)
    if splits == 1:
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
        gemv(x, (K, 0, 1), w, (0, K), out, (N, 0, 1), T, N, K, 1, splits=1)
        return out
    acc = torch.zeros(T, N, dtype=torch.float32, device=x.device)
    gemv(x, (K, 0, 1), w, (0, K), acc, (N, 0, 1), T, N, K, 1, splits=splits)
    return acc.to(x.dtype)


def block_dense_decode_triton(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                              splits: int | None = None) -> torch.Tensor:
    """``u (BD(v) x)`` for contiguous ``x [T, b*p]``, ``v [b, rb, p]``, ``u [N, b*rb]``: stage 1
    into a zeroed fp32 ``[T, r]`` (split-K atomics when the grid is small), stage 2 straight
    into the ``[T, N]`` output (x's dtype)."""
    T = x.shape[0]
    b, rb, p = v.shape
    r, N = b * rb, u.shape[0]
    t = torch.zeros(T, r, dtype=torch.float32, device=x.device)
    gemv(x, (b * p, p, 1), v, (rb * p, p), t, (r, rb, 1), T, rb, p, b, splits=splits)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    gemv(t, (r, 0, 1), u, (0, r), out, (N, 0, 1), T, N, r, 1, splits=1)
    return out


def block_shuffle_decode_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                                splits: int | None = None) -> torch.Tensor:
    """The BlockShuffle product for contiguous ``x [T, b*p]``, ``w1 [b, m, p]``,
    ``w2 [b, s, m]``: stage 1 into a zeroed fp32 ``h [T, b*m]``, stage 2 block j reading
    ``h[t, i*b + j]`` and writing ``y[t, o*b + j]`` (x's dtype)."""
    T = x.shape[0]
    b, m, p = w1.shape
    s = w2.shape[1]
    h = torch.zeros(T, b * m, dtype=torch.float32, device=x.device)
    gemv(x, (b * p, p, 1), w1, (m * p, p), h, (b * m, m, 1), T, m, p, b, splits=splits)
    y = torch.empty(T, b * s, dtype=x.dtype, device=x.device)
    gemv(h, (b * m, 1, b), w2, (s * m, m), y, (b * s, 1, b), T, s, m, b, splits=1)
    return y
