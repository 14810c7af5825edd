"""The ``torch`` backend of the cache's steps: the chunked formula that appends C tokens to a
UQ-KV cache (:func:`castle_chunk_reference`; ``castle_prefill`` runs it on a non-empty layer)
and the decode step, the same with C = 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.ops.castle.contract import NO_WINDOW, lookahead_allowed


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
    g = torch.where(lookahead_allowed(s, pos_new, window),
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


def castle_decode_reference(u: torch.Tensor, qu_cache: torch.Tensor, qu_base: int,
                            kc_cache: torch.Tensor, vc_cache: torch.Tensor, t0: int,
                            qc: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, window: int,
                            scale: float) -> torch.Tensor:
    """The ``torch`` backend of :func:`~fastdecode.ops.castle.cache.castle_decode`: the chunked
    formula with C = 1."""
    return castle_chunk_reference(u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku, vu,
                                  window, scale)
