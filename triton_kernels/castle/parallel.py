"""CASTLE attention, parallel (training) form: the blocked forward and the column-sweep backward.
The op, its contract and its plain-torch reference live in :mod:`fastdecode.ops.castle`.

Notation (per batch row and head): tokens are cut into blocks T_0 .. T_{N-1} of BLOCK rows;
``G[s, r] = sigmoid(c q^U_s . k^U_r)`` where the lookahead mask allows it (``s < r``, and
``r <= s + W`` with a window), ``A[t, r] = c q^C_t . v^U_r`` for ``r <= t``, and the lookahead
score is ``S^U[t, s] = sum_r A[t, r] G[s, r]``. ``D_j`` is the running sum ``sum_r G[T_j, r]
v^U_r`` over the blocks r that precede the current row block: the lookahead keys of block j
as of that row block.

Forward (the paper's wavefront). Launch k (k = 0 .. N-1) runs one program per pair
``(i = j + k, j)``: the program loads ``D_j`` (written by launch k-1), forms
``S^U_ij = c Q^C_i D_j^T + A_ii G_ji^T``, folds the score block ``c Q^C_i K^C_j^T - SiLU(S^U_ij)``
into row block i's online-softmax state (fp32 in memory between launches) and stores
``D_j + G_ji V^U_i`` for launch k+1. Every launch touches each row block and each column once,
so nothing races. Row block i is final after launch i (its pair with j = 0), which writes the
output and the log-sum-exp. After the last launch D holds the final lookahead keys ``U^L``,
which the backward starts from and a prefill stores in the cache. Extra memory: D, the output
accumulator and two row statistics, O(L D).

Backward (column sweep). One program per key block j walks the row blocks i = N-1 down to j,
starting from ``D = U^L_j`` and peeling ``G_ji V^U_i`` off before each row block. It keeps the
gradients of block j's own inputs (K^C, V^C, Q^U) and ``dD``, the gradient flowing into D from
the rows below, in registers; the gradients of the row block's inputs (Q^C, V^U, K^U) go out
with fp32 atomics (so the result is not bitwise deterministic).

Sliding-window lookahead (window W): a pair whose row block starts more than W rows past key
block j's last row has ``G_ji = 0``, so D_j is final there; both kernels then skip the
lookahead work (the G and A blocks, the D update and their gradients) and such a block costs
about what two-key attention does (``c Q^C_i K^C_j^T`` and ``c Q^C_i D_j^T``).

All state and accumulation is fp32 (fp64 for fp64 inputs). On a GPU the dot operands are the
inputs' dtype (fp32 inputs: tf32x3); under the interpreter they are the state dtype.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # kernels read only constexpr globals


@triton.jit
def sigmoid(x):
    """The logistic function without overflow: ``e^-|x|`` never exceeds 1."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _silu(x):
    return x * sigmoid(x)


@triton.jit
def _block_masks(rows_t, rows_s, rows_r, L, window):
    """``(allowed, causal, tril)``: the lookahead mask G[s, r] (s < r, r < L, in the window), the
    visible score entries [t, s] (s <= t, both < L) and A's mask [t, r] (r <= t)."""
    allowed = (rows_s[:, None] < rows_r[None, :]) & (rows_r[None, :] < L)
    allowed = allowed & ((window < 0) | (rows_r[None, :] <= rows_s[:, None] + window))
    causal = (rows_t[:, None] >= rows_s[None, :]) & (rows_t[:, None] < L) & (rows_s[None, :] < L)
    tril = rows_t[:, None] >= rows_r[None, :]
    return allowed, causal, tril


@triton.jit
def _in_band(i, j, BLOCK: tl.constexpr, window):
    """Whether some token of row block i writes into a lookahead key of block j (always with
    full lookahead; with a window W, when block i starts within W of block j's last row)."""
    return (window < 0) | (i * BLOCK <= j * BLOCK + BLOCK - 1 + window)


@triton.jit
def _castle_forward_kernel(
    QC, KC, VC, QU, KU, VU, OUT, LSE, DST, ACC, MST, LST,
    L, D, k, window, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_UP: tl.constexpr, PREC: tl.constexpr,
):
    """Launch k of the wavefront; grid ``(N - k, B * H)``. Inputs and OUT are contiguous
    ``[B, H, L, D]``; DST (D, then U^L) and ACC ``[B, H, L, D]`` and LSE, MST, LST ``[B, H, L]``
    are in the state dtype."""
    j = tl.program_id(0)
    i = j + k
    bh = tl.program_id(1).to(tl.int64)
    sd = DST.dtype.element_ty
    if DOT_UP:
        dt = sd
    else:
        dt = QC.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows_i = i * BLOCK + offs
    rows_j = j * BLOCK + offs
    ok_i = rows_i < L
    ok_j = rows_j < L
    base = bh * L * D
    tile_i = base + rows_i[:, None] * D + offs_d[None, :]
    tile_j = base + rows_j[:, None] * D + offs_d[None, :]
    m_i2 = ok_i[:, None] & d_ok[None, :]
    m_j2 = ok_j[:, None] & d_ok[None, :]

    qc = tl.load(QC + tile_i, mask=m_i2, other=0.0).to(dt)
    kc = tl.load(KC + tile_j, mask=m_j2, other=0.0).to(dt)
    vc = tl.load(VC + tile_j, mask=m_j2, other=0.0).to(dt)
    if k > 0:
        dj = tl.load(DST + tile_j, mask=m_j2, other=0.0)
    else:
        dj = tl.zeros([BLOCK, BLOCK_D], dtype=sd)

    allowed, causal, tril = _block_masks(rows_i, rows_j, rows_i, L, window)
    su = tl.dot(qc, tl.trans(dj.to(dt)), input_precision=PREC).to(sd) * scale
    if _in_band(i, j, BLOCK, window):  # else G_ji = 0: D_j is final, no in-block term
        ku = tl.load(KU + tile_i, mask=m_i2, other=0.0).to(dt)
        vu = tl.load(VU + tile_i, mask=m_i2, other=0.0).to(dt)
        qu = tl.load(QU + tile_j, mask=m_j2, other=0.0).to(dt)
        g = tl.dot(qu, tl.trans(ku), input_precision=PREC) * scale
        g = tl.where(allowed, sigmoid(g.to(sd)), 0.0)  # G[s in j, r in i]
        a = tl.dot(qc, tl.trans(vu), input_precision=PREC) * scale
        a = tl.where(tril, a.to(sd), 0.0)  # A[t in i, r in i]
        su += tl.dot(a.to(dt), tl.trans(g.to(dt)), input_precision=PREC).to(sd)
        dj += tl.dot(g.to(dt), vu, input_precision=PREC).to(sd)
        tl.store(DST + tile_j, dj, mask=m_j2)
    z = tl.dot(qc, tl.trans(kc), input_precision=PREC).to(sd) * scale - _silu(su)
    z = tl.where(causal, z * LOG2E, float("-inf"))

    stat = bh * L + rows_i
    if k > 0:
        m_old = tl.load(MST + stat, mask=ok_i, other=0.0)
        l_old = tl.load(LST + stat, mask=ok_i, other=0.0)
        acc = tl.load(ACC + tile_i, mask=m_i2, other=0.0)
    else:
        m_old = tl.full([BLOCK], float("-inf"), dtype=sd)
        l_old = tl.zeros([BLOCK], dtype=sd)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=sd)
    m_new = tl.maximum(m_old, tl.max(z, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past L see no key
    alpha = tl.exp2(m_old - m_ref)
    p = tl.exp2(z - m_ref[:, None])
    l_new = l_old * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(dt), vc, input_precision=PREC).to(sd)
    if j == 0:  # row block i has met every key block: finish it
        l_safe = tl.where(l_new == 0.0, 1.0, l_new)
        tl.store(OUT + tile_i, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=m_i2)
        tl.store(LSE + stat, (m_new + tl.log2(l_safe)) / LOG2E, mask=ok_i)
    else:
        tl.store(ACC + tile_i, acc, mask=m_i2)
        tl.store(MST + stat, m_new, mask=ok_i)
        tl.store(LST + stat, l_new, mask=ok_i)


@triton.jit
def _castle_backward_kernel(
    QC, KC, VC, QU, KU, VU, DO, LSE, DELTA, UL,
    DQC, DKC, DVC, DQU, DKU, DVU,
    L, D, N, window, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_UP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(N, B * H)``: program j sweeps the row blocks below key block j. Inputs and DO
    are contiguous ``[B, H, L, D]``; LSE, DELTA ``[B, H, L]`` and UL and the six gradient
    buffers ``[B, H, L, D]`` (zeroed; DQC, DVU, DKU take atomics) are in the state dtype."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    sd = UL.dtype.element_ty
    if DOT_UP:
        dt = sd
    else:
        dt = QC.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows_j = j * BLOCK + offs
    ok_j = rows_j < L
    base = bh * L * D
    tile_j = base + rows_j[:, None] * D + offs_d[None, :]
    m_j2 = ok_j[:, None] & d_ok[None, :]

    qu = tl.load(QU + tile_j, mask=m_j2, other=0.0).to(dt)
    kc = tl.load(KC + tile_j, mask=m_j2, other=0.0).to(dt)
    vc = tl.load(VC + tile_j, mask=m_j2, other=0.0).to(dt)
    dj = tl.load(UL + tile_j, mask=m_j2, other=0.0)
    d_kc = tl.zeros([BLOCK, BLOCK_D], dtype=sd)
    d_vc = tl.zeros([BLOCK, BLOCK_D], dtype=sd)
    d_qu = tl.zeros([BLOCK, BLOCK_D], dtype=sd)
    d_dj = tl.zeros([BLOCK, BLOCK_D], dtype=sd)  # gradient into D_j from the rows below

    for step in range(0, N - j):
        i = N - 1 - step
        rows_i = i * BLOCK + offs
        ok_i = rows_i < L
        tile_i = base + rows_i[:, None] * D + offs_d[None, :]
        m_i2 = ok_i[:, None] & d_ok[None, :]
        qc = tl.load(QC + tile_i, mask=m_i2, other=0.0).to(dt)
        ku = tl.load(KU + tile_i, mask=m_i2, other=0.0).to(dt)
        vu = tl.load(VU + tile_i, mask=m_i2, other=0.0).to(dt)
        do = tl.load(DO + tile_i, mask=m_i2, other=0.0).to(dt)
        lse = tl.load(LSE + bh * L + rows_i, mask=ok_i, other=0.0)
        delta = tl.load(DELTA + bh * L + rows_i, mask=ok_i, other=0.0)

        allowed, causal, tril = _block_masks(rows_i, rows_j, rows_i, L, window)
        near = _in_band(i, j, BLOCK, window)
        g = tl.zeros([BLOCK, BLOCK], dtype=sd)
        a = tl.zeros([BLOCK, BLOCK], dtype=sd)
        if near:
            g = tl.dot(qu, tl.trans(ku), input_precision=PREC) * scale
            g = tl.where(allowed, sigmoid(g.to(sd)), 0.0)  # G[s in j, r in i]
            dj -= tl.dot(g.to(dt), vu, input_precision=PREC).to(sd)  # now: r before block i
            a = tl.dot(qc, tl.trans(vu), input_precision=PREC) * scale
            a = tl.where(tril, a.to(sd), 0.0)
        su = tl.dot(qc, tl.trans(dj.to(dt)), input_precision=PREC).to(sd) * scale
        if near:
            su += tl.dot(a.to(dt), tl.trans(g.to(dt)), input_precision=PREC).to(sd)
        z = tl.dot(qc, tl.trans(kc), input_precision=PREC).to(sd) * scale - _silu(su)
        p = tl.where(causal, tl.exp2((z - lse[:, None]) * LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(vc), input_precision=PREC).to(sd)
        dz = p * (dp - delta[:, None])
        d_vc += tl.dot(tl.trans(p.to(dt)), do, input_precision=PREC).to(sd)
        d_kc += tl.dot(tl.trans(dz.to(dt)), qc, input_precision=PREC).to(sd) * scale
        sg = sigmoid(su)
        dsu = tl.where(causal, -dz * sg * (1.0 + su * (1.0 - sg)), 0.0)
        d_qc = tl.dot(dz.to(dt), kc, input_precision=PREC).to(sd)
        d_qc += tl.dot(dsu.to(dt), dj.to(dt), input_precision=PREC).to(sd)
        if near:  # the terms through G_ji and A_ii (zero outside the band)
            da = tl.where(tril, tl.dot(dsu.to(dt), g.to(dt), input_precision=PREC).to(sd), 0.0)
            d_qc += tl.dot(da.to(dt), vu, input_precision=PREC).to(sd)
            d_vu = tl.dot(tl.trans(da.to(dt)), qc, input_precision=PREC).to(sd) * scale
            d_vu += tl.dot(tl.trans(g.to(dt)), d_dj.to(dt), input_precision=PREC).to(sd)
            dg = tl.dot(tl.trans(dsu.to(dt)), a.to(dt), input_precision=PREC).to(sd)
            dg += tl.dot(d_dj.to(dt), tl.trans(vu), input_precision=PREC).to(sd)
            dlog = tl.where(allowed, dg * g * (1.0 - g), 0.0)
            d_qu += tl.dot(dlog.to(dt), ku, input_precision=PREC).to(sd) * scale
            d_ku = tl.dot(tl.trans(dlog.to(dt)), qu, input_precision=PREC).to(sd) * scale
            tl.atomic_add(DVU + tile_i, d_vu, mask=m_i2)
            tl.atomic_add(DKU + tile_i, d_ku, mask=m_i2)
        d_dj += tl.dot(tl.trans(dsu.to(dt)), qc, input_precision=PREC).to(sd) * scale
        tl.atomic_add(DQC + tile_i, d_qc * scale, mask=m_i2)

    tl.store(DKC + tile_j, d_kc, mask=m_j2)
    tl.store(DVC + tile_j, d_vc, mask=m_j2)
    tl.store(DQU + tile_j, d_qu, mask=m_j2)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_settings(x: torch.Tensor) -> tuple[bool, str]:
    """``(DOT_UP, PREC)``: dot operands in the state dtype (under the interpreter, whose bf16
    dot misreads the raw bits, and for fp64), and the fp32 dot precision."""
    up = not x.is_cuda or x.dtype == torch.float64
    return up, "ieee" if x.dtype == torch.float64 else "tf32x3"


NUM_WARPS = 8
"""Warps per program. Compiled ahead of time for sm_90 (triton 3.9), 4 warps spill hundreds to
thousands of bytes per thread in every configuration below; 8 warps spill least."""


def forward_block(D: int, dtype: torch.dtype, device: torch.device) -> int:
    """The forward's block of rows: 16 under the interpreter (many blocks on small tests). On a
    GPU, fp16/bf16: 64 for D <= 64 (16 bytes of spill per thread at 8 warps), 32 for D <= 128
    (544 bytes; 16 rows spill none but double the launches), else 16; fp32 (tf32x3 dots take
    three times the registers) and fp64: 16."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return 16
    return 64 if D <= 64 else 32 if D <= 128 else 16


BACKWARD_BLOCK = 16
"""The backward's block of rows: it holds four [BLOCK, D] accumulators besides its tiles; at 8
warps and D <= 64 it spills none, at D = 128 about 600 bytes per thread, and 32 rows spill more
than twice that."""


def castle_forward_triton(qc, kc, vc, qu, ku, vu, window: int, scale: float,
                          block: int | None = None):
    """Launches the forward on validated ``[B, H, L, D]`` inputs (copied to contiguous when
    they are not). Returns ``(out, lse, ul)``: the output in the inputs' dtype, the natural-log
    normaliser ``[B, H, L]`` and the final lookahead keys ``[B, H, L, D]`` (state dtype)."""
    qc, kc, vc, qu, ku, vu = (x.contiguous() for x in (qc, kc, vc, qu, ku, vu))
    B, H, L, D = qc.shape
    sd = _state_dtype(qc.dtype)
    block = block or forward_block(D, qc.dtype, qc.device)
    out = torch.empty_like(qc)
    lse = torch.empty(B, H, L, dtype=sd, device=qc.device)
    ul = torch.empty(B, H, L, D, dtype=sd, device=qc.device)
    if out.numel() == 0:
        return out, lse, ul
    acc = torch.empty_like(ul)
    m_state = torch.empty_like(lse)
    l_state = torch.empty_like(lse)
    up, prec = _dot_settings(qc)
    N = triton.cdiv(L, block)
    with torch.cuda.device(qc.device) if qc.is_cuda else contextlib.nullcontext():
        for k in range(N):
            _castle_forward_kernel[(N - k, B * H)](
                qc, kc, vc, qu, ku, vu, out, lse, ul, acc, m_state, l_state,
                L, D, k, window, scale,
                BLOCK=block, BLOCK_D=triton.next_power_of_2(D), DOT_UP=up, PREC=prec,
                num_warps=NUM_WARPS, num_stages=1,
            )
    return out, lse, ul


def castle_backward_triton(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window: int,
                           scale: float, block: int | None = None):
    """Launches the backward. ``dout`` ``[B, H, L, D]``; ``out``, ``lse`` and ``ul`` as the
    forward returned them. Returns the gradients of ``qc, kc, vc, qu, ku, vu`` in their
    dtype."""
    qc, kc, vc, qu, ku, vu, dout = (x.contiguous() for x in (qc, kc, vc, qu, ku, vu, dout))
    B, H, L, D = qc.shape
    sd = ul.dtype
    block = block or BACKWARD_BLOCK
    delta = (dout.to(sd) * out.to(sd)).sum(-1)  # [B, H, L]
    grads = [torch.zeros(B, H, L, D, dtype=sd, device=qc.device) for _ in range(6)]
    if qc.numel():
        up, prec = _dot_settings(qc)
        N = triton.cdiv(L, block)
        with torch.cuda.device(qc.device) if qc.is_cuda else contextlib.nullcontext():
            _castle_backward_kernel[(N, B * H)](
                qc, kc, vc, qu, ku, vu, dout, lse.contiguous(), delta, ul.contiguous(), *grads,
                L, D, N, window, scale,
                BLOCK=block, BLOCK_D=triton.next_power_of_2(D), DOT_UP=up, PREC=prec,
                num_warps=NUM_WARPS, num_stages=1,
            )
    return tuple(g.to(qc.dtype) for g in grads)
