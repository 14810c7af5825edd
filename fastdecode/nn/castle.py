"""``CastleAttention``: a multi-head CASTLE attention layer (causal attention with lookahead keys)
over the ops of :mod:`fastdecode.ops.castle`, for training (whole sequences) and for decoding
with a :class:`~fastdecode.ops.CastleCache`."""

from __future__ import annotations

import torch
from torch import nn

from fastdecode.ops import CastleCache, castle_attention, castle_decode, castle_prefill
from fastdecode.ops import _validate

PROJECTIONS = ("qc", "kc", "vc", "qu", "ku", "vu")
"""The six per-head projections, in the order they are stacked in ``CastleAttention.proj``."""


def rotate(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[B, H, T, D]`` at absolute positions
    ``start .. start + T - 1``: each pair ``(x[..., i], x[..., i + D/2])`` turns by the angle
    ``position * theta ** (-2 i / D)``; computed in fp32, returned in x's dtype."""
    T, D = x.shape[2], x.shape[3]
    half = D // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / D)
    angle = torch.arange(start, start + T, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class CastleAttention(nn.Module):
    """Multi-head CASTLE attention: ``[B, T, d_model] -> [B, T, d_model]``.

    Each token gets six head projections (one fused ``Linear(d_model, 6 * n_heads * head_dim)``,
    stacked in the order of :data:`PROJECTIONS`: causal query, causal key, value, lookahead
    query, lookahead key, lookahead value), the heads run :func:`fastdecode.ops.castle_attention`
    and ``out`` (``Linear(n_heads * head_dim, d_model)``) projects them back. That is
    ``7 * n_heads * head_dim * d_model`` weights against standard attention's 4: the paper
    matches parameters with about 4/7 of the heads (9 against 16).

    Rotary embeddings (``rope=True``) turn the queries and keys of both scores at absolute
    positions: q^C and k^C (so ``q^C_t . k^C_s`` depends on t - s) and q^U and k^U (so the
    lookahead weights ``sigmoid(q^U_s . k^U_r)`` depend on r - s); the values v^C and v^U are
    not rotated, so ``q^C_t . u_s`` mixes content only. The decoding path rotates the new tokens
    at ``cache.length(layer_idx)`` onward, so both paths see the same positions.

    Args:
        d_model: model width.
        n_heads: heads.
        head_dim: per-head width, a multiple of 16 in [16, 256].
        window: None for full lookahead, or W >= 0 for CASTLE-SWL.
        rope: apply rotary embeddings as above.
        bias: biases on the projections.
        rope_theta: the rotary base.
        layer_idx: which layer of a shared :class:`~fastdecode.ops.CastleCache` this is.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, window: int | None = None,
                 rope: bool = True, bias: bool = False, rope_theta: float = 10000.0,
                 layer_idx: int = 0) -> None:
        super().__init__()
        _validate.integer("d_model", d_model, 1)
        _validate.integer("n_heads", n_heads, 1)
        _validate.integer("head_dim", head_dim, 16, 256)
        if head_dim % 16:
            raise ValueError(f"head_dim must be a multiple of 16, found {head_dim}")
        if window is not None:
            _validate.integer("window", window, 0)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.window, self.rope, self.rope_theta = window, rope, rope_theta
        self.layer_idx = _validate.integer("layer_idx", layer_idx, 0)
        self.proj = nn.Linear(d_model, 6 * n_heads * head_dim, bias=bias)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, rope={self.rope}")

    def projections(self, x: torch.Tensor, start: int) -> list[torch.Tensor]:
        """The six ``[B, n_heads, T, head_dim]`` projections of ``x`` ``[B, T, d_model]`` (order
        of :data:`PROJECTIONS`), rotated at positions ``start ..`` when ``rope`` is set."""
        B, T, _ = x.shape
        parts = self.proj(x).view(B, T, 6, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qc, kc, vc, qu, ku, vu = parts.unbind(0)
        if self.rope:
            qc, kc, qu, ku = (rotate(t, start, self.rope_theta) for t in (qc, kc, qu, ku))
        return [qc, kc, vc, qu, ku, vu]

    def forward(self, x: torch.Tensor, cache: CastleCache | None = None) -> torch.Tensor:
        """``x`` ``[B, T, d_model]`` -> ``[B, T, d_model]``.

        Without ``cache``: the T tokens are a whole sequence (training; differentiable). With
        ``cache``: they follow the ``cache.length(layer_idx)`` cached tokens, which the call
        extends (one token takes the fused decode step, more the chunked prefill); the cache's
        window must be the layer's.
        """
        _validate.tensor("x", x, None, 3, "[B, T, d_model]")
        if x.shape[2] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model={self.d_model}], found "
                             f"{tuple(x.shape)}")
        B, T, _ = x.shape
        if cache is None:
            heads = castle_attention(*self.projections(x, 0), window=self.window)
        else:
            if not isinstance(cache, CastleCache):
                raise TypeError(f"cache must be a CastleCache, found {type(cache).__name__}")
            if cache.window != self.window:
                raise ValueError(f"the cache's window {cache.window} differs from the layer's "
                                 f"{self.window}")
            parts = self.projections(x, cache.length(self.layer_idx))
            step = castle_decode if T == 1 else castle_prefill
            heads = step(cache, *parts, layer=self.layer_idx)
        return self.out(heads.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
