"""``config="auto"`` for trie lookahead: whether each step drafts and how many nodes the draft
tree gets, so that the expected tokens per second are highest on this device.

* When to draft: a step drafts only where a row's text is likely to follow the trie: the
  row's real tokens followed the tree retrieved at its previous step (a copy is running), or
  the trie offers a single continuation of the row's context (one child under the root).
  Elsewhere the step decodes plainly, whatever a tree would cost: on devices where an
  8-token forward costs well over a 1-token one (CPUs), drafting after a miss between
  several continuations loses more than it wins. A step that does not draft retrieves one
  tree per row (the largest, to tell whether the next step follows it).
* How much: a step that may draft asks the trie for a tree at each node budget (retrieval
  takes microseconds, a forward milliseconds). Once the real continuation is known, each
  budget's tree is scored by how many of its drafts would have been accepted, and a decayed
  running mean of that (and of the tree's size) is kept per budget. This needs no extra
  forward; the decay lets it follow the text from passages that copy the prompt to passages
  that do not. Each budget becomes an option, priced by the loop's
  :class:`~fastdecode.decoding.budget.BudgetChooser` on the measured step costs against plain
  decoding. Until a drafting step has been scored, the one option is ``FIRST_BUDGET``.
  The chosen budget's trees are the ones already retrieved.
"""

from __future__ import annotations

from typing import Hashable

import torch

from fastdecode.decoding.budget import Option
from fastdecode.decoding.drafter import Draft, History
from fastdecode.decoding.trie_cache import TrieCache
from fastdecode.decoding.trie_drafter import TrieDrafter
from fastdecode.ops import VerifyResult

NODE_CHOICES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FIRST_BUDGET = 8  # the node budget of drafting steps before any has been scored
DECAY = 0.8  # weight of the running means' past per scored lookup


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
    """A :class:`TrieDrafter` in hierarchical mode whose node budget is the loop's step budget
    (see the module docstring). ``decoding_length`` bounds the budget; ``branch_length`` is
    the depth of every tree."""

    def __init__(self, vocab_size: int, decoding_length: int, branch_length: int, *,
                 cache: TrieCache | None = None) -> None:
        super().__init__(vocab_size, decoding_length, branch_length, cache=cache)
        self.budgets = sorted({n for n in NODE_CHOICES if n < decoding_length} | {decoding_length}
                              - {1})
        # Decayed sums over the scored lookups of drafting steps: accepted drafts and tree sizes
        # per budget, and of 1.
        self.gain = {n: 0.0 for n in self.budgets}
        self.size = {n: 0.0 for n in self.budgets}
        self.weight = 0.0
        self.following: list[bool] = []  # per row: its newest lookup is followed so far
        self.pending: list[Lookup] = []  # lookups awaiting their outcome
        self.step_trees: dict[int, dict[int, tuple[list[int], list[int]]]] = {}  # row: this step's

    def start(self, history: History) -> None:
        super().start(history)
        self.following = [False] * len(self.rows)

    def _retrieve(self, b: int, n: int) -> tuple[list[int], list[int]]:
        tokens, parents = self.trie.retrieve(self.rows[b][-self.trie.match_len:], max_nodes=n,
                                             max_depth=self.depth, mode="hier",
                                             request_id=self.rids[b])
        return tokens.tolist(), parents.tolist()

    def options(self, curve: list[tuple[int, float]]) -> list[Option]:
        """Retrieves this step's trees (see the module docstring) and offers plain decoding and,
        where a row may draft, every node budget with its expected tokens and tree size. The
        drafting steps' lookups still pending count with what they matched so far (a lower
        bound), so that a run of matches drafts big trees at once instead of after
        ``branch_length`` tokens."""
        plain = Option(1, "nodes=1", 1.0, 1.0)
        self.step_trees = {}
        if not self.budgets:
            return [plain]
        waiting = {(look.row, look.next_at) for look in self.pending}
        largest, may = self.budgets[-1], {}
        for b, row in enumerate(self.rows):
            if (b, len(row)) in waiting:  # a finished row's lookup is still pending
                continue
            self.step_trees[b] = {largest: self._retrieve(b, largest)}
            parents = self.step_trees[b][largest][1]
            may[b] = len(parents) > 1 and (self.following[b] or single_continuation(parents))
        drafting = any(may.values())
        for b, trees in self.step_trees.items():
            if drafting:  # every budget for every row: the rows draft together
                trees.update({n: self._retrieve(b, n) for n in self.budgets[:-1]})
            self.pending.append(Lookup(b, len(self.rows[b]) - 1, trees, self.depth, may[b]))
        if not drafting:
            return [plain]
        weight, gain, size = self.weight, dict(self.gain), dict(self.size)
        for look in self.pending:
            if look.seen and look.drafting:
                weight = DECAY * weight + 1
                for n, (_, m, _) in look.walk.items():
                    gain[n] = DECAY * gain[n] + m
                    size[n] = DECAY * size[n] + look.size[n]
        if not weight:
            first = max([n for n in self.budgets if n <= FIRST_BUDGET], default=self.budgets[0])
            return [Option(first, f"nodes={first}", 1.0, float(first))]
        return [plain] + [Option(n, f"nodes={n}", 1 + gain[n] / weight,
                                 max(1.0, size[n] / weight)) for n in self.budgets]

    def propose(self, last: torch.Tensor, budget: Hashable = None) -> Draft:
        """Draft trees of ``budget`` nodes, from the trees :meth:`options` retrieved (a row
        without one, finished, gets its root alone)."""
        n = budget if budget is not None else self.nodes
        B = len(self.rows)
        trees = [self.step_trees.get(b, {}).get(n) for b in range(B)]
        T = max([len(t[0]) for t in trees if t is not None], default=1)
        tokens = [[0] * T for _ in range(B)]
        parents = [[-2] * T for _ in range(B)]
        for b, tree in enumerate(trees):
            tok, par = tree if tree is not None else ([self.rows[b][-1]], [-1])
            tokens[b][:len(tok)], parents[b][:len(par)] = tok, par
        tokens_t = torch.tensor(tokens).to(self.device, non_blocking=True)
        parents_t = torch.tensor(parents).to(self.device, non_blocking=True)
        return Draft(tokens_t, parents_t, parents_t, min(self.depth, T - 1))

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
        return out
