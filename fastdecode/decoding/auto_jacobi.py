"""``config="auto"`` for Jacobi lookahead: every step, the candidates to verify that promise the
most tokens per second on this device.

* Acceptance: a running estimate from the call itself. Every step the pool is looked up
  anyway; once the real continuation is known, each candidate set (the first g candidates,
  k tokens each) is scored by how many of its tokens would have been accepted. This needs no
  extra forward, so even while decoding plainly the drafter learns what drafting would gain.
* Options: plain decoding, and, where some row's lookup found candidates, every (g, k)
  within the bounds with its expected tokens per step; the loop's
  :class:`~fastdecode.decoding.budget.BudgetChooser` prices them on the measured step costs
  and picks the step's (g, k).
* The Jacobi window runs only where extra tokens cost almost nothing (a memory-bound device,
  :func:`~fastdecode.decoding.budget.nearly_free`): its effect on the pool cannot be scored
  before it runs. It is decided at the first step.
"""

from __future__ import annotations

from typing import Hashable

import torch

from fastdecode.decoding.budget import Option, nearly_free
from fastdecode.decoding.drafter import Draft, History
from fastdecode.decoding.jacobi import JacobiDrafter, step_layout
from fastdecode.ops import VerifyResult

GUESS_CHOICES = (1, 2, 3, 4, 6, 8)


class AutoJacobi(JacobiDrafter):
    """A :class:`JacobiDrafter` whose candidate count and length are the loop's step budget (see
    the module docstring). ``ngram`` and ``guesses`` bound the options; ``window`` is the
    window's width when it runs."""

    def __init__(self, vocab_size: int, window: int, ngram: int, guesses: int, **kwargs) -> None:
        super().__init__(vocab_size, window, ngram, guesses, **kwargs)
        self.pending: list[tuple[int, int, list[list[int]]]] = []  # (row, index of x, candidates)
        # [g][k]: accepted tokens summed over the scored lookups (host lists: a few updates a step)
        self.score = [[0] * ngram for _ in range(guesses + 1)]
        self.scored = 0
        self.use_window: bool | None = None
        self._found = True  # whether the step's lookup found a candidate for some row

    def start(self, history: History) -> None:
        super().start(history)
        rows = history.tokens.tolist()
        self.rows = [row[:e] for row, e in zip(rows, history.end.tolist())]
        self.use_window = None

    def options(self, curve: list[tuple[int, float]]) -> list[Option]:
        if self.use_window is None:
            self.use_window = nearly_free(curve, len(step_layout(self.W, self.N, 0, 0, True)[0]))
        options = [Option((0, 0), "g=0,k=0", 1.0, self._tokens(0, 0))]
        # the step's lookup, made now: a step whose rows have no candidate at all would only
        # feed padding in the candidates' places
        last = torch.tensor([row[-1] for row in self.rows], device=self.device)
        self._looked = self.pool.lookup(last)
        self._found = int(self._looked[1].max()) > 0
        if self.scored and self._found:
            n = self.scored  # expected accepted drafts per step: score / n
            options += [Option((g, k), f"g={g},k={k}", 1.0 + self.score[g][k] / n,
                               self._tokens(g, k))
                        for g in GUESS_CHOICES if g <= self.G for k in range(1, self.N)]
        return options

    def _tokens(self, g: int, k: int) -> int:
        return len(step_layout(self.W, self.N, g, k, self.use_window)[0])

    def propose(self, last: torch.Tensor, budget: Hashable = None) -> Draft:
        g, k = budget if budget is not None else (self.G, self.N - 1)
        if self._looked is None:  # options() did not run this step: no lookup to go by
            self._found = True
        self.set_step(g, k, bool(self.use_window))
        return super().propose(last)

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        super().observe(draft, logits, result, history)
        for row, new in zip(self.rows, history.new):
            row.extend(new)
        # a finished row (no new tokens) never learns its continuation: its lookup is dropped
        if self._found:
            cands = self.candidates.tolist()
            counts = self.count.tolist()
            for b, (c, n) in enumerate(zip(cands, counts)):
                if history.new[b]:
                    self.pending.append((b, len(self.rows[b]) - len(history.new[b]) - 1, c[:n]))
        else:  # no row had a candidate: each running row's lookup is scored now, as 0 accepted
            self.scored += sum(1 for new in history.new if new)
        if self.pending:
            self._score()

    def _score(self) -> None:
        """Scores every pending lookup whose outcome is known: its next N-1 tokens are out, or
        every candidate has already missed one of the tokens that are out."""
        K = self.N - 1
        keep = []
        for b, x, cands in self.pending:
            real = self.rows[b][x + 1: x + 1 + K]
            matched = []
            for cand in cands:
                m = 0
                while m < len(real) and cand[m] == real[m]:
                    m += 1
                matched.append(m)
            if len(real) < K and max(matched, default=0) == len(real):
                keep.append((b, x, cands))  # a candidate may still match further
                continue
            best = 0
            for g in range(1, self.G + 1):
                best = max(best, matched[g - 1]) if g <= len(matched) else best
                row = self.score[g]
                for k in range(1, self.N):
                    row[k] += min(best, k)
            self.scored += 1
        self.pending = keep

    def stats(self) -> dict:
        out = super().stats()
        out["auto"] = {"window": bool(self.use_window)}
        return out
