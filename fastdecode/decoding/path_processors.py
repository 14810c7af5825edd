"""Logits processors that depend on the tokens before a position, applied to every node of a
draft tree along the node's own path.

A tree node's logits predict the token after the row's sequence so far (the prompt without its
left padding, and the tokens emitted before this step) followed by the node's
ancestors below the root and the node itself: the sequence transformers' processors would see
had decoding reached that node. So the processed logits of every node equal what
transformers' ``generate`` computes for the same prefix, and greedy decoding stays identical
to it and sampling exact.

* ``min_new_tokens``: the EOS tokens are removed while fewer than ``min_new_tokens`` tokens
  have been generated (transformers' ``MinNewTokensLengthLogitsProcessor``); a node at depth d
  of a row that has produced n tokens predicts the (n + d + 1)-th.
* ``repetition_penalty``: every token that occurs in the node's sequence has its logit divided
  by the penalty where positive and multiplied by it where negative (transformers'
  ``RepetitionPenaltyLogitsProcessor``).
* ``custom``: any transformers ``LogitsProcessor`` (``no_repeat_ngram_size`` builds
  transformers' own, and a user's ``logits_processor`` list lands here), called, after the two
  above, on the nodes' explicit sequences ``[n, len]`` (left padding included, as transformers
  passes them), one call per sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode.ops import tree_mask, tree_positions


@dataclass(frozen=True)
class PathProcessors:
    """The history-dependent processors of a call; see the module docstring."""

    min_new_tokens: int = 0
    eos_ids: tuple[int, ...] = ()
    repetition_penalty: float | None = None
    custom: tuple = ()

    def __post_init__(self) -> None:
        p = self.repetition_penalty
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0):
            raise ValueError(f"repetition_penalty must be None or a float > 0, found {p!r}")

    @property
    def active(self) -> bool:
        return (self.min_new_tokens > 0 and bool(self.eos_ids)) or \
            self.repetition_penalty not in (None, 1.0) or bool(self.custom)

    def apply(self, logits: torch.Tensor, seq: torch.Tensor, start: torch.Tensor,
              end: torch.Tensor, produced: list[int], tokens: torch.Tensor | None = None,
              parents: torch.Tensor | None = None) -> torch.Tensor:
        """The processed logits, fp32 ``[B, T, V]``.

        logits: ``[B, T, V]``, node j's prediction. seq: int64 ``[B, cap]``, row b's sequence
        so far in ``seq[b, start[b]:end[b]]`` (start, end: int64 ``[B]``; ``start`` skips the
        left padding, which transformers' repetition penalty ignores too); produced: the tokens each row has
        generated (host list). tokens, parents: int64 ``[B, T]``, the draft tree whose node 0
        is the row's last token (already in ``seq``); None for the prefill's logits (T = 1,
        nothing beyond ``seq``)."""
        x = logits.float()
        B, T, V = x.shape
        if self.min_new_tokens > 0 and self.eos_ids and min(produced) < self.min_new_tokens:
            depth = (torch.zeros(B, T, dtype=torch.int64, device=x.device) if parents is None
                     else tree_positions(parents, 0, validate=False))
            made = torch.tensor(produced, device=x.device)[:, None] + depth  # [B, T]
            early = made < self.min_new_tokens
            eos = torch.tensor(self.eos_ids, device=x.device)
            x[..., eos] = x[..., eos].masked_fill(early[..., None], float("-inf"))
        if self.repetition_penalty not in (None, 1.0):
            present = self._present(seq, start, end, tokens, parents, T, V)
            p = self.repetition_penalty
            x = torch.where(present, torch.where(x > 0, x / p, x * p), x)
        if self.custom:
            x = self._custom(x, seq, end, tokens, parents)
        return x

    def _custom(self, x: torch.Tensor, seq: torch.Tensor, end: torch.Tensor,
                tokens: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
        """The custom processors on every node's sequence, grouped by length."""
        B, T, _ = x.shape
        rows = [row[:e] for row, e in zip(seq.tolist(), end.tolist())]
        host_tokens = tokens.tolist() if tokens is not None else None
        host_parents = parents.tolist() if parents is not None else None
        groups: dict[int, list[tuple[int, int, list[int]]]] = {}
        for b in range(B):
            for j in range(T):
                path, node = [], j
                while host_parents is not None and node > 0:
                    path.append(host_tokens[b][node])
                    node = host_parents[b][node]
                ids = rows[b] + path[::-1]
                groups.setdefault(len(ids), []).append((b, j, ids))
        out = x.clone()
        for members in groups.values():
            ids = torch.tensor([m[2] for m in members], device=x.device)
            b_idx = torch.tensor([m[0] for m in members], device=x.device)
            j_idx = torch.tensor([m[1] for m in members], device=x.device)
            scores = x[b_idx, j_idx]
            for processor in self.custom:
                scores = processor(ids, scores)
            out[b_idx, j_idx] = scores.float()
        return out

    @staticmethod
    def _present(seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, tokens: torch.Tensor | None,
                 parents: torch.Tensor | None, T: int, V: int) -> torch.Tensor:
        """bool ``[B, T, V]``: the tokens in each node's sequence (see :meth:`apply`)."""
        B, cap = seq.shape
        cols = torch.arange(cap, device=seq.device)
        in_seq = ((cols >= start[:, None]) & (cols < end[:, None])).to(torch.int8)
        present = torch.zeros(B, V, dtype=torch.int8, device=seq.device)
        present.scatter_reduce_(1, seq.clamp(0, V - 1), in_seq, reduce="amax")
        present = present[:, None, :].expand(B, T, V).contiguous()
        if tokens is not None and T > 1:
            path = tree_mask(parents, validate=False)  # [B, T, T]: ancestors or self
            path[:, :, 0] = False  # the root is the sequence's last token
            index = tokens.clamp(0, V - 1)[:, None, :].expand(B, T, T)
            present.scatter_reduce_(2, index, path.to(torch.int8), reduce="amax")
        return present.bool()
