"""Per emitted token: the scores and logits transformers' ``generate`` returns with
``output_scores`` / ``output_logits``, and its stopping criteria, for a loop that emits several
tokens per row and step.

An emitted token was chosen from one tree node's logits (the node before it on the accepted
path), so its logits are that node's raw logits and its scores that node's logits after the
processors (and, when sampling, the warpers): exactly what transformers computes for the same
prefix.
"""

from __future__ import annotations

from typing import Callable

import torch


class TokenOutputs:
    """Collects, per row, the fp32 ``[V]`` scores and logits of every emitted token."""

    def __init__(self, batch: int, scores: bool, logits: bool) -> None:
        self.want_scores, self.want_logits = scores, logits
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]

    def add(self, row: int, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """One emitted token of ``row``: its node's processed ``scores`` and raw ``logits``."""
        if self.want_scores:
            self.scores[row].append(scores.float())
        if self.want_logits:
            self.logits[row].append(logits.float())

    @staticmethod
    def _columns(rows: list[list[torch.Tensor]], n: int) -> tuple[torch.Tensor, ...]:
        """n tensors ``[B, V]``, column i holding each row's i-th token (zeros for a row that
        had finished)."""
        V = next(t for row in rows for t in row).shape[-1]
        out = []
        for i in range(n):
            out.append(torch.stack([row[i] if i < len(row) else
                                    torch.zeros(V, device=row[0].device) for row in rows]))
        return tuple(out)

    def assemble(self, n: int) -> tuple[tuple[torch.Tensor, ...] | None,
                                         tuple[torch.Tensor, ...] | None]:
        """(scores, logits) as transformers lays them out: one ``[B, V]`` fp32 tensor per new
        token column (n of them), or None where not asked for."""
        if n == 0:
            return (() if self.want_scores else None), (() if self.want_logits else None)
        return (self._columns(self.scores, n) if self.want_scores else None,
                self._columns(self.logits, n) if self.want_logits else None)


StopCheck = Callable[[torch.Tensor, torch.Tensor], bool]
"""``(ids [1, len], scores [1, V]) -> stop``: one row's sequence up to a new token (its left
padding included, as transformers passes it) and that token's scores."""


def stopping_check(criteria) -> StopCheck:
    """A :data:`StopCheck` from transformers ``StoppingCriteria`` (a list or one criterion):
    True once any criterion says the row is done."""
    items = list(criteria) if isinstance(criteria, (list, tuple)) else [criteria]
    for c in items:
        if not callable(c):
            raise TypeError(f"stopping_criteria must hold callables (transformers "
                            f"StoppingCriteria), found {type(c).__name__}")

    def check(ids: torch.Tensor, scores: torch.Tensor) -> bool:
        return any(bool(torch.as_tensor(c(ids, scores)).any()) for c in items)

    return check
