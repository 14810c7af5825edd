"""CASTLE decoding step: one new token per (batch row, head) updates every lookahead key of the
UQ-KV cache and attends over the cache, in one pass. The op, its contract and its plain-torch
reference live in :mod:`fastdecode.ops.castle`.

Layout. The caches ``U`` (state dtype), ``KC``, ``VC`` are ``[B, H, capacity, D]`` with one set
of strides and unit stride on D; rows ``[0, t0]`` are filled, row t0 being the new token (its U
row zero). ``QU`` ``[B, H, qu_capacity, D]`` (its own strides, unit stride on D) holds the
lookahead query of token ``qu_base + i`` in row i, at least for the tokens the new one writes
into. ``QC``, ``KU``, ``VU`` are the new token's vectors, contiguous ``[B, H, 1, D]``.

One program owns one (batch row, head) and a slice of the cache rows. For each tile of rows s
it loads Q^U_s and U_s, adds ``sigmoid(c q^U_s . k^U) v^U`` to the rows that the new token
writes into (``s < t0``, and ``s >= t0 - W`` with a window W; only those are stored back),
then scores ``c q^C . k^C_s - SiLU(c q^C . U_s)`` with the updated U and folds the tile into an
online softmax (base-2, state dtype). With several slices (split-KV, for grids smaller than
the GPU), each program writes its partial state and a second kernel merges the slices.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from fastdecode.triton_kernels.castle.parallel import sigmoid

LOG2E = tl.constexpr(1.4426950408889634)  # kernels read only constexpr globals
MIN_SPLIT_ROWS = 256
"""Split-KV gives every slice at least this many cache rows."""
MAX_SPLITS = 32


@triton.jit(do_not_specialize=["t0", "qu_base"])  # they move every step: no recompiles
def _castle_decode_kernel(
    U, QU, KC, VC, QC, KU, VU, OUT, M_PART, L_PART,
    BH, D, t0, qu_base, window, scale, num_splits,
    stride_b, stride_h, stride_s, qu_stride_b, qu_stride_h, qu_stride_s, H,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
):
    """Grid ``(B * H, num_splits)``. Without SPLIT, writes ``OUT[bh, :]`` (the inputs' dtype);
    with SPLIT, ``OUT`` is ``[num_splits, B * H, D]`` and gets the unnormalised accumulator,
    ``M_PART`` / ``L_PART`` ``[num_splits, B * H]`` the running max (base 2) and sum."""
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    sd = U.dtype.element_ty
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    vec = bh * D + offs_d
    qc = tl.load(QC + vec, mask=d_ok, other=0.0).to(sd)
    ku = tl.load(KU + vec, mask=d_ok, other=0.0).to(sd)
    vu = tl.load(VU + vec, mask=d_ok, other=0.0).to(sd)
    cache = b * stride_b + h * stride_h
    qu_rows = QU + b * qu_stride_b + h * qu_stride_h

    n = t0 + 1
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n)
    first = tl.where(window < 0, 0, t0 - window)  # rows the new token writes into: [first, t0)
    m_i = tl.full([1], float("-inf"), dtype=sd)
    l_i = tl.zeros([1], dtype=sd)
    acc = tl.zeros([BLOCK_D], dtype=sd)
    for start in range(lo, hi, BLOCK_N):
        s = start + offs_n
        s_ok = s < hi
        upd = s_ok & (s < t0) & (s >= first)
        tile = cache + s[:, None] * stride_s + offs_d[None, :]
        m2 = s_ok[:, None] & d_ok[None, :]
        qu = tl.load(qu_rows + (s - qu_base)[:, None] * qu_stride_s + offs_d[None, :],
                     mask=upd[:, None] & d_ok[None, :], other=0.0).to(sd)
        w = sigmoid(tl.sum(qu * ku[None, :], 1) * scale)
        u = tl.load(U + tile, mask=m2, other=0.0)
        u += tl.where(upd, w, 0.0)[:, None] * vu[None, :]
        tl.store(U + tile, u, mask=upd[:, None] & d_ok[None, :])
        kc = tl.load(KC + tile, mask=m2, other=0.0).to(sd)
        su = tl.sum(u * qc[None, :], 1) * scale
        z = tl.sum(kc * qc[None, :], 1) * scale - su * sigmoid(su)
        z = tl.where(s_ok, z * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new)
        vc = tl.load(VC + tile, mask=m2, other=0.0).to(sd)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vc, 0)
        m_i = m_new
    if SPLIT:
        part = split * BH + bh
        tl.store(OUT + part * D + offs_d, acc, mask=d_ok)
        tl.store(M_PART + part + tl.arange(0, 1), m_i)
        tl.store(L_PART + part + tl.arange(0, 1), l_i)
    else:
        tl.store(OUT + vec, (acc / l_i).to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit
def _merge_kernel(ACC, M_PART, L_PART, OUT, BH, D, num_splits,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(B * H,)``: combines the partial states of one (batch row, head) into
    ``OUT[bh, :]``. A slice that saw no row has ``m = -inf`` and ``l = 0``."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < D
    part = offs_s.to(tl.int64) * BH + bh
    m = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    total = tl.sum(l * w, 0)
    acc = tl.load(ACC + part[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(OUT + bh * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles(D: int) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)`` for head dim D: four [BLOCK_N, D] tiles live at once, so 32
    cache rows past D = 64 (ahead-of-time sm_90 builds then spill nothing)."""
    return (64, 4) if D <= 64 else (32, 8)


def choose_splits(programs: int, rows: int, device: torch.device) -> int:
    """Cache slices per (batch row, head): 1 unless the ``programs`` fill less than one wave of
    the GPU; then enough for about two waves with at least ``MIN_SPLIT_ROWS`` of the ``rows``
    cache rows each."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(2 * sms // programs, rows // MIN_SPLIT_ROWS, MAX_SPLITS))


def castle_decode_triton(u, qu_cache, qu_base: int, kc_cache, vc_cache, t0: int, qc, ku, vu,
                         window: int, scale: float, num_splits: int | None = None
                         ) -> torch.Tensor:
    """Launches the decoding step on validated arguments (see the module docstring); updates
    ``u`` in place and returns the new token's output ``[B, H, 1, D]`` in qc's dtype.
    ``num_splits``: cache slices (split-KV), default :func:`choose_splits`' choice."""
    B, H, _, D = qc.shape
    qc, ku, vu = qc.contiguous(), ku.contiguous(), vu.contiguous()
    out = torch.empty_like(qc)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(D)
    block_n, num_warps = tiles(D)
    if num_splits is None:
        num_splits = choose_splits(B * H, t0 + 1, qc.device)
    split = num_splits > 1
    if split:
        acc = torch.empty(num_splits, B * H, D, dtype=u.dtype, device=qc.device)
        m_part = torch.empty(num_splits, B * H, dtype=u.dtype, device=qc.device)
        l_part = torch.empty_like(m_part)
    else:
        acc, m_part, l_part = out, out, out  # the partial-state pointers go unused
    strides = u.stride()
    if any(x.stride() != strides for x in (kc_cache, vc_cache)):
        raise ValueError("the caches U, K^C and V^C must share their strides")
    with torch.cuda.device(qc.device) if qc.is_cuda else contextlib.nullcontext():
        _castle_decode_kernel[(B * H, num_splits)](
            u, qu_cache, kc_cache, vc_cache, qc, ku, vu, acc, m_part, l_part,
            B * H, D, t0, qu_base, window, scale, num_splits,
            strides[0], strides[1], strides[2], *qu_cache.stride()[:3], H,
            BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split, num_warps=num_warps,
        )
        if split:
            _merge_kernel[(B * H,)](acc, m_part, l_part, out, B * H, D, num_splits,
                                    BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
                                    num_warps=4)
    return out
