"""The n-gram pool of Jacobi lookahead decoding: a fixed-size, device-resident LRU cache of
n-grams seen in the prompt and harvested from the Jacobi window, looked up by their first token
to draft N-1 tokens ahead. Every update and lookup runs on the pool's device without a host
sync (see :mod:`fastdecode.ops.ngram` for the ops and their exact semantics)."""

from __future__ import annotations

import torch

from fastdecode.ops import _validate
from fastdecode.ops.ngram import (
    MAX_VOCAB,
    ngram_harvest,
    ngram_insert,
    ngram_insert_sequence,
    ngram_lookup,
)


class NGramPool:
    """Per batch row, at most G n-grams per first token, most recently used first.

    Storage is dense and fixed (llama.cpp style), allocated once:
      * ``tokens`` int32 ``[B, V, G, N-1]``: ``tokens[b, v, g]`` is entry g of key v (the N-1
        tokens that followed v), entry 0 the most recently used;
      * ``count`` int32 ``[B, V]``: entries ``0 .. count[b, v] - 1`` of key v are in use.
    :attr:`nbytes` is exactly ``B * V * (G * (N-1) + 1) * 4``, however many n-grams go in:
    a key holding G entries drops its least recently used one for a new one.

    Inserting an n-gram already in the pool moves it to the front of its key. Keys and value
    tokens outside ``[0, V)`` are skipped, not reported (reporting would need a host sync).
    With ``g == 0`` the pool stores nothing and every lookup finds 0 candidates.

    Args:
        batch: B, the batch rows (each has its own pool).
        vocab_size: V, keys and tokens lie in ``[0, V)``; at most 2^31 - 1.
        n: N >= 2, the n-gram length (a key and N-1 following tokens).
        g: G >= 0, the entries kept per key.
        device: where the pool lives; every tensor passed to a method must be there.
    """

    def __init__(self, batch: int, vocab_size: int, n: int, g: int,
                 device: torch.device | str) -> None:
        self.batch = _validate.integer("batch", batch, 0)
        self.vocab_size = _validate.integer("vocab_size", vocab_size, 1, MAX_VOCAB)
        self.n = _validate.integer("n", n, 2)
        self.g = _validate.integer("g", g, 0)
        self.tokens = torch.zeros(batch, vocab_size, g, n - 1, dtype=torch.int32, device=device)
        self.count = torch.zeros(batch, vocab_size, dtype=torch.int32, device=device)
        self.device = self.tokens.device

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's storage: ``B * V * (G * (N-1) + 1) * 4``."""
        return self.tokens.nbytes + self.count.nbytes

    def insert(self, keys: torch.Tensor, values: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Inserts M n-grams per row, in order ``m = 0 .. M-1``.

        Args:
            keys: int64 ``[B, M]``, each n-gram's first token.
            values: int64 ``[B, M, N-1]``, its other tokens.
            valid: bool or uint8 ``[B, M]``: only nonzero entries are inserted (None: all).
        """
        ngram_insert(self.tokens, self.count, keys, values, valid)

    def harvest(self, window: torch.Tensor, new_tokens: torch.Tensor) -> None:
        """Inserts the n-grams a Jacobi step completed: for each column j in order, key
        ``window[b, 0, j]`` and value ``(window[b, 1, j], ..., window[b, N-2, j],
        new_tokens[b, j])``.

        Args:
            window: int64 ``[B, N-1, W]``, the Jacobi window (level l, column j);
                ``window[:, 0, 0]`` is the current last token.
            new_tokens: int64 ``[B, W]``, the model's argmax at the newest level.
        """
        ngram_harvest(self.tokens, self.count, window, new_tokens)

    def insert_sequence(self, tokens: torch.Tensor, start: torch.Tensor,
                        end: torch.Tensor) -> None:
        """Inserts every n-gram of ``tokens[b, start[b]:end[b]]`` per row (the range clipped
        to ``[0, L)``), in order of its first position.

        Args:
            tokens: int64 ``[B, L]``, e.g. the prompt.
            start, end: int64 ``[B]``.
        """
        ngram_insert_sequence(self.tokens, self.count, tokens, start, end)

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries of one key per row; the pool is not changed (not even the LRU order).

        Args:
            keys: int64 ``[B]``, e.g. each row's last token.

        Returns:
            ``(candidates, count)``: int64 ``[B, G, N-1]``, the key's entries most recently
            used first, then rows of -1; int64 ``[B]``, the number of entries (0 for a key
            outside ``[0, V)``).
        """
        return ngram_lookup(self.tokens, self.count, keys)

    def reset(self) -> None:
        """Empties the pool (every key's count becomes 0); the storage is kept."""
        self.count.zero_()
