"""The UQ-KV cache of CASTLE (:class:`CastleCache`) and the steps that append tokens to it:
:func:`castle_decode` (one token; the ``triton`` backend fuses the rank-1 update of U with the
attention) and :func:`castle_prefill` (any number of tokens: a prompt, or the draft tokens of a
speculative step, rolled back by :meth:`CastleCache.crop` after :meth:`CastleCache.checkpoint`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode._backend import dispatch
from fastdecode.ops import _validate
from fastdecode.ops.castle.chunked import castle_chunk_reference
from fastdecode.ops.castle.contract import (
    NO_WINDOW,
    check_scale,
    check_six,
    lookahead_allowed,
    state_dtype,
)
from fastdecode.ops.castle.op import castle_attention_op, castle_decode_op

PREFILL_CHUNK = 64
"""The chunked formula's tokens per step: bounds its C x C x t term."""


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
            sd = state_dtype(qc.dtype)
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
    g = torch.where(lookahead_allowed(s, r, window), torch.sigmoid(logits), 0.0)
    state.u[:, :, first:t0 + C] += g @ vu.to(sd)


def _check_step(cache: object, tensors: tuple, scale: float | None) -> tuple:
    if not isinstance(cache, CastleCache):
        raise TypeError(f"cache must be a CastleCache, found {type(cache).__name__}")
    tensors = check_six(tensors, "[B, H, C, D]")
    return tensors, check_scale(scale, tensors[0].shape[3])


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
    out = dispatch("castle_decode", castle_decode_op, qc.device, state.u, state.qu,
                   state.qu_base, state.kc, state.vc, t0, qc, ku, vu, cache._w(), scale)
    state.length = t0 + 1
    return out


def castle_prefill(cache: CastleCache, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                   qu: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor, *, layer: int = 0,
                   scale: float | None = None) -> torch.Tensor:
    """Appends C >= 1 tokens to one layer of ``cache`` and returns their outputs: a prompt's
    prefill, a chunk of it, or the C draft tokens of a speculative step (roll back with
    :meth:`CastleCache.checkpoint` / :meth:`CastleCache.crop`).

    Into an empty layer, :func:`~fastdecode.ops.castle.attention.castle_attention` runs (any
    backend, O(C^2 D)) and its final lookahead keys fill the cache. Otherwise the chunked
    formula runs in steps of ``PREFILL_CHUNK`` tokens: new queries score old keys with the
    cached U plus the in-chunk terms, then U gains the chunk's updates (with a window W only its
    last W rows change).

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
        out, _, ul = dispatch("castle_attention", castle_attention_op, qc.device, qc, kc, vc,
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
