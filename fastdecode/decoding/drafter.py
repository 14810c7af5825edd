"""The interface between the decoding loop and the strategies that propose drafts.

Every step the loop asks the drafter for a draft tree rooted at each row's last token, runs it
through the model in one forward, verifies it, and tells the drafter what happened. An adaptive
drafter (:class:`AdaptiveDrafter`) also lists its options first, and the loop's
:class:`~fastdecode.decoding.budget.BudgetChooser` decides which one ``propose`` runs.
"""

from __future__ import annotations

from typing import Hashable, NamedTuple, Protocol, runtime_checkable

import torch

from fastdecode.decoding.budget import Option
from fastdecode.ops import VerifyResult


class Draft(NamedTuple):
    """One step's input, per batch row (all int64 ``[B, T]`` on the model's device).

    tokens: node 0 is the row's last accepted token (its KV is not cached yet).
    parents: the tree the forward sees (each node attends to its ancestors and the prefix).
    verify_parents: the tree verification may accept along: a sub-forest of ``parents`` with
        distinct tokens among siblings, -2 for nodes that are not drafts (e.g. window tokens).
    max_depth: an upper bound on the depth of ``verify_parents``.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    verify_parents: torch.Tensor
    max_depth: int


class History(NamedTuple):
    """Each row's tokens so far: ``tokens [B, cap]`` (left-padded prompt, then the generated
    tokens), with the real tokens of row b in ``[start[b], end[b])``; ``new_from[b]`` is where
    this step's tokens begin. Index tensors are int64 ``[B]`` on the model's device. ``new``
    holds the same step's tokens on the host, one list per row (``tokens[b, new_from[b]:end[b]]``),
    so that drafters never copy the whole history back."""

    tokens: torch.Tensor
    start: torch.Tensor
    new_from: torch.Tensor
    end: torch.Tensor
    new: list[list[int]]


class Drafter(Protocol):
    """A draft strategy for :func:`fastdecode.decoding.loop.decode`."""

    def start(self, history: History) -> None:
        """Called once, after the prefill, with the prompts (and the first generated token)."""

    def propose(self, last: torch.Tensor, budget: Hashable = None) -> Draft:
        """The step's draft trees for the rows' last tokens ``last`` (int64 ``[B]``);
        ``budget``: the option the loop chose (None for a drafter with fixed settings)."""

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        """After verification: the step's logits ``[B, T, V]``, what was accepted, and the
        history including the step's new tokens."""

    def finish(self) -> None:
        """Called once when the call's decoding ends."""

    def stats(self) -> dict:
        """Counters to report in :class:`fastdecode.decoding.loop.GenerateStats`."""


@runtime_checkable
class AdaptiveDrafter(Drafter, Protocol):
    """A drafter whose steps vary in size (``config="auto"``)."""

    def options(self, curve: list[tuple[int, float]]) -> list[Option]:
        """This step's options, plain decoding first; ``curve`` is the runner's measured cost
        curve (``(tokens fed, seconds)``), for choices the acceptance estimates cannot make."""


class NoDraft:
    """Plain autoregressive decoding: every step's tree is the last token alone."""

    def __init__(self) -> None:
        self._parents: torch.Tensor | None = None

    def start(self, history: History) -> None:
        B = history.tokens.shape[0]
        self._parents = torch.full((B, 1), -1, dtype=torch.int64, device=history.tokens.device)

    def propose(self, last: torch.Tensor, budget: Hashable = None) -> Draft:
        return Draft(last[:, None], self._parents, self._parents, 0)

    def observe(self, draft: Draft, logits: torch.Tensor, result: VerifyResult,
                history: History) -> None:
        return None

    def finish(self) -> None:
        return None

    def stats(self) -> dict:
        return {}
