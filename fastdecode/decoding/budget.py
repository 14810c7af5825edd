"""The step budget of ``config="auto"``: how much a step drafts, chosen by the decoding loop.

Every step an adaptive drafter lists its options (:class:`Option`: what to draft, the tokens
each row is expected to emit, the tokens each row feeds the forward), plain decoding first.
:class:`BudgetChooser` prices each option on the runner's measured cost curve
(:mod:`fastdecode.decoding.step_costs`) and takes the one with the most expected tokens per second;
plain decoding wins unless another option promises ``margin`` times its rate, because the
drafter's own host work and the estimates' noise are not in the curve. The chosen option's
``budget`` is what the drafter's ``propose`` receives. The choice statistics are kept here too.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, NamedTuple

from fastdecode.decoding.step_costs import interpolate

MARGIN = 1.05  # drafting must promise this much more than plain decoding
NEARLY_FREE = 1.15  # a forward "costs almost nothing extra" within this factor of one token's


class Option(NamedTuple):
    """One way to run a step. budget: what ``propose`` receives; label: its name in the stats;
    tokens: the expected tokens emitted per row (the bonus token included); fed: the tokens
    per row the forward takes."""

    budget: Hashable
    label: str
    tokens: float
    fed: float


def nearly_free(curve: list[tuple[int, float]], tokens: float) -> bool:
    """Whether a forward of ``tokens`` tokens costs at most ``NEARLY_FREE`` times a
    single-token one on ``curve``."""
    return interpolate(curve, tokens) <= NEARLY_FREE * interpolate(curve, 1)


class BudgetChooser:
    """Picks each step's option (see the module docstring) and counts the choices."""

    def __init__(self, margin: float = MARGIN) -> None:
        self.margin = margin
        self.choices: Counter[str] = Counter()
        self.curve: list[tuple[int, float]] = []

    def choose(self, curve: list[tuple[int, float]], options: list[Option]) -> Hashable:
        """The budget of the option with the best expected tokens per second on ``curve``;
        ``options[0]`` is plain decoding, which the others must beat by ``margin``."""
        self.curve = curve
        plain = options[0]
        best, pick = self.margin * plain.tokens / interpolate(curve, plain.fed), plain
        for option in options[1:]:
            rate = option.tokens / interpolate(curve, option.fed)
            if rate > best:
                best, pick = rate, option
        self.choices[pick.label] += 1
        return pick.budget

    def stats(self) -> dict:
        """The choices made (label: steps) and the last cost curve used (tokens: seconds)."""
        return {"choices": dict(sorted(self.choices.items())),
                "cost_s": {t: round(c, 6) for t, c in self.curve}}
