"""CASTLE attention (causal attention with lookahead keys, arXiv:2509.07301) and its UQ-KV cache.

Every position s carries a causal key ``k^C_s`` and a lookahead key that grows as tokens arrive:
with t tokens present, ``u_s = sum_{s < r <= t} sigmoid(c q^U_s . k^U_r) v^U_r`` (CASTLE-SWL, a
window W, keeps only ``r <= s + W``). Query t scores key s as
``c q^C_t . k^C_s - SiLU(c q^C_t . u_s)``, takes one causal softmax and averages ``v^C``.

This file holds:
  * :func:`castle_attention`, the parallel (training) form with autograd, dispatched to the
    ``torch`` backend (:func:`castle_attention_blocked` and its hand-written backward: plain
    torch on any device, blocked over key and row blocks like the Triton kernels, with an
    online softmax; O(L^2 D) time, O(L (D + block)) extra memory, no L x L matrix; the CPU
    path) or the ``triton`` kernels (``fastdecode.triton_kernels.castle.parallel``: the same
    math fused, O(L D) extra memory);
  * :func:`castle_attention_reference` and :func:`castle_attention_backward_reference`, the
    test oracle of both backends: Theorem 1 of the paper and its chain rule with dense L x L
    matrices (O(L^3) for the lookahead scores); registered nowhere;
  * :func:`castle_attention_naive`, the literal definition that rebuilds every lookahead key for
    every step (O(L^3 d); a test oracle);
  * :class:`CastleCache` with :func:`castle_decode` (one token; the ``triton`` backend fuses the
    rank-1 update of U with the attention) and :func:`castle_prefill` (any number of tokens against
    the cache, the chunked formula; also speculative verification, rolled back by
    :meth:`CastleCache.crop` after :meth:`CastleCache.checkpoint`).

``c`` is ``scale``, default ``1/sqrt(D)``. Tensors are ``[B, H, L, D]``; the state (lookahead
keys, softmax statistics) is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
NO_WINDOW = -1
"""The custom ops' spelling of ``window=None`` (full lookahead)."""
PREFILL_CHUNK = 64
"""The chunked formula's tokens per step: bounds its C x C x t term."""
_NAMES = ("qc", "kc", "vc", "qu", "ku", "vu")


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lookahead keys and softmax statistics for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lookahead_allowed(s: torch.Tensor, r: torch.Tensor, window: int) -> torch.Tensor:
    """bool ``[len(s), len(r)]``: whether token r writes into the lookahead key of s
    (``s < r``, and ``r <= s + window`` unless ``window == NO_WINDOW``)."""
    ok = s[:, None] < r[None, :]
    if window != NO_WINDOW:
        ok &= r[None, :] <= s[:, None] + window
    return ok


# ---- dense plain-torch reference of the parallel form (the test oracle) ----------------------


def _dense_forward(qc, kc, vc, qu, ku, vu, window: int, scale: float):
    """Theorem 1 in the state dtype: returns ``(out, lse, ul)`` where ``lse`` ``[B, H, L]`` is
    the natural-log softmax normaliser of each row and ``ul`` ``[B, H, L, D]`` the final
    lookahead keys ``U^L = G V^U``."""
    sd = _state_dtype(qc.dtype)
    qc, kc, vc, qu, ku, vu = (x.to(sd) for x in (qc, kc, vc, qu, ku, vu))
    L = qc.shape[2]
    pos = torch.arange(L, device=qc.device)
    low = pos[:, None] >= pos[None, :]
    a = torch.where(low, scale * qc @ vu.transpose(-1, -2), 0.0)  # A[t, r], r <= t
    g = torch.where(_lookahead_allowed(pos, pos, window),
                    torch.sigmoid(scale * qu @ ku.transpose(-1, -2)), 0.0)  # G[s, r]
    su = a @ g.transpose(-1, -2)  # S^U[t, s]: zero for s >= t
    z = torch.where(low, scale * qc @ kc.transpose(-1, -2) - F.silu(su), float("-inf"))
    lse = torch.logsumexp(z, -1)
    out = torch.exp(z - lse[..., None]) @ vc
    return out, lse, g @ vu


def castle_attention_reference(qc, kc, vc, qu, ku, vu, window: int, scale: float):
    """The dense reference forward (the test oracle): ``(out, lse, ul)``, out in the inputs'
    dtype, ``lse`` and ``ul`` in the state dtype (see :func:`_dense_forward`)."""
    out, lse, ul = _dense_forward(qc, kc, vc, qu, ku, vu, window, scale)
    return out.to(qc.dtype), lse, ul


def castle_attention_backward_reference(dout, qc, kc, vc, qu, ku, vu, out, lse, ul,
                                        window: int, scale: float):
    """The dense reference backward (the test oracle): the gradients of the six inputs by the
    dense formulas of Theorem 1's chain rule, in the state dtype (the probabilities are recomputed,
    so ``out``, ``lse`` and ``ul`` go unused)."""
    sd = _state_dtype(qc.dtype)
    qc, kc, vc, qu, ku, vu, do = (x.to(sd) for x in (qc, kc, vc, qu, ku, vu, dout))
    L = qc.shape[2]
    pos = torch.arange(L, device=qc.device)
    low = pos[:, None] >= pos[None, :]
    allowed = _lookahead_allowed(pos, pos, window)
    a = torch.where(low, scale * qc @ vu.mT, 0.0)
    g = torch.where(allowed, torch.sigmoid(scale * qu @ ku.mT), 0.0)
    su = a @ g.mT
    z = torch.where(low, scale * qc @ kc.mT - F.silu(su), float("-inf"))
    p = torch.softmax(z, -1)
    dz = p * (do @ vc.mT - (do * (p @ vc)).sum(-1, keepdim=True))
    sig = torch.sigmoid(su)
    dsu = torch.where(low, -dz * sig * (1 + su * (1 - sig)), 0.0)  # through -SiLU
    da = torch.where(low, dsu @ g, 0.0)
    dlogit = torch.where(allowed, dsu.mT @ a, 0.0) * g * (1 - g)  # through the sigmoid
    grads = (scale * (dz @ kc + da @ vu), scale * dz.mT @ qc, p.mT @ do,
             scale * dlogit @ ku, scale * dlogit.mT @ qu, scale * da.mT @ qc)
    return tuple(x.to(dout.dtype) for x in grads)


# ---- blocked O(L^2 D) plain-torch implementation (the ``torch`` backend) ----------------------

BLOCK = 64
"""Rows per block of the blocked torch implementation when the call names none (read at each
call): each step works on ``[n, BLOCK, BLOCK]`` tiles, so the in-block ``A G^T`` product costs
``L^2 BLOCK`` against the ``L^2 D`` of the rest. On one CPU core 128 was about as fast and 32
slower (L = 1024, D = 64)."""


def _blocks(x: torch.Tensor, sd: torch.dtype, N: int, block: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, N, block, D]`` in ``sd``, rows past L zero."""
    B, H, L, D = x.shape
    return F.pad(x.to(sd), (0, 0, 0, N * block - L)).view(B, H, N, block, D)


class _Column:
    """Key block j's lookahead terms against the row blocks ``i = j .. N-1`` (``n`` of them),
    in the state dtype. Only the first ``nb`` row blocks write into block j's lookahead keys
    (all of them without a window):

    * ``g`` ``[B, H, nb, block, block]``: ``G[s in j, r in i]``, zero where not allowed;
    * ``d`` ``[B, H, n, block, D]``: ``D_j`` as row block i sees it, ``sum_{m < i} G_jm V^U_m``
      (an expanded view past ``nb``);
    * ``ul`` ``[B, H, block, D]``: the final lookahead keys of block j;
    * ``su`` ``[B, H, n, block, block]``: ``S^U[t in i, s in j] = c Q^C_i D_j^T + A_ii G_ji^T``;
    * ``z`` ``[B, H, n, block, block]``: the logits ``c Q^C_i K^C_j^T - SiLU(S^U)``, ``-inf``
      above the diagonal.

    ``qc, kc, qu, ku, vu`` are the blocked inputs ``[B, H, N, block, D]`` and ``a`` the blocks
    ``A_ii`` (:func:`_a_blocks`).
    """

    def __init__(self, j: int, qc: torch.Tensor, kc: torch.Tensor, qu: torch.Tensor,
                 ku: torch.Tensor, vu: torch.Tensor, a: torch.Tensor, window: int,
                 scale: float) -> None:
        N, block = qc.shape[2], qc.shape[3]
        n = N - j
        nb = n if window == NO_WINDOW else min(n, (block - 1 + window) // block + 1)
        pos = torch.arange(block, device=qc.device)
        s = j * block + pos
        r = torch.arange(j * block, (j + nb) * block, device=qc.device).view(nb, 1, block)
        allowed = s[:, None] < r
        if window != NO_WINDOW:
            allowed &= r <= s[:, None] + window
        near = slice(j, j + nb)
        logits = scale * qu[:, :, j, None] @ ku[:, :, near].mT
        self.nb = nb
        self.g = torch.where(allowed, torch.sigmoid(logits), 0.0)
        total = (self.g @ vu[:, :, near]).cumsum(2)
        self.ul = total[:, :, -1]
        before = torch.cat([torch.zeros_like(total[:, :, :1]), total[:, :, :-1]], 2)
        self.d = torch.cat([before, self.ul[:, :, None].expand(-1, -1, n - nb, -1, -1)], 2)
        rows = qc[:, :, j:]
        self.su = scale * rows @ self.d.mT
        self.su[:, :, :nb] += a[:, :, near] @ self.g.mT
        self.z = scale * rows @ kc[:, :, j, None].mT - F.silu(self.su)
        self.z[:, :, 0].masked_fill_(pos[:, None] < pos[None, :], float("-inf"))


def _a_blocks(qc: torch.Tensor, vu: torch.Tensor, scale: float) -> torch.Tensor:
    """``A_ii = c Q^C_i V^U_i^T`` on and below the diagonal, ``[B, H, N, block, block]``."""
    pos = torch.arange(qc.shape[3], device=qc.device)
    return torch.where(pos[:, None] >= pos[None, :], scale * qc @ vu.mT, 0.0)


def castle_attention_blocked(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                             qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, window: int,
                             scale: float, block: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``torch`` backend of the forward, blocked like the Triton kernels: ``(out, lse, ul)``
    as :func:`castle_attention_reference` returns them (contiguous), in O(L^2 D) time.

    Inputs ``[B, H, L, D]`` (any dtype of :data:`DTYPES`) are padded to ``N = ceil(L / block)``
    blocks in the state dtype. Key block j at a time, it builds ``D_j`` for every row block
    below as a prefix sum of ``G_ji V^U_i``, forms the score blocks (:class:`_Column`) and folds
    them into the rows' online-softmax state. Extra memory: the padded inputs, the output
    accumulator and one column's tiles, ``O(L (D + block))`` per batch row and head; no L x L
    matrix."""
    sd = _state_dtype(qc.dtype)
    B, H, L, D = qc.shape
    block = min(block or BLOCK, L)
    N = -(-L // block)
    qc_, kc_, vc_, qu_, ku_, vu_ = (_blocks(x, sd, N, block) for x in (qc, kc, vc, qu, ku, vu))
    a = _a_blocks(qc_, vu_, scale)
    acc = torch.zeros_like(qc_)
    m = torch.full(qc_.shape[:-1], float("-inf"), dtype=sd, device=qc.device)
    total = torch.zeros_like(m)
    ul = torch.empty_like(qc_)
    for j in range(N):
        col = _Column(j, qc_, kc_, qu_, ku_, vu_, a, window, scale)
        ul[:, :, j] = col.ul
        m_new = torch.maximum(m[:, :, j:], col.z.amax(-1))  # finite: row t sees key t
        alpha = torch.exp(m[:, :, j:] - m_new)
        p = torch.exp(col.z - m_new[..., None])
        total[:, :, j:] = total[:, :, j:] * alpha + p.sum(-1)
        acc[:, :, j:] = acc[:, :, j:] * alpha[..., None] + p @ vc_[:, :, j, None]
        m[:, :, j:] = m_new
    out = (acc / total[..., None]).view(B, H, -1, D)[:, :, :L]
    lse = (m + total.log()).view(B, H, -1)[:, :, :L]
    return (out.to(qc.dtype).contiguous(), lse.contiguous(),
            ul.view(B, H, -1, D)[:, :, :L].contiguous())


def castle_attention_backward_blocked(dout: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor,
                                      vc: torch.Tensor, qu: torch.Tensor, ku: torch.Tensor,
                                      vu: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                      ul: torch.Tensor, window: int, scale: float,
                                      block: int | None = None) -> tuple[torch.Tensor, ...]:
    """The ``torch`` backend of the backward, by hand like the Triton column sweep: key block j
    at a time it recomputes the column's tiles (:class:`_Column`) and the probabilities from
    ``lse``, and accumulates the gradients of the six inputs (returned contiguous in their
    dtype) in the state dtype. ``dout``, ``out`` ``[B, H, L, D]``; ``lse`` ``[B, H, L]``;
    ``ul`` goes unused (the column rebuilds D_j as a prefix sum, nothing is peeled off).
    O(L^2 D) time, extra memory as the forward's."""
    sd = _state_dtype(qc.dtype)
    B, H, L, D = qc.shape
    block = min(block or BLOCK, L)
    N = -(-L // block)
    qc_, kc_, vc_, qu_, ku_, vu_, do = (_blocks(x, sd, N, block)
                                        for x in (qc, kc, vc, qu, ku, vu, dout))
    pad = (0, N * block - L)
    delta = F.pad((dout.to(sd) * out.to(sd)).sum(-1), pad).view(B, H, N, block)
    lse_ = F.pad(lse.to(sd), pad).view(B, H, N, block)
    a = _a_blocks(qc_, vu_, scale)
    dqc, dkc, dvc, dqu, dku, dvu = (torch.zeros_like(qc_) for _ in range(6))
    pos = torch.arange(block, device=qc.device)
    tril = pos[:, None] >= pos[None, :]
    for j in range(N):
        col = _Column(j, qc_, kc_, qu_, ku_, vu_, a, window, scale)
        nb, near = col.nb, slice(j, j + col.nb)
        rows, do_rows = qc_[:, :, j:], do[:, :, j:]
        p = torch.exp(col.z - lse_[:, :, j:, :, None])
        dz = p * (do_rows @ vc_[:, :, j, None].mT - delta[:, :, j:, :, None])
        dvc[:, :, j] = (p.mT @ do_rows).sum(2)
        dkc[:, :, j] = scale * (dz.mT @ rows).sum(2)
        sg = torch.sigmoid(col.su)
        dsu = -dz * sg * (1 + col.su * (1 - sg))  # through -SiLU; zero where p is
        dqc[:, :, j:] += dz @ kc_[:, :, j, None] + dsu @ col.d
        # the gradient into G_jm V^U_m: every row block i > m reads it through D_j
        dd = scale * dsu.mT @ rows
        after = dd.flip(2).cumsum(2).flip(2)  # sum over i >= m
        later = torch.cat([after[:, :, 1:], torch.zeros_like(after[:, :, :1])], 2)[:, :, :nb]
        da = torch.where(tril, dsu[:, :, :nb] @ col.g, 0.0)
        dqc[:, :, near] += da @ vu_[:, :, near]
        dvu[:, :, near] += scale * da.mT @ rows[:, :, :nb] + col.g.mT @ later
        dg = dsu[:, :, :nb].mT @ a[:, :, near] + later @ vu_[:, :, near].mT
        dlogit = dg * col.g * (1 - col.g)  # zero where G is masked
        dqu[:, :, j] += scale * (dlogit @ ku_[:, :, near]).sum(2)
        dku[:, :, near] += scale * dlogit.mT @ qu_[:, :, j, None]
    dqc *= scale
    return tuple(x.view(B, H, -1, D)[:, :, :L].to(dout.dtype).contiguous()
                 for x in (dqc, dkc, dvc, dqu, dku, dvu))


def _forward_triton(qc, kc, vc, qu, ku, vu, window: int, scale: float):
    # Imported on first use: triton is optional, and importing it costs time.
    from fastdecode.triton_kernels.castle.parallel import castle_forward_triton

    return castle_forward_triton(qc, kc, vc, qu, ku, vu, window, scale)


def _backward_triton(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window: int, scale: float):
    from fastdecode.triton_kernels.castle.parallel import castle_backward_triton

    return castle_backward_triton(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window, scale)


register("castle_attention", "torch")(castle_attention_blocked)
register("castle_attention", "triton")(_forward_triton)
register("castle_attention_backward", "torch")(castle_attention_backward_blocked)
register("castle_attention_backward", "triton")(_backward_triton)


# ---- torch.library registration and autograd -------------------------------------------------


@torch.library.custom_op("fastdecode::castle_attention", mutates_args=())
def _castle_attention_op(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qu: torch.Tensor,
                         ku: torch.Tensor, vu: torch.Tensor, window: int, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, ul = run("castle_attention", qc.device, qc, kc, vc, qu, ku, vu, window, scale)
    return out, lse, ul


@_castle_attention_op.register_fake
def _(qc, kc, vc, qu, ku, vu, window, scale):
    B, H, L, D = qc.shape
    sd = _state_dtype(qc.dtype)
    return (torch.empty_like(qc), qc.new_empty(B, H, L, dtype=sd),
            qc.new_empty(B, H, L, D, dtype=sd))


@torch.library.custom_op("fastdecode::castle_attention_backward", mutates_args=())
def _castle_backward_op(dout: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                        qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, ul: torch.Tensor, window: int, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    return run("castle_attention_backward", qc.device, dout, qc, kc, vc, qu, ku, vu, out, lse, ul,
               window, scale)


@_castle_backward_op.register_fake
def _(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window, scale):
    return tuple(torch.empty_like(x) for x in (qc, kc, vc, qu, ku, vu))


def _setup_context(ctx, inputs, output) -> None:
    qc, kc, vc, qu, ku, vu, window, scale = inputs
    ctx.save_for_backward(qc, kc, vc, qu, ku, vu, *output)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, dout, _dlse, _dul):
    qc, kc, vc, qu, ku, vu, out, lse, ul = ctx.saved_tensors
    grads = dispatch("castle_attention_backward", _castle_backward_op, qc.device,
                     dout.contiguous(), qc, kc, vc, qu, ku, vu, out, lse, ul, ctx.window,
                     ctx.scale)
    return (*grads, None, None)


# Gradients flow to the six inputs only (the log-sum-exp and U^L are by-products).
_castle_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public, validated parallel form ---------------------------------------------------------


def _check_scale(scale: object, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, found {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, found {scale}")
    return float(scale)


def _check_window(window: object) -> int:
    if window is None:
        return NO_WINDOW
    return _validate.integer("window", window, 0)


def _check_six(tensors: tuple, layout: str) -> tuple[torch.Tensor, ...]:
    """Checks the six projections: 4-D ``[B, H, L, D]`` tensors of one shape, dtype and device
    with D a multiple of 16 in [16, 256]; returns them with unit stride on D."""
    for name, x in zip(_NAMES, tensors):
        _validate.tensor(name, x, None, 4, layout)
    qc = tensors[0]
    if qc.dtype not in DTYPES:
        raise TypeError(f"qc must have dtype float16, bfloat16, float32 or float64, found "
                        f"{qc.dtype}")
    for name, x in zip(_NAMES, tensors):
        _validate.tensor(name, x, qc.dtype)
        _validate.shape(name, x, qc.shape, layout)
    D = qc.shape[3]
    if D % 16 or not 16 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim D must be a multiple of 16 in [16, {MAX_HEAD_DIM}], "
                         f"found qc shape {tuple(qc.shape)}")
    _validate.same_device(list(zip(_NAMES, tensors)))
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in tensors)


def castle_attention(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qu: torch.Tensor,
                     ku: torch.Tensor, vu: torch.Tensor, *, window: int | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """CASTLE attention over whole sequences (the paper's parallel form), differentiable.

    Row t of the output is ``sum_s p_{t,s} vc_s`` over ``s <= t`` with
    ``p_t = softmax_s(c qc_t . kc_s - SiLU(c qc_t . u_s^t))`` and the lookahead keys
    ``u_s^t = sum_{s < r <= t} sigmoid(c qu_s . ku_r) vu_r`` (with ``window=W`` only
    ``r <= s + W``). ``vu = 0`` or ``window=0`` gives standard causal attention.

    Args:
        qc, kc, vc: ``[B, H, L, D]`` causal queries, causal keys and values.
        qu, ku, vu: ``[B, H, L, D]`` lookahead queries, lookahead keys and lookahead values.
            All six share shape, dtype (float16, bfloat16, float32; float64 for gradient
            checks) and device; D is a multiple of 16 in [16, 256]; L >= 1 (any value); any
            strides (a tensor whose last stride is not 1 is copied). Apply rotary embeddings
            before the call if the model uses them.
        window: None for full lookahead, or W >= 0 for sliding-window lookahead (CASTLE-SWL).
        scale: ``c``, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, L, D]`` contiguous, the inputs' dtype. Accumulation and the lookahead keys are
        fp32 (fp64 for fp64 inputs). Gradients flow to all six inputs.
    """
    tensors = _check_six((qc, kc, vc, qu, ku, vu), "[B, H, L, D]")
    window = _check_window(window)
    scale = _check_scale(scale, qc.shape[3])
    if qc.shape[2] == 0:
        raise ValueError(f"qc must have L >= 1 tokens, found shape {tuple(qc.shape)}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _castle_attention_op(*tensors, window, scale)[0]  # through its autograd
    return dispatch("castle_attention", _castle_attention_op, qc.device, *tensors, window,
                    scale)[0]


def castle_attention_naive(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                           qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, *,
                           window: int | None = None, scale: float | None = None
                           ) -> torch.Tensor:
    """The literal recurrent definition, a test oracle: for every t it rebuilds the lookahead keys
    ``U^t`` of the first t+1 tokens from scratch and computes output row t alone (O(L^3 D)).
    Same arguments and result as :func:`castle_attention` (computed in fp64, returned in the
    inputs' dtype); not differentiable through a kernel, but plain autograd works."""
    tensors = _check_six((qc, kc, vc, qu, ku, vu), "[B, H, L, D]")
    w = _check_window(window)
    c = _check_scale(scale, qc.shape[3])
    qc64, kc64, vc64, qu64, ku64, vu64 = (x.double() for x in tensors)
    rows = []
    for t in range(qc.shape[2]):
        pos = torch.arange(t + 1, device=qc.device)
        logits = c * qu64[:, :, :t + 1] @ ku64[:, :, :t + 1].transpose(-1, -2)
        g = torch.where(_lookahead_allowed(pos, pos, w), torch.sigmoid(logits), 0.0)
        u = g @ vu64[:, :, :t + 1]  # [B, H, t+1, D], row t is zero
        q = qc64[:, :, t:t + 1]  # [B, H, 1, D]
        z = c * q @ kc64[:, :, :t + 1].transpose(-1, -2) - F.silu(c * q @ u.transpose(-1, -2))
        rows.append(torch.softmax(z, -1) @ vc64[:, :, :t + 1])
    return torch.cat(rows, 2).to(qc.dtype)


# ---- the UQ-KV cache --------------------------------------------------------------------------


@dataclass
class _LayerState:
    """One layer's cache: rows ``[0, length)`` of ``u`` (state dtype), ``kc`` and ``vc`` (the
    model dtype), ``[B, H, capacity, D]``; ``qu`` ``[B, H, qu_capacity, D]`` holds the lookahead
    queries of tokens ``[qu_base, length)`` (with a window W, older ones are never read again
    and get dropped); plus the rollback record since the last checkpoint: the lookahead-key rows
    that later tokens could change, as they were, and the lookahead keys and values of the
    tokens added since."""

    u: torch.Tensor
    qu: torch.Tensor
    kc: torch.Tensor
    vc: torch.Tensor
    scale: float
    length: int = 0
    qu_base: int = 0
    saved_at: int | None = None
    saved_from: int = 0
    saved_u: torch.Tensor | None = None
    ku_log: list | None = None
    vu_log: list | None = None

    def grow(self, need: int, keep_qu_from: int = 0) -> None:
        """Makes room for ``need`` rows (doubling the capacity). ``qu`` keeps only the rows from
        ``keep_qu_from`` on when it has to move: it then holds about twice the rows kept."""
        cap = self.u.shape[2]
        if need > cap:
            new_cap = max(need, 2 * cap, 16)
            for name in ("u", "kc", "vc"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                setattr(self, name, new)
        if need - self.qu_base > self.qu.shape[2]:
            first = max(keep_qu_from, self.qu_base)
            old = self.qu
            new = old.new_zeros(*old.shape[:2], max(2 * (need - first), 16), old.shape[3])
            new[:, :, :self.length - first] = old[:, :, first - self.qu_base:self.length
                                                  - self.qu_base]
            self.qu, self.qu_base = new, first

    def lookahead_queries(self, first: int, end: int) -> torch.Tensor:
        """The cached lookahead queries of tokens ``[first, end)`` (a view)."""
        return self.qu[:, :, first - self.qu_base:end - self.qu_base]


class CastleCache:
    """The UQ-KV cache of a CASTLE model: per layer, the current lookahead keys U (fp32, fp64
    for fp64 models) and the lookahead queries Q^U, causal keys K^C and values V^C of the
    cached tokens, each ``[B, H, capacity, D]`` (valid rows ``[0, length)``; the capacity grows by
    doubling). All rows of a batch share one length.

    Args:
        num_layers: how many layers (a layer's state is made by its first call).
        window: None for full lookahead, or the CASTLE-SWL window W (must match the model's).
            With a window only the last W rows of U ever change, and only the last W lookahead
            queries are ever read again: older ones are dropped when the Q^U buffer moves, so it
            holds about 2 W rows (plus the tokens of one call) instead of all of them.

    Rollback after speculative steps: call :meth:`checkpoint` before the draft tokens are fed,
    then :meth:`crop` to the accepted length. The lookahead keys are restored from the copy that
    :meth:`checkpoint` took (rows that later tokens could change: all of them, or the last W
    with a window) and the accepted tokens' updates are recomputed, so nothing is subtracted.
    Until the next checkpoint every added token's k^U and v^U are kept for that, so call
    :meth:`checkpoint` again once a step's tokens are accepted.
    """

    def __init__(self, num_layers: int = 1, window: int | None = None) -> None:
        _validate.integer("num_layers", num_layers, 1)
        self.window = None if window is None else _validate.integer("window", window, 0)
        self.layers: list[_LayerState | None] = [None] * num_layers

    def length(self, layer: int = 0) -> int:
        """Cached tokens of ``layer`` (0 before its first call)."""
        state = self.layers[_validate.integer("layer", layer, 0, len(self.layers) - 1)]
        return 0 if state is None else state.length

    def lookahead_keys(self, layer: int = 0) -> torch.Tensor:
        """The current lookahead keys of ``layer``: a ``[B, H, length, D]`` view."""
        state = self._state(layer)
        return state.u[:, :, :state.length]

    def _state(self, layer: int) -> _LayerState:
        _validate.integer("layer", layer, 0, len(self.layers) - 1)
        state = self.layers[layer]
        if state is None:
            raise ValueError(f"layer {layer} of the cache is empty")
        return state

    def _w(self) -> int:
        return NO_WINDOW if self.window is None else self.window

    def checkpoint(self) -> None:
        """Records the current state of every layer so that :meth:`crop` can return to any
        length from here on. Copies the lookahead-key rows that new tokens can change."""
        for state in self.layers:
            if state is None:
                continue
            n = state.length
            first = 0 if self.window is None else max(0, n - self.window)
            state.saved_at, state.saved_from = n, first
            state.saved_u = state.u[:, :, first:n].clone()
            state.ku_log, state.vu_log = [], []

    def crop(self, length: int) -> None:
        """Rolls every layer back to its first ``length`` tokens (``length`` no less than the
        length at the last :meth:`checkpoint`, no more than the current length)."""
        for i, state in enumerate(self.layers):
            if state is None:
                continue
            _validate.integer("length", length, 0, state.length)
            if length == state.length:
                continue
            if state.saved_at is None or length < state.saved_at:
                raise ValueError(
                    f"crop(length={length}): layer {i} can only roll back to its last "
                    f"checkpoint at {state.saved_at} tokens; call checkpoint() before the "
                    "tokens to roll back are added")
            base, first = state.saved_at, state.saved_from
            state.u[:, :, first:base] = state.saved_u
            state.u[:, :, base:length] = 0
            keep = length - base
            ku = torch.cat(state.ku_log, 2)[:, :, :keep]
            vu = torch.cat(state.vu_log, 2)[:, :, :keep]
            _update_lookahead(state, base, ku, vu, self._w(), state.scale)
            state.length = length
            state.ku_log, state.vu_log = [ku], [vu]

    def _append(self, layer: int, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, scale: float
                ) -> _LayerState:
        """The state of ``layer`` with room for the new tokens and their Q^U, K^C, V^C written
        (the length is not advanced yet); checks them against the cached ones."""
        _validate.integer("layer", layer, 0, len(self.layers) - 1)
        state = self.layers[layer]
        B, H, C, D = qc.shape
        if state is None:
            sd = _state_dtype(qc.dtype)
            state = _LayerState(u=qc.new_zeros(B, H, 0, D, dtype=sd), qu=qc.new_zeros(B, H, 0, D),
                                kc=qc.new_zeros(B, H, 0, D), vc=qc.new_zeros(B, H, 0, D),
                                scale=scale)
            self.layers[layer] = state
        else:
            want = (state.qu.shape[0], state.qu.shape[1], C, state.qu.shape[3])
            _validate.shape("qc", qc, want, "[B, H, C, D] (B, H, D of the cache)")
            if qc.dtype != state.qu.dtype or qc.device != state.qu.device:
                raise TypeError(f"the new tokens are {qc.dtype} on {qc.device} but layer {layer} "
                                f"of the cache holds {state.qu.dtype} on {state.qu.device}")
            if scale != state.scale:
                raise ValueError(f"scale {scale} differs from the {state.scale} the cache of "
                                 f"layer {layer} was filled with")
        t0 = state.length
        keep = 0 if self.window is None else max(0, t0 - self.window)  # Q^U rows still read
        if state.saved_at is not None:
            keep = min(keep, state.saved_from)  # a rollback replays from there
        state.grow(t0 + C, keep)
        state.lookahead_queries(t0, t0 + C)[:] = qu
        state.kc[:, :, t0:t0 + C] = kc
        state.vc[:, :, t0:t0 + C] = vc
        state.u[:, :, t0:t0 + C] = 0
        if state.ku_log is not None:
            state.ku_log.append(ku.clone())
            state.vu_log.append(vu.clone())
        return state


def _update_lookahead(state: _LayerState, t0: int, ku: torch.Tensor, vu: torch.Tensor,
                      window: int, scale: float) -> None:
    """Adds the lookahead updates of the tokens at rows ``[t0, t0 + C)`` (their ``ku``, ``vu``
    given, their ``qu`` already cached) to the U rows ``[0, t0 + C)``: old rows gain
    ``G[old, new] V^U``, new rows become ``G[new, new] V^U``."""
    C = ku.shape[2]
    if C == 0:
        return
    sd = state.u.dtype
    first = 0 if window == NO_WINDOW else max(0, t0 - window)
    s = torch.arange(first, t0 + C, device=ku.device)
    r = torch.arange(t0, t0 + C, device=ku.device)
    logits = scale * state.lookahead_queries(first, t0 + C).to(sd) @ ku.to(sd).transpose(-1, -2)
    g = torch.where(_lookahead_allowed(s, r, window), torch.sigmoid(logits), 0.0)
    state.u[:, :, first:t0 + C] += g @ vu.to(sd)


# ---- chunked prefill and decode (the ``torch`` backends) -------------------------------------


def castle_chunk_reference(u: torch.Tensor, qu_cache: torch.Tensor, qu_base: int,
                           kc_cache: torch.Tensor, vc_cache: torch.Tensor, t0: int,
                           qc: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, window: int,
                           scale: float) -> torch.Tensor:
    """One step of the chunked formula for C new tokens at rows ``[t0, t0 + C)``, in place.

    ``u`` (state dtype), ``kc_cache`` and ``vc_cache`` are ``[B, H, capacity, D]`` whose rows
    ``[0, t0 + C)`` are filled, the new tokens' K^C, V^C included and their U rows zero;
    ``qu_cache`` row i holds the lookahead query of token ``qu_base + i`` (every token that
    the new ones write into, from ``t0 - window`` on, and the new ones). ``qc``, ``ku``,
    ``vu``: ``[B, H, C, D]``. Scores of the new queries against old keys use the cached U plus
    the in-chunk contributions ``A G^T``; then U gains the chunk's updates. Returns the new
    tokens' outputs ``[B, H, C, D]`` in qc's dtype.
    """
    sd = u.dtype
    C = qc.shape[2]
    first = 0 if window == NO_WINDOW else max(0, t0 - window)  # rows that can still change
    n = t0 + C
    q = qc.to(sd)
    pos_new = torch.arange(t0, n, device=qc.device)
    s = torch.arange(first, n, device=qc.device)
    a = torch.where(pos_new[:, None] >= pos_new[None, :], scale * q @ vu.to(sd).transpose(-1, -2),
                    0.0)  # A[t, r] over the chunk, r <= t
    g = torch.where(_lookahead_allowed(s, pos_new, window),
                    torch.sigmoid(scale * qu_cache[:, :, first - qu_base:n - qu_base].to(sd)
                                  @ ku.to(sd).transpose(-1, -2)),
                    0.0)  # G[s, r] for changing rows s, chunk tokens r
    su = scale * q @ u[:, :, :n].transpose(-1, -2)  # frozen part: cached U (new rows are 0)
    su[..., first:n] += a @ g.transpose(-1, -2)
    z = scale * q @ kc_cache[:, :, :n].to(sd).transpose(-1, -2) - F.silu(su)
    visible = torch.arange(n, device=qc.device)[None, :] <= pos_new[:, None]
    z = z.masked_fill(~visible, float("-inf"))
    out = torch.softmax(z, -1) @ vc_cache[:, :, :n].to(sd)
    u[:, :, first:n] += g @ vu.to(sd)
    return out.to(qc.dtype)


def castle_decode_reference(u, qu_cache, qu_base: int, kc_cache, vc_cache, t0: int, qc, ku, vu,
                            window: int, scale: float) -> torch.Tensor:
    """The ``torch`` backend of :func:`castle_decode`: the chunked formula with C = 1."""
    return castle_chunk_reference(u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku, vu,
                                  window, scale)


def _decode_triton(u, qu_cache, qu_base: int, kc_cache, vc_cache, t0: int, qc, ku, vu,
                   window: int, scale: float) -> torch.Tensor:
    from fastdecode.triton_kernels.castle.decode import castle_decode_triton

    return castle_decode_triton(u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku, vu, window,
                                scale)


register("castle_decode", "torch")(castle_decode_reference)
register("castle_decode", "triton")(_decode_triton)


@torch.library.custom_op("fastdecode::castle_decode", mutates_args=("u",))
def _castle_decode_op(u: torch.Tensor, qu_cache: torch.Tensor, qu_base: int,
                      kc_cache: torch.Tensor, vc_cache: torch.Tensor, t0: int, qc: torch.Tensor,
                      ku: torch.Tensor, vu: torch.Tensor, window: int, scale: float
                      ) -> torch.Tensor:
    return run("castle_decode", qc.device, u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku,
               vu, window, scale)


@_castle_decode_op.register_fake
def _(u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku, vu, window, scale):
    return torch.empty_like(qc)


def _check_step(cache: object, tensors: tuple, scale: float | None) -> tuple:
    if not isinstance(cache, CastleCache):
        raise TypeError(f"cache must be a CastleCache, found {type(cache).__name__}")
    tensors = _check_six(tensors, "[B, H, C, D]")
    return tensors, _check_scale(scale, tensors[0].shape[3])


def castle_decode(cache: CastleCache, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, *, layer: int = 0,
                  scale: float | None = None) -> torch.Tensor:
    """One decoding step of one layer: appends one token to ``cache`` and returns its output.

    The step appends the token's Q^U, K^C, V^C, adds the rank-1 update
    ``sigmoid(c Q^U k^U) v^U`` to every earlier lookahead key (with a window W only the last W
    rows), appends a zero lookahead key, and attends with ``qc`` over all cached tokens. The
    ``triton`` backend does the update and the attention in one pass over the cache.

    Args:
        cache: the :class:`CastleCache` (its window applies).
        qc, kc, vc, qu, ku, vu: ``[B, H, 1, D]``, one dtype (float16, bfloat16, float32 or
            float64) and device, matching the cache's B, H, D, dtype and device. Rotary
            embeddings, if any, are applied by the caller at absolute position
            ``cache.length(layer)``.
        layer: which layer of the cache.
        scale: ``c``, default ``1 / sqrt(D)``; must match earlier calls on this layer.

    Returns:
        ``[B, H, 1, D]``, the inputs' dtype.
    """
    (qc, kc, vc, qu, ku, vu), scale = _check_step(cache, (qc, kc, vc, qu, ku, vu), scale)
    if qc.shape[2] != 1:
        raise ValueError(f"castle_decode takes one token (C = 1), found qc shape "
                         f"{tuple(qc.shape)}; use castle_prefill for more")
    state = cache._append(layer, qc, kc, vc, qu, ku, vu, scale)
    t0 = state.length
    out = dispatch("castle_decode", _castle_decode_op, qc.device, state.u, state.qu,
                   state.qu_base, state.kc, state.vc, t0, qc, ku, vu, cache._w(), scale)
    state.length = t0 + 1
    return out


def castle_prefill(cache: CastleCache, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                   qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, *, layer: int = 0,
                   scale: float | None = None) -> torch.Tensor:
    """Appends C >= 1 tokens to one layer of ``cache`` and returns their outputs: a prompt's
    prefill, a chunk of it, or the C draft tokens of a speculative step (roll back with
    :meth:`CastleCache.checkpoint` / :meth:`CastleCache.crop`).

    Into an empty layer, :func:`castle_attention` runs (any backend, O(C^2 D)) and its final
    lookahead keys fill the cache. Otherwise the chunked formula runs in steps of
    ``PREFILL_CHUNK`` tokens: new queries score old keys with the cached U plus the in-chunk
    terms, then U gains the chunk's updates (with a window W only its last W rows change).

    Args: as :func:`castle_decode`, with ``[B, H, C, D]`` tensors.

    Returns:
        ``[B, H, C, D]``, the inputs' dtype.
    """
    (qc, kc, vc, qu, ku, vu), scale = _check_step(cache, (qc, kc, vc, qu, ku, vu), scale)
    C = qc.shape[2]
    if C == 0:
        raise ValueError(f"castle_prefill needs C >= 1 tokens, found qc shape {tuple(qc.shape)}")
    window = cache._w()
    if cache.length(layer) == 0 and C > 1:
        out, _, ul = dispatch("castle_attention", _castle_attention_op, qc.device, qc, kc, vc,
                              qu, ku, vu, window, scale)
        state = cache._append(layer, qc, kc, vc, qu, ku, vu, scale)
        state.u[:, :, :C] = ul
        state.length = C
        return out
    outs = []
    for start in range(0, C, PREFILL_CHUNK):
        part = slice(start, min(C, start + PREFILL_CHUNK))
        q, k, v, qu_, ku_, vu_ = (x[:, :, part] for x in (qc, kc, vc, qu, ku, vu))
        state = cache._append(layer, q, k, v, qu_, ku_, vu_, scale)
        t0 = state.length
        outs.append(castle_chunk_reference(state.u, state.qu, state.qu_base, state.kc,
                                           state.vc, t0, q, ku_, vu_, window, scale))
        state.length = t0 + q.shape[2]
    return torch.cat(outs, 2)
