"""The n-gram pool of Jacobi lookahead decoding, as in-place ops on its two tensors.

A pool of B batch rows, vocabulary size V, n-gram length N >= 2 and G >= 0 entries per key is
  * ``pool_tokens`` int32 ``[B, V, G, N-1]``: ``pool_tokens[b, v, g]`` is entry g of key v,
  * ``pool_count`` int32 ``[B, V]``: entries ``0 .. pool_count[b, v] - 1`` of key v are in use,
both contiguous (:class:`fastdecode.decoding.NGramPool` owns a pair). Entry 0 is the most
recently used; slots past the count hold stale tokens that no lookup returns.

Inserting ``(key, value)`` (value: N-1 tokens) into row b: when value is an entry of key, it
moves to the front; otherwise it goes in at the front, and when key already holds G entries the
last (least recently used) one is dropped. The insertions of one call are applied in order per
row, so the result is the same on every backend. An insertion is skipped when the key or any
value token is outside ``[0, V)`` (tokens are stored as int32; nothing outside the pool is
touched), and always when G == 0.

The ops never sync with the host: keys and tokens are not checked against V (out-of-range ones
are skipped), so a decoding step runs under CUDA graphs and ``torch.compile(fullgraph=True)``.

This file holds each op's plain-torch reference (the ``torch`` backend, a slow Python loop),
its C++/CUDA launchers, its ``torch.library`` registration and its public, validated entry point.
"""

from __future__ import annotations

import torch

from fastdecode import _native
from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate

MAX_VOCAB = 2**31 - 1
"""Largest vocabulary size V: tokens are stored as int32."""


# ---- plain-torch references (the ``torch`` backend) ---------------------------------------


def _insert_one(pool_tokens: torch.Tensor, pool_count: torch.Tensor, b: int, key: int,
                value: torch.Tensor) -> None:
    """Inserts the n-gram ``(key, value)`` (value: int64 ``[N-1]``) into row b."""
    _, V, G, _ = pool_tokens.shape
    if G == 0 or not 0 <= key < V or bool(((value < 0) | (value >= V)).any()):
        return
    entries = pool_tokens[b, key]  # [G, N-1], a view
    used = min(max(int(pool_count[b, key]), 0), G)
    same = (entries[:used] == value).all(dim=1).nonzero()
    hit = int(same[0, 0]) if len(same) else -1
    front = hit if hit >= 0 else min(used, G - 1)  # entries 0 .. front-1 move one slot back
    entries[1:front + 1] = entries[:front].clone()
    entries[0] = value
    pool_count[b, key] = used if hit >= 0 else min(used + 1, G)


def ngram_insert_reference(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                           keys: torch.Tensor, values: torch.Tensor,
                           valid: torch.Tensor | None) -> None:
    """Plain-torch :func:`ngram_insert`: one insertion at a time."""
    B, M = keys.shape
    for b in range(B):
        for m in range(M):
            if valid is None or bool(valid[b, m]):
                _insert_one(pool_tokens, pool_count, b, int(keys[b, m]), values[b, m])


def ngram_harvest_reference(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                            window: torch.Tensor, new_tokens: torch.Tensor) -> None:
    """Plain-torch :func:`ngram_harvest`: builds the n-grams, then inserts them."""
    values = torch.cat([window[:, 1:, :], new_tokens[:, None, :]], dim=1).transpose(1, 2)
    ngram_insert_reference(pool_tokens, pool_count, window[:, 0, :], values, None)


def ngram_insert_sequence_reference(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                                    tokens: torch.Tensor, start: torch.Tensor,
                                    end: torch.Tensor) -> None:
    """Plain-torch :func:`ngram_insert_sequence`: one n-gram at a time."""
    B, L = tokens.shape
    n = pool_tokens.shape[3] + 1
    for b in range(B):
        lo, hi = max(int(start[b]), 0), min(int(end[b]), L)
        for i in range(lo, hi - n + 1):
            _insert_one(pool_tokens, pool_count, b, int(tokens[b, i]), tokens[b, i + 1:i + n])


def ngram_lookup_reference(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                           keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`ngram_lookup`: gathers each row's entries of its key."""
    B, V, G, _ = pool_tokens.shape
    rows = torch.arange(B, device=keys.device)
    known = (keys >= 0) & (keys < V)
    key = torch.where(known, keys, 0)
    count = torch.where(known, pool_count[rows, key].long().clamp(0, G), 0)
    live = torch.arange(G, device=keys.device) < count[:, None]  # [B, G]
    candidates = torch.where(live[:, :, None], pool_tokens[rows, key].long(), -1)
    return candidates, count


register("ngram_insert", "torch")(ngram_insert_reference)
register("ngram_harvest", "torch")(ngram_harvest_reference)
register("ngram_insert_sequence", "torch")(ngram_insert_sequence_reference)
register("ngram_lookup", "torch")(ngram_lookup_reference)


# ---- C++ (``cpu``) and CUDA (``cuda``) launchers --------------------------------------------


def _pool(pool_tokens: torch.Tensor, pool_count: torch.Tensor) -> tuple[int, ...]:
    """The pool's pointers and sizes ``(tokens, count, B, V, G, N-1)``, the first arguments of
    every n-gram op of ``_C``."""
    return (pool_tokens.data_ptr(), pool_count.data_ptr(), *pool_tokens.shape)


def _insert_native(pool_tokens: torch.Tensor, pool_count: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, valid: torch.Tensor | None) -> None:
    _native.launch(_native._C.ngram_insert, pool_tokens, *_pool(pool_tokens, pool_count),
                   keys.data_ptr(), values.data_ptr(), 0 if valid is None else valid.data_ptr(),
                   keys.shape[1])


def _harvest_native(pool_tokens: torch.Tensor, pool_count: torch.Tensor, window: torch.Tensor,
                    new_tokens: torch.Tensor) -> None:
    _native.launch(_native._C.ngram_harvest, pool_tokens, *_pool(pool_tokens, pool_count),
                   window.data_ptr(), new_tokens.data_ptr(), new_tokens.shape[1])


def _insert_sequence_native(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                            tokens: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
    _native.launch(_native._C.ngram_insert_sequence, pool_tokens,
                   *_pool(pool_tokens, pool_count), tokens.data_ptr(), tokens.shape[1],
                   start.data_ptr(), end.data_ptr())


def _lookup_native(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                   keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, G, n1 = pool_tokens.shape
    candidates = keys.new_empty(B, G, n1)
    count = keys.new_empty(B)
    _native.launch(_native._C.ngram_lookup, pool_tokens, *_pool(pool_tokens, pool_count),
                   keys.data_ptr(), candidates.data_ptr(), count.data_ptr())
    return candidates, count


for _backend_name in ("cpu", "cuda"):
    register("ngram_insert", _backend_name)(_insert_native)
    register("ngram_harvest", _backend_name)(_harvest_native)
    register("ngram_insert_sequence", _backend_name)(_insert_sequence_native)
    register("ngram_lookup", _backend_name)(_lookup_native)


# ---- torch.library registration (opaque to torch.compile, with fake implementations) -------


@torch.library.custom_op("fastdecode::ngram_insert", mutates_args=("pool_tokens", "pool_count"))
def _ngram_insert_op(pool_tokens: torch.Tensor, pool_count: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, valid: torch.Tensor | None) -> None:
    run("ngram_insert", pool_tokens.device, pool_tokens, pool_count, keys, values, valid)


@_ngram_insert_op.register_fake
def _(pool_tokens, pool_count, keys, values, valid):
    return None


@torch.library.custom_op("fastdecode::ngram_harvest", mutates_args=("pool_tokens", "pool_count"))
def _ngram_harvest_op(pool_tokens: torch.Tensor, pool_count: torch.Tensor, window: torch.Tensor,
                      new_tokens: torch.Tensor) -> None:
    run("ngram_harvest", pool_tokens.device, pool_tokens, pool_count, window, new_tokens)


@_ngram_harvest_op.register_fake
def _(pool_tokens, pool_count, window, new_tokens):
    return None


@torch.library.custom_op("fastdecode::ngram_insert_sequence",
                         mutates_args=("pool_tokens", "pool_count"))
def _ngram_insert_sequence_op(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                              tokens: torch.Tensor, start: torch.Tensor,
                              end: torch.Tensor) -> None:
    run("ngram_insert_sequence", pool_tokens.device, pool_tokens, pool_count, tokens, start, end)


@_ngram_insert_sequence_op.register_fake
def _(pool_tokens, pool_count, tokens, start, end):
    return None


@torch.library.custom_op("fastdecode::ngram_lookup", mutates_args=())
def _ngram_lookup_op(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return run("ngram_lookup", pool_tokens.device, pool_tokens, pool_count, keys)


@_ngram_lookup_op.register_fake
def _(pool_tokens, pool_count, keys):
    B, _, G, n1 = pool_tokens.shape
    return keys.new_empty(B, G, n1), keys.new_empty(B)


# ---- public, validated entry points ---------------------------------------------------------


def _check_pool(pool_tokens: object, pool_count: object) -> tuple[int, int, int, int]:
    """Checks a pool's two tensors (see the module docstring); returns ``(B, V, G, N-1)``."""
    _validate.tensor("pool_tokens", pool_tokens, torch.int32, 4, "[B, V, G, N-1]")
    B, V, G, n1 = pool_tokens.shape
    _validate.tensor("pool_count", pool_count, torch.int32, 2, "[B, V]")
    _validate.shape("pool_count", pool_count, (B, V), "[B, V]")
    if not 1 <= V <= MAX_VOCAB or n1 < 1:
        raise ValueError("pool_tokens must have V in [1, 2^31 - 1] and N-1 >= 1, found shape "
                         f"{tuple(pool_tokens.shape)}")
    for name, t in (("pool_tokens", pool_tokens), ("pool_count", pool_count)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the pool is updated in place)")
    return B, V, G, n1


def _same_device(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                 named: list[tuple[str, torch.Tensor]]) -> None:
    _validate.same_device([("pool_tokens", pool_tokens), ("pool_count", pool_count), *named])


def ngram_insert(pool_tokens: torch.Tensor, pool_count: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """Inserts M n-grams per batch row into the pool, in place, in order m = 0 .. M-1.

    Args:
        pool_tokens, pool_count: the pool (see the module docstring).
        keys: int64 ``[B, M]``, the first token of each n-gram.
        values: int64 ``[B, M, N-1]``, the n-gram's other tokens, in order.
        valid: bool or uint8 ``[B, M]`` (nonzero: insert), or None to insert all.

    Keys or value tokens outside ``[0, V)`` skip their insertion (no error, no host sync).
    """
    B, _, _, n1 = _check_pool(pool_tokens, pool_count)
    _validate.tensor("keys", keys, torch.int64, 2, "[B, M]")
    M = keys.shape[1]
    _validate.shape("keys", keys, (B, M), "[B, M]")
    _validate.tensor("values", values, torch.int64, 3, "[B, M, N-1]")
    _validate.shape("values", values, (B, M, n1), "[B, M, N-1]")
    named = [("keys", keys), ("values", values)]
    if valid is not None:
        _validate.tensor("valid", valid, None, 2, "[B, M]")
        if valid.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"valid must have dtype torch.bool or torch.uint8, found {valid.dtype}")
        _validate.shape("valid", valid, (B, M), "[B, M]")
        named.append(("valid", valid))
        valid = valid.contiguous()
    _same_device(pool_tokens, pool_count, named)
    dispatch("ngram_insert", _ngram_insert_op, pool_tokens.device, pool_tokens, pool_count,
             keys.contiguous(), values.contiguous(), valid)


def ngram_harvest(pool_tokens: torch.Tensor, pool_count: torch.Tensor, window: torch.Tensor,
                  new_tokens: torch.Tensor) -> None:
    """Inserts the n-grams that a Jacobi step completed, in place: one per window column.

    Args:
        pool_tokens, pool_count: the pool (see the module docstring).
        window: int64 ``[B, N-1, W]``, the Jacobi window: level l, column j;
            ``window[:, 0, 0]`` is the current last token.
        new_tokens: int64 ``[B, W]``, the model's argmax at the newest level.

    For each column ``j = 0 .. W-1`` in order, inserts the key ``window[b, 0, j]`` with value
    ``(window[b, 1, j], ..., window[b, N-2, j], new_tokens[b, j])``; one fused kernel.
    """
    B, _, _, n1 = _check_pool(pool_tokens, pool_count)
    _validate.tensor("window", window, torch.int64, 3, "[B, N-1, W]")
    W = window.shape[2]
    _validate.shape("window", window, (B, n1, W), "[B, N-1, W]")
    _validate.tensor("new_tokens", new_tokens, torch.int64, 2, "[B, W]")
    _validate.shape("new_tokens", new_tokens, (B, W), "[B, W]")
    _same_device(pool_tokens, pool_count, [("window", window), ("new_tokens", new_tokens)])
    dispatch("ngram_harvest", _ngram_harvest_op, pool_tokens.device, pool_tokens, pool_count,
             window.contiguous(), new_tokens.contiguous())


def ngram_insert_sequence(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                          tokens: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
    """Inserts every n-gram of a token sequence per batch row, in place, in order of position.

    Args:
        pool_tokens, pool_count: the pool (see the module docstring).
        tokens: int64 ``[B, L]``, e.g. the prompt.
        start, end: int64 ``[B]``: row b's n-grams lie in ``tokens[b, start[b]:end[b]]``
            (the range is clipped to ``[0, L)``; an empty or inverted range inserts nothing).

    For ``i = start .. end-N`` in order: key ``tokens[b, i]``, value ``tokens[b, i+1 .. i+N-1]``.
    """
    B, _, _, _ = _check_pool(pool_tokens, pool_count)
    _validate.tensor("tokens", tokens, torch.int64, 2, "[B, L]")
    _validate.shape("tokens", tokens, (B, tokens.shape[1]), "[B, L]")
    for name, t in (("start", start), ("end", end)):
        _validate.tensor(name, t, torch.int64, 1, "[B]")
        _validate.shape(name, t, (B,), "[B]")
    _same_device(pool_tokens, pool_count, [("tokens", tokens), ("start", start), ("end", end)])
    dispatch("ngram_insert_sequence", _ngram_insert_sequence_op, pool_tokens.device, pool_tokens,
             pool_count, tokens.contiguous(), start.contiguous(), end.contiguous())


def ngram_lookup(pool_tokens: torch.Tensor, pool_count: torch.Tensor,
                 keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's entries of one key per batch row (the pool is not changed).

    Args:
        pool_tokens, pool_count: the pool (see the module docstring).
        keys: int64 ``[B]``, e.g. the last accepted token of each row.

    Returns:
        ``(candidates, count)`` on the pool's device: int64 ``[B, G, N-1]``, the key's
        entries most recently used first, then rows of -1; and int64 ``[B]``, the number of
        entries (0 for a key outside ``[0, V)``).
    """
    B, _, _, _ = _check_pool(pool_tokens, pool_count)
    _validate.tensor("keys", keys, torch.int64, 1, "[B]")
    _validate.shape("keys", keys, (B,), "[B]")
    _same_device(pool_tokens, pool_count, [("keys", keys)])
    return dispatch("ngram_lookup", _ngram_lookup_op, pool_tokens.device, pool_tokens,
                    pool_count, keys.contiguous())
