"""The ``torch`` backend of CASTLE's parallel form: a forward and a hand-written backward in
plain torch on any device, blocked over key and row blocks like the Triton kernels, with an
online softmax. O(L^2 D) time, O(L (D + block)) extra memory, no L x L matrix. Tensors are
``[B, H, L, D]``; the state is fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.ops.castle.contract import NO_WINDOW, state_dtype

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
    as :func:`~fastdecode.ops.castle.reference.castle_attention_reference` returns them
    (contiguous), in O(L^2 D) time.

    Inputs ``[B, H, L, D]`` (any dtype of :data:`~fastdecode.ops.castle.contract.DTYPES`)
    are padded to ``N = ceil(L / block)`` blocks in the state dtype. Key block j at a time, it
    builds ``D_j`` for every row block below as a prefix sum of ``G_ji V^U_i``, forms the score
    blocks (:class:`_Column`) and folds them into the rows' online-softmax state. Extra memory:
    the padded inputs, the output accumulator and one column's tiles, ``O(L (D + block))`` per
    batch row and head; no L x L matrix."""
    sd = state_dtype(qc.dtype)
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
    sd = state_dtype(qc.dtype)
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
