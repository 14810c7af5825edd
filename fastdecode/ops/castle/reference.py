"""The test oracles of CASTLE's parallel form, registered as no backend: Theorem 1 of the paper
with dense L x L matrices and its chain rule (:func:`castle_attention_reference`,
:func:`castle_attention_backward_reference`, O(L^3) for the lookahead scores), and the literal
definition that rebuilds every lookahead key at every step (:func:`castle_attention_naive`,
O(L^3 D)). Tensors are ``[B, H, L, D]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.ops.castle.contract import (
    check_scale,
    check_six,
    check_window,
    lookahead_allowed,
    state_dtype,
)


def _dense_forward(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qu: torch.Tensor,
                   ku: torch.Tensor, vu: torch.Tensor, window: int, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Theorem 1 in the state dtype: returns ``(out, lse, ul)`` where ``lse`` ``[B, H, L]`` is
    the natural-log softmax normaliser of each row and ``ul`` ``[B, H, L, D]`` the final
    lookahead keys ``U^L = G V^U``."""
    sd = state_dtype(qc.dtype)
    qc, kc, vc, qu, ku, vu = (x.to(sd) for x in (qc, kc, vc, qu, ku, vu))
    L = qc.shape[2]
    pos = torch.arange(L, device=qc.device)
    low = pos[:, None] >= pos[None, :]
    a = torch.where(low, scale * qc @ vu.transpose(-1, -2), 0.0)  # A[t, r], r <= t
    g = torch.where(lookahead_allowed(pos, pos, window),
                    torch.sigmoid(scale * qu @ ku.transpose(-1, -2)), 0.0)  # G[s, r]
    su = a @ g.transpose(-1, -2)  # S^U[t, s]: zero for s >= t
    z = torch.where(low, scale * qc @ kc.transpose(-1, -2) - F.silu(su), float("-inf"))
    lse = torch.logsumexp(z, -1)
    out = torch.exp(z - lse[..., None]) @ vc
    return out, lse, g @ vu


def castle_attention_reference(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                               qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, window: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense reference forward (the test oracle) on ``[B, H, L, D]`` inputs, ``window``
    :data:`~fastdecode.ops.castle.contract.NO_WINDOW` or W >= 0: ``(out, lse, ul)``, out in the
    inputs' dtype, ``lse`` and ``ul`` in the state dtype (see :func:`_dense_forward`)."""
    out, lse, ul = _dense_forward(qc, kc, vc, qu, ku, vu, window, scale)
    return out.to(qc.dtype), lse, ul


def castle_attention_backward_reference(dout: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor,
                                        vc: torch.Tensor, qu: torch.Tensor, ku: torch.Tensor,
                                        vu: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                        ul: torch.Tensor, window: int, scale: float
                                        ) -> tuple[torch.Tensor, ...]:
    """The dense reference backward (the test oracle): the gradients of the six inputs by the
    dense formulas of Theorem 1's chain rule, computed in the state dtype and returned in
    ``dout``'s (the probabilities are recomputed, so ``out``, ``lse`` and ``ul`` go unused)."""
    sd = state_dtype(qc.dtype)
    qc, kc, vc, qu, ku, vu, do = (x.to(sd) for x in (qc, kc, vc, qu, ku, vu, dout))
    L = qc.shape[2]
    pos = torch.arange(L, device=qc.device)
    low = pos[:, None] >= pos[None, :]
    allowed = lookahead_allowed(pos, pos, window)
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


def castle_attention_naive(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                           qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, *,
                           window: int | None = None, scale: float | None = None
                           ) -> torch.Tensor:
    """The literal recurrent definition, a test oracle: for every t it rebuilds the lookahead keys
    ``U^t`` of the first t+1 tokens from scratch and computes output row t alone (O(L^3 D)).
    Same arguments and result as
    :func:`~fastdecode.ops.castle.attention.castle_attention` (computed in fp64, returned in the
    inputs' dtype); not differentiable through a kernel, but plain autograd works."""
    tensors = check_six((qc, kc, vc, qu, ku, vu), "[B, H, L, D]")
    w = check_window(window)
    c = check_scale(scale, qc.shape[3])
    qc64, kc64, vc64, qu64, ku64, vu64 = (x.double() for x in tensors)
    rows = []
    for t in range(qc.shape[2]):
        pos = torch.arange(t + 1, device=qc.device)
        logits = c * qu64[:, :, :t + 1] @ ku64[:, :, :t + 1].transpose(-1, -2)
        g = torch.where(lookahead_allowed(pos, pos, w), torch.sigmoid(logits), 0.0)
        u = g @ vu64[:, :, :t + 1]  # [B, H, t+1, D], row t is zero
        q = qc64[:, :, t:t + 1]  # [B, H, 1, D]
        z = c * q @ kc64[:, :, :t + 1].transpose(-1, -2) - F.silu(c * q @ u.transpose(-1, -2))
        rows.append(torch.softmax(z, -1) @ vc64[:, :, :t + 1])
    return torch.cat(rows, 2).to(qc.dtype)
