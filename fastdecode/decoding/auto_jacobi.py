"""``config="auto"`` for Jacobi lookahead: choose, step by step, how much to draft so that the
expected tokens per second are highest on this device.

* Cost: the seconds of one forward against the number of tokens fed, measured on this device
  at the current context length (a few probe forwards whose KV is dropped right away, so the
  output cannot change), cached per model, device and context-length bucket.
* Acceptance: a running estimate from the call itself. Every step the pool is looked up
  anyway; once the real continuation is known, each candidate set (the first g candidates,
  k tokens each) is scored by how many of its tokens would have been accepted. This needs no
  extra forward, so even while decoding plainly the tuner learns what drafting would gain.
* Choice: the (g, k) with the highest estimated (tokens per step) / (seconds per step), with
  plain decoding (one token for one single-token forward) always a candidate, so "auto"
  drafts only where the estimate says it pays. The Jacobi window runs only where extra tokens
  cost almost nothing (a memory-bound device): its effect on the pool cannot be scored before
  it runs.
"""

from __future__ import annotations

import torch

from fastdecode.decoding.cost import forward_costs, interpolate
from fastdecode.decoding.drafter import Draft, History
from fastdecode.decoding.jacobi import JacobiDrafter, step_layout
from fastdecode.hf.model import TreeRunner
from fastdecode.ops import VerifyResult

GUESS_CHOICES = (1, 2, 3, 4, 6, 8)
WINDOW_FREE = 1.15  # the window runs when it makes a step at most this much dearer
MARGIN = 1.05  # drafting must promise this much more than plain decoding (the drafter's own
# host work and the estimates' noise are not in the cost curve)


class AutoJacobi(JacobiDrafter):
    """A :class:`JacobiDrafter` that picks its candidate count and length every step (see the
    module docstring). ``ngram`` and ``guesses`` bound the choice; ``window`` is the window's
    width when it runs."""

    def __init__(self, runner: TreeRunner, vocab_size: int, window: int, ngram: int,
                 guesses: int, **kwargs) -> None:
        super().__init__(vocab_size, window, ngram, guesses, **kwargs)
        self.runner = runner
        self.pending: list[tuple[int, int, list[list[int]]]] = []  # (row, index of x, candidates)
        self.score = torch.zeros(guesses + 1, ngram)  # [g, k]: summed accepted tokens
        self.scored = 0
        self.choices: dict[tuple[int, int, bool], int] = {}

    def start(self, history: History) -> None:
        super().start(history)
        self.costs = forward_costs(self.runner, history)
        base = interpolate(self.costs, 1)
        window_tokens = self.W * (self.N - 1) - 1
        self.use_window = interpolate(self.costs, 1 + window_tokens) <= WINDOW_FREE * base
        self.set_step(0, 0, self.use_window)

    def _choose(self) -> None:
        """Sets the (g, k) with the best expected tokens per second."""
        plain = 1.0 / interpolate(self.costs, self._tokens(0, 0))
        best, choice = MARGIN * plain, (0, 0)
        if self.scored:
            gain = self.score / self.scored  # expected accepted drafts per step
            for g in (g for g in GUESS_CHOICES if g <= self.G):
                for k in range(1, self.N):
                    rate = (1 + float(gain[g, k])) / interpolate(self.costs, self._tokens(g, k))
                    if rate > best:
                        best, choice = rate, (g, k)
        self.set_step(*choice, self.use_window)
        key = (*choice, self.use_window)
        self.choices[key] = self.choices.get(key, 0) + 1

    def _tokens(self, g: int, k: int) -> int:
        return len(step_layout(self.W, self.N, g, k, self.use_window)[0])

    def propose(self, last: torch.Tensor) -> Draft:
        self._choose()
        return super().propose(last)

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        super().observe(draft, logits, result, history)
        cands = self.candidates.tolist()
        counts = self.count.tolist()
        new_from = history.new_from.tolist()
        ends = history.end.tolist()
        for b, (c, n) in enumerate(zip(cands, counts)):
            self.pending.append((b, new_from[b] - 1, c[:n]))
        self._score(history.tokens, ends)

    def _score(self, tokens: torch.Tensor, ends: list[int]) -> None:
        """Scores every pending lookup whose outcome is known: its next N-1 tokens are out, or
        every candidate has already missed one of the tokens that are out."""
        K = self.N - 1
        keep, rows = [], None
        for b, x, cands in self.pending:
            if rows is None:
                rows = tokens.tolist()
            real = rows[b][x + 1: min(ends[b], x + 1 + K)]
            matched = []
            for cand in cands:
                m = 0
                while m < len(real) and cand[m] == real[m]:
                    m += 1
                matched.append(m)
            if len(real) < K and max(matched, default=0) == len(real):
                keep.append((b, x, cands))  # a candidate may still match further
                continue
            for g in range(1, self.G + 1):
                best = max(matched[:g], default=0)
                for k in range(1, self.N):
                    self.score[g, k] += min(best, k)
            self.scored += 1
        self.pending = keep

    def stats(self) -> dict:
        out = super().stats()
        out["auto"] = {"window": self.use_window,
                       "choices": {f"g={g},k={k}": n for (g, k, _), n in sorted(self.choices.items())},
                       "cost_s": {t: round(c, 6) for t, c in self.costs}}
        return out
