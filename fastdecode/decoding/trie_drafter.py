"""Trie lookahead decoding: every step retrieves a multi-branch draft tree from a token trie
(filled with the prompt, the output so far and, when a :class:`TrieCache` is passed in, earlier
requests), verifies it in one forward, and inserts what was generated.

``strategy="prompt_lookup"`` is the single-branch baseline on the same trie: the best chain only.
"""

from __future__ import annotations

import itertools
from typing import Hashable

import torch

from fastdecode.decoding.drafter import Draft, History
from fastdecode.decoding.trie_cache import TrieCache
from fastdecode.ops import VerifyResult

_request_ids = itertools.count(1 << 20)


class TrieDrafter:
    """Drafts trees of up to ``decoding_length`` nodes and ``branch_length`` levels.

    Args:
        vocab_size: the model's vocabulary.
        decoding_length: nodes per draft tree, root included (>= 1).
        branch_length: the deepest draft below the root (>= 0).
        cache: a TrieCache to use and keep (its output counts then persist across calls); by
            default a fresh one per call.
        single_branch: draft one chain (prompt lookup) instead of a tree.

    The fresh trie cuts no insertion at end-of-sequence tokens: chat prompts use them between
    turns, and the text after them is what answers copy.
    """

    def __init__(self, vocab_size: int, decoding_length: int, branch_length: int, *,
                 cache: TrieCache | None = None, single_branch: bool = False) -> None:
        if cache is not None and not isinstance(cache, TrieCache):
            raise TypeError(f"cache must be a TrieCache, found {type(cache).__name__}")
        if cache is not None and cache.vocab_size != vocab_size:
            raise ValueError(f"cache has vocab_size {cache.vocab_size} but the model has {vocab_size}")
        self.trie = cache if cache is not None else TrieCache(
            vocab_size, decoding_length=max(decoding_length, 1),
            branch_length=max(branch_length, 1))
        self.nodes = branch_length + 1 if single_branch else decoding_length
        self.depth = branch_length
        self.mode = "parallel" if single_branch else "hier"
        self.steps = 0
        self.accepted = 0

    def start(self, history: History) -> None:
        self.device = history.tokens.device
        rows = history.tokens.tolist()
        starts, ends = history.start.tolist(), history.end.tolist()
        self.rows = [row[s:e] for row, s, e in zip(rows, starts, ends)]
        self.prompt_len = [len(row) - 1 for row in self.rows]  # the first new token is in already
        self.rids = [next(_request_ids) for _ in self.rows]
        self.window = self.trie.match_len + self.trie.branch_length
        for row, rid in zip(self.rows, self.rids):
            self.trie.insert(row, source="request", request_id=rid)

    def propose(self, last: torch.Tensor, budget: Hashable = None) -> Draft:
        contexts = [row[-self.trie.match_len:] for row in self.rows]
        tokens, parents = self.trie.retrieve_batch(contexts, max_nodes=self.nodes,
                                                   max_depth=self.depth, mode=self.mode,
                                                   request_ids=self.rids)
        tokens = tokens.to(self.device, non_blocking=True)
        parents = parents.to(self.device, non_blocking=True)
        return Draft(tokens, parents, parents, min(self.depth, parents.shape[1] - 1))

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        for row, rid, new in zip(self.rows, self.rids, history.new):
            if not new:
                continue
            row.extend(new)
            # the windows that reach into the new tokens (earlier ones were inserted shorter)
            self.trie.insert(row[-(len(new) + self.window - 1):], source="request", request_id=rid)
        self.accepted += int(result.accept_len.sum())
        self.steps += 1

    def finish(self) -> None:
        """Adds each row's output (with the context it followed) to the trie's global counts,
        so that a kept cache warms up over repeated workloads, and releases the request."""
        for row, n, rid in zip(self.rows, self.prompt_len, self.rids):
            self.trie.insert(row[max(0, n - self.trie.match_len):], source="shared")
            self.trie.end_request(rid)

    def stats(self) -> dict:
        return {"steps": self.steps, "accepted_drafts": self.accepted, "trie_nodes": len(self.trie),
                "decoding_length": self.nodes, "branch_length": self.depth, "mode": self.mode}
