"""Jacobi lookahead decoding: a 2-D lookahead window of W columns by N-1 levels, refreshed by
one Jacobi iteration per step, whose columns feed an n-gram pool; the pool's n-grams that start
with the last token are verified as drafts in the same forward.

One step's tree (node indices in this order):
  * node 0: the last accepted token x (level 0, column 0 of the window);
  * g candidate chains of k <= N-1 tokens each (the pool's n-grams for x), hanging from x;
  * the window (when on): level 0, columns 1..W-1 (a chain from x), then levels 1..N-2,
    columns 0..W-1, where (level l, column j) hangs from (level l-1, column j). Every window
    token thus sees exactly one token per position before it, a causal chain.
Only the candidates are verified; duplicate prefixes among them are merged into a trie first,
so siblings carry distinct tokens and sampling stays exact. The window's newest level is
replaced by the argmax at its nodes, each column yields one n-gram (key = level 0 token), and
the window shifts up one level. The pool also takes every n-gram of the prompt (optional) and
of the output.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Hashable

import torch

from fastdecode.decoding.drafter import Draft, History
from fastdecode.decoding.ngram_pool import NGramPool
from fastdecode.ops import VerifyResult


@lru_cache(maxsize=64)
def step_layout(W: int, N: int, g: int, k: int, window: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The step tree's parents and, per window column, the node of its newest level (empty
    without a window). T = 1 + g*k + (W*(N-1) - 1 if window else 0)."""
    parents = [-1]
    for _ in range(g):
        parents += [0] + list(range(len(parents), len(parents) + k - 1))
    if not window:
        return tuple(parents), ()
    node = [[0] * W for _ in range(N - 1)]
    for j in range(1, W):
        node[0][j] = len(parents)
        parents.append(node[0][j - 1])
    for level in range(1, N - 1):
        for j in range(W):
            node[level][j] = len(parents)
            parents.append(node[level - 1][j])
    return tuple(parents), tuple(node[N - 2])


class JacobiDrafter:
    """Drafts from a Jacobi window and an n-gram pool (see the module docstring).

    Args:
        vocab_size: the model's vocabulary (the pool is a dense per-token table).
        window, ngram, guesses: W >= 1, N >= 2, G >= 0; the pool holds up to G n-grams of
            length N per key.
        pool_from_prompt: insert every n-gram of the prompts into the pool at the start.
        generator: draws the window's initial tokens from each prompt.

    ``set_step(g, k, window)`` changes, between steps, how many candidates (g <= G) of how
    many tokens (k <= N-1) are verified and whether the window is fed (``config="auto"``).
    """

    def __init__(self, vocab_size: int, window: int, ngram: int, guesses: int, *,
                 pool_from_prompt: bool = True, generator: torch.Generator | None = None) -> None:
        self.V, self.W, self.N, self.G = vocab_size, window, ngram, guesses
        self.pool_from_prompt = pool_from_prompt
        self.generator = generator
        self.g, self.k, self.window_on = guesses, ngram - 1, True
        self.steps = 0
        self._counts = torch.zeros(3, dtype=torch.int64)
        self._looked: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's lookup, made early

    def set_step(self, g: int, k: int, window: bool) -> None:
        """Verify the first ``g`` candidates, ``k`` tokens each; feed the window or not."""
        if window and not self.window_on:
            self.warmup = self.N - 2  # the window was not refreshed while off
        self.g, self.k, self.window_on = min(g, self.G), min(k, self.N - 1), window

    def start(self, history: History) -> None:
        tokens = history.tokens
        B, device = tokens.shape[0], tokens.device
        K, W = self.N - 1, self.W
        self.device = device
        self.pool = NGramPool(B, self.V, self.N, self.G, device)
        if self.pool_from_prompt and self.G > 0:
            self.pool.insert_sequence(tokens, history.start, history.end)
        # Level 0 column 0 is the last token; every other cell starts as a random prompt token.
        span = (history.end - history.start).clamp(min=1)
        draw = torch.rand(B, K, W, generator=self.generator, device=device)
        pick = history.start[:, None, None] + (draw * span[:, None, None]).long()
        self.window = tokens.gather(1, pick.view(B, -1)).view(B, K, W)
        self.warmup = self.N - 2  # steps until every level comes from the model
        self._counts = self._counts.to(device)
        self._layouts: dict = {}
        self._no_verify: dict[tuple[int, int], torch.Tensor] = {}  # (B, T): root-only tree

    def _layout(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.g, self.k, self.window_on)
        if key not in self._layouts:
            parents, newest = step_layout(self.W, self.N, *key)
            self._layouts[key] = (
                torch.tensor(parents, device=self.device).expand(B, -1).contiguous(),
                torch.tensor(newest, dtype=torch.int64, device=self.device))
        return self._layouts[key]

    def _verify_parents(self, cand: torch.Tensor, count: torch.Tensor, T: int) -> torch.Tensor:
        """Verification tree over the candidates ``cand [B, g, k]``: chains from the root with
        equal prefixes merged (a trie); merged-away, missing and window nodes are -2."""
        B, G, K = cand.shape
        if G == 0 or K == 0:  # nothing to verify: the same tree every step, made once
            if (B, T) not in self._no_verify:
                plain = torch.full((B, T), -2, dtype=torch.int64, device=cand.device)
                plain[:, 0] = -1
                self._no_verify[(B, T)] = plain
            return self._no_verify[(B, T)]
        out = torch.full((B, T), -2, dtype=torch.int64, device=cand.device)
        out[:, 0] = -1
        gi = torch.arange(G, device=cand.device)
        valid = gi < count[:, None]  # [B, g]
        same = (cand[:, :, None, :] == cand[:, None, :, :]).long().cumprod(-1).bool()
        same &= valid[:, None, :, None]  # [B, g, g', k]: g' valid and equal to g up to k
        canon = same.long().argmax(2)  # the first such g' (g itself when valid)
        real = valid[:, :, None] & (canon == gi[:, None])
        # (g, k) hangs from the root (k = 0) or from node (canon[g, k-1], k-1) = 1 + canon*K + k-1
        ki = torch.arange(K, device=cand.device)
        above = torch.cat([torch.zeros_like(canon[:, :, :1]), canon[:, :, :-1]], dim=2)
        parent_idx = torch.where(ki == 0, 0, 1 + above * K + ki - 1)
        out[:, 1: 1 + G * K] = torch.where(real, parent_idx, -2).view(B, G * K)
        return out

    def propose(self, last: torch.Tensor, budget: Hashable = None) -> Draft:
        B = last.shape[0]
        parents, _ = self._layout(B)
        T = parents.shape[1]
        self.window[:, 0, 0] = last
        looked, self._looked = self._looked, None
        self.candidates, self.count = looked if looked is not None else self.pool.lookup(last)
        cand = self.candidates[:, : self.g, : self.k]
        parts = [last[:, None], cand.clamp(min=0).reshape(B, -1)]
        if self.window_on:
            level0 = self.window[:, 0, 1:]
            parts += [level0, self.window[:, 1:].reshape(B, -1)]
        verify = self._verify_parents(cand, self.count.clamp(max=self.g), T)
        return Draft(torch.cat(parts, dim=1), parents, verify, self.k if self.g else 0)

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        if self.window_on:
            fresh = logits[:, self._layout(logits.shape[0])[1]].argmax(-1)  # one Jacobi iteration
            if self.warmup > 0:
                self.warmup -= 1
            elif self.G > 0:
                self.pool.harvest(self.window, fresh)
            self.window = torch.cat([self.window[:, 1:], fresh[:, None]], dim=1)
        if self.G > 0:  # the output's n-grams that end in this step's tokens
            first = (history.new_from - (self.N - 1)).maximum(history.start)
            self.pool.insert_sequence(history.tokens, first, history.end)
        if self.g > 0 and self.k > 0:  # otherwise nothing was verified: all three counts are 0
            self._counts += torch.stack([(self.count.clamp(max=self.g) > 0).sum(),
                                         (result.accept_len > 0).sum(), result.accept_len.sum()])
        self.steps += 1

    def finish(self) -> None:
        return None

    def stats(self) -> dict:
        """Per (row, step): lookups that found candidates, steps that accepted pool tokens,
        and the pool tokens accepted; plus the settings."""
        looked, hit, accepted = self._counts.tolist()
        return {"steps": self.steps, "lookups_with_candidates": looked, "pool_hits": hit,
                "accepted_from_pool": accepted, "window": self.W, "ngram": self.N,
                "guesses": self.G}
