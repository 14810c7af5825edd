"""Trie ``config="auto"``'s bookkeeping: scoring a lookup's trees as the real tokens come out,
and end-of-sequence tokens inside prompts (chat turn separators) not cutting what is drafted."""

from __future__ import annotations

import torch
from test_generate import hf_greedy, prompts, tiny

import fastdecode
from fastdecode.decoding.budget import BudgetChooser
from fastdecode.decoding.auto_trie import FIRST_BUDGET, AutoTrie, Lookup, single_continuation

# Root 5 with two branches: 1 -> 2 -> 6 and 3 -> 4; as the smaller budget, the first branch only.
TREES = {6: ([5, 1, 2, 6, 3, 4], [-1, 0, 1, 2, 0, 4]), 4: ([5, 1, 2, 6], [-1, 0, 1, 2])}


def walk(real: list[int], depth: int = 3, feed: int | None = None) -> Lookup:
    """A lookup made at the root (row index 0), advanced over ``real`` in pieces of ``feed``."""
    look = Lookup(0, 0, TREES, depth, drafting=False)
    row = [5]
    for i in range(0, len(real), feed or max(1, len(real))):
        row += real[i:i + (feed or len(real))]
        look.advance(row)
    return look


def test_lookup_scores_each_budget():
    look = walk([3, 4, 9])
    assert look.walk[6][1:] == (2, True) and look.walk[4][1:] == (0, True)
    look = walk([1, 2, 7])
    assert look.walk[6][1:] == (2, True) and look.walk[4][1:] == (2, True)


def test_lookup_waits_while_the_text_follows_the_tree():
    look = Lookup(0, 0, TREES, 3, drafting=True)
    assert not look.advance([5, 1])  # on the tree, depth left
    assert look.on_tree() and look.seen == 1
    assert not look.advance([5, 1, 2])
    assert look.advance([5, 1, 2, 6])  # the depth is used up
    assert look.walk[6][1] == 3 and look.walk[4][1] == 3


def test_lookup_ends_at_a_leaf_and_in_pieces():
    look = walk([3, 4], depth=5)
    assert look.walk[6] == (5, 2, True)  # node 5 (token 4) has no children
    assert walk([1, 2, 6, 8], feed=1).walk[6] == (3, 3, True)


def test_eos_inside_the_prompt_does_not_cut_the_trie():
    """The prompt holds the EOS token (as chat templates put one between turns) near its start,
    and the text the model goes on to write after it: drafting from that text must work the
    same as with no EOS at all (a trie that cut insertions at EOS takes 13 steps here, not 8)."""
    model = tiny("llama")
    ids, _ = prompts(1, 24, seed=2)
    prompt = hf_greedy(model, ids, torch.ones_like(ids), 40, eos=None)  # holds what follows
    plain = hf_greedy(model, prompt, torch.ones_like(prompt), 30, eos=None)
    eos = next(t for t in ids[0, :4].tolist() if t not in plain[0, prompt.shape[1]:].tolist())
    runs = [fastdecode.generate(model, prompt, strategy="prompt_lookup", max_new_tokens=30,
                                eos_token_id=e) for e in ([], eos)]
    assert torch.equal(runs[0].sequences, plain) and torch.equal(runs[1].sequences, plain)
    assert runs[1].stats.steps == runs[0].stats.steps == 8


def test_single_continuation():
    assert single_continuation([-1, 0, 1, 2])
    assert not single_continuation([-1, 0, 1, 0])
    assert not single_continuation([-1])


def test_auto_decodes_plainly_between_several_continuations():
    """A miss where the trie offers several continuations is decoded plainly; a single
    continuation, or a copy that is running, drafts (before any step is scored, with
    FIRST_BUDGET nodes)."""
    auto = AutoTrie(50, 64, 4)
    auto.rows, auto.rids, auto.following = [[1, 2, 3, 1, 2, 4, 1, 2]], [None], [False]
    auto.trie.insert(auto.rows[0], source="request")
    auto.device = torch.device("cpu")
    curve = [(1, 1.0), (64, 1.0)]
    chooser = BudgetChooser()
    assert chooser.choose(curve, auto.options(curve)) == 1  # [1, 2] -> 3 or 4
    assert not auto.pending[-1].drafting
    assert auto.propose(torch.tensor([2]), 1).tokens.tolist() == [[2]]
    auto.following = [True]
    auto.pending.clear()
    assert chooser.choose(curve, auto.options(curve)) == FIRST_BUDGET
    assert auto.pending[-1].drafting
    draft = auto.propose(torch.tensor([2]), FIRST_BUDGET)
    assert draft.tokens.shape[1] > 1 and draft.tokens[0, 0] == 2
