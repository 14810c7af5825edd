"""``config="auto"`` for trie lookahead: decide, step by step, whether to draft and how many
nodes the draft tree gets, so that the expected tokens per second are highest on this device.

* Cost: the forward's seconds against the tokens fed (:mod:`fastdecode.decoding.cost`).
* When to draft: a step drafts only where a row's text is likely to follow the trie: the
  row's real tokens followed the tree retrieved at its previous step (a copy is running), or
  the trie offers a single continuation of the row's context (one child under the root).
  Elsewhere the step decodes plainly, whatever a tree would cost: on devices where an
  8-token forward costs well over a 1-token one (CPUs), drafting after a miss between
  several continuations loses more than it wins.
* How much: every drafting step the trie is asked for a tree at each node budget (retrieval
  takes microseconds, a forward milliseconds). Once the real continuation is known, each
  budget's tree is scored by how many of its drafts would have been accepted, and a decayed
  running mean of that (and of the tree's size) is kept per budget. This needs no extra
  forward; the decay lets it follow the text from passages that copy the prompt to passages
  that do not. The step takes the budget with the best estimated (tokens per step) /
  (seconds per step); plain decoding stays a candidate and must be beaten by a margin. Until
  a drafting step has been scored, the budget is ``FIRST_BUDGET``.
"""

from __future__ import annotations

import torch

from fastdecode.decoding.cost import forward_costs, interpolate
from fastdecode.decoding.drafter import Draft, History
from fastdecode.decoding.trie_cache import TrieCache
from fastdecode.decoding.trie_drafter import TrieDrafter
from fastdecode.hf.model import TreeRunner
from fastdecode.ops import VerifyResult

NODE_CHOICES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FIRST_BUDGET = 8  # the node budget of drafting steps before any has been scored
DECAY = 0.8  # weight of the running means' past per scored lookup
MARGIN = 1.05  # drafting must promise this much more than plain decoding


class Lookup:
    """One step's retrieval for one row at every node budget, scored as the real tokens come
    out: per budget, the tree's node reached along the real tokens, how many drafts matched,
    and whether that is final (a real token left the tree, or the tree's depth is used up).
    ``drafting``: whether the row was in a state where the step may draft."""

    def __init__(self, row: int, root_at: int, trees: dict[int, tuple[list[int], list[int]]],
                 depth: int, drafting: bool) -> None:
        self.row, self.next_at, self.depth, self.drafting = row, root_at + 1, depth, drafting
        self.size = {n: len(tokens) for n, (tokens, _) in trees.items()}
        # per budget: {(node, token): child}
        self.edges = {n: {(p, t): j for j, (t, p) in enumerate(zip(tokens, parents)) if j}
                      for n, (tokens, parents) in trees.items()}
        self.walk = {n: (0, 0, False) for n in trees}  # (node, matched, final)
        self.seen = 0  # real tokens scored so far

    def advance(self, row: list[int]) -> bool:
        """Scores the real tokens that came out since the last call; True once final."""
        real = row[self.next_at + self.seen:self.next_at + self.depth]
        self.seen += len(real)
        final = True
        for n, (node, m, done) in self.walk.items():
            edges = self.edges[n]
            for t in real:
                if done:
                    break
                child = edges.get((node, t))
                if child is None:
                    done = True
                else:
                    node, m = child, m + 1
            done = done or self.seen >= self.depth or not any(p == node for p, _ in edges)
            self.walk[n] = (node, m, done)
            final = final and done
        return final

    def on_tree(self) -> bool:
        """Whether every real token out so far (at least one) followed the largest tree."""
        m = self.walk[max(self.walk)][1]
        return 0 < self.seen == m


def single_continuation(parents: list[int]) -> bool:
    """Whether a draft tree (``parents`` in verify_tree's format) has exactly one node under
    its root."""
    return sum(1 for p in parents[1:] if p == 0) == 1


class AutoTrie(TrieDrafter):
    """A :class:`TrieDrafter` in hierarchical mode that decides every step whether to draft and
    picks the tree's node budget (see the module docstring). ``decoding_length`` bounds the
    budget; ``branch_length`` is the depth of every tree."""

    def __init__(self, runner: TreeRunner, vocab_size: int, decoding_length: int,
                 branch_length: int, *, cache: TrieCache | None = None) -> None:
        super().__init__(vocab_size, decoding_length, branch_length, cache=cache)
        self.runner = runner
        self.budgets = sorted({n for n in NODE_CHOICES if n < decoding_length} | {decoding_length}
                              - {1})
        # Decayed sums over the scored lookups of drafting steps: accepted drafts and tree sizes
        # per budget, and of 1.
        self.gain = {n: 0.0 for n in self.budgets}
        self.size = {n: 0.0 for n in self.budgets}
        self.weight = 0.0
        self.following: list[bool] = []  # per row: its newest lookup is followed so far
        self.pending: list[Lookup] = []  # lookups awaiting their outcome
        self.choices: dict[int, int] = {}

    def start(self, history: History) -> None:
        super().start(history)
        self.costs = forward_costs(self.runner, history)
        self.following = [False] * len(self.rows)

    def _choose(self, drafting: bool) -> int:
        """The node budget with the best expected tokens per second (1: plain decoding). The
        drafting steps' lookups still pending count with what they matched so far (a lower
        bound), so that a run of matches drafts big trees at once instead of after
        ``branch_length`` tokens."""
        if not drafting:
            return 1
        weight, gain, size = self.weight, dict(self.gain), dict(self.size)
        for look in self.pending:
            if look.seen and look.drafting:
                weight = DECAY * weight + 1
                for n, (_, m, _) in look.walk.items():
                    gain[n] = DECAY * gain[n] + m
                    size[n] = DECAY * size[n] + look.size[n]
        if not weight:
            return max([n for n in self.budgets if n <= FIRST_BUDGET], default=self.budgets[0])
        best, choice = MARGIN / interpolate(self.costs, 1), 1
        for n in self.budgets:
            rate = (1 + gain[n] / weight) / interpolate(self.costs, max(1.0, size[n] / weight))
            if rate > best:
                best, choice = rate, n
        return choice

    def propose(self, last: torch.Tensor) -> Draft:
        waiting = {(look.row, look.next_at) for look in self.pending}
        drafting = False
        for b, (row, rid) in enumerate(zip(self.rows, self.rids)):
            if not self.budgets or (b, len(row)) in waiting:  # (a finished row's is pending)
                continue
            ctx, trees = row[-self.trie.match_len:], {}
            for n in self.budgets:
                t, p = self.trie.retrieve(ctx, max_nodes=n, max_depth=self.depth, mode="hier",
                                          request_id=rid)
                trees[n] = (t.tolist(), p.tolist())
            largest = trees[self.budgets[-1]][1]
            may = len(largest) > 1 and (self.following[b] or single_continuation(largest))
            drafting = drafting or may
            self.pending.append(Lookup(b, len(row) - 1, trees, self.depth, may))
        self.nodes = self._choose(drafting)
        self.choices[self.nodes] = self.choices.get(self.nodes, 0) + 1
        return super().propose(last)

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        super().observe(draft, logits, result, history)
        self._score()

    def _score(self) -> None:
        """Advances every pending lookup over the new tokens, adds those of drafting steps
        whose outcome is now known to the sums, and notes whether each row's newest lookup is
        being followed."""
        keep, newest = [], {}
        for look in self.pending:
            newest[look.row] = look
            if not look.advance(self.rows[look.row]):
                keep.append(look)
            elif look.drafting:
                self.weight = DECAY * self.weight + 1
                for n, (_, m, _) in look.walk.items():
                    self.gain[n] = DECAY * self.gain[n] + m
                    self.size[n] = DECAY * self.size[n] + look.size[n]
        self.pending = keep
        for b, look in newest.items():
            self.following[b] = look.on_tree()

    def stats(self) -> dict:
        out = super().stats()
        out["decoding_length"] = self.budgets[-1] if self.budgets else 1  # the bound
        out["auto"] = {"choices": {f"nodes={n}": c for n, c in sorted(self.choices.items())},
                       "cost_s": {t: round(c, 6) for t, c in self.costs}}
        return out
