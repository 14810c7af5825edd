"""What one forward of a model costs against the number of tokens it feeds, as measured on this
device: the input of every step budget (``config="auto"``).

A :class:`StepCosts` belongs to one (model, device, dtype) and keeps, per power-of-two
context-length bucket, the seconds of the most recent single-token forwards, and per tokens fed
T > 1 the most recent ratios of a T-token forward's seconds to the single-token estimate of
the moment it ran (``SAMPLES`` of each). An estimate is a median of those, so a step slowed by
another job on the machine moves it little, while a lasting change (a busier machine, a longer
context) takes over within a few steps; and since larger steps are kept as ratios, a change
that slows every forward alike moves the whole curve as soon as the single-token forwards see
it. A bucket's curve is its single-token median times, per T, the ratio from the nearest bucket
that has one (the ratio changes slowly with the context).

:func:`costs_of` finds a model's costs through a weak reference, so a new model is never served
an old one's figures, and the entry goes when the model goes.
"""

from __future__ import annotations

import statistics
import weakref
from collections import deque

import torch

SAMPLES = 15  # recent timings kept per (bucket, tokens fed)
# Tokens fed by the probe forwards of a model not timed before: about eight single-token
# forwards' worth on a CPU. Larger steps are extrapolated until a real step of that size is timed.
PROBE_TOKENS = (1, 2, 4, 8, 16)


def bucket_of(context: int) -> int:
    """The context-length bucket of a cache holding ``context`` rows: its bit length."""
    return max(1, context).bit_length()


class StepCosts:
    """Timed forwards of one model on one device and dtype (see the module docstring)."""

    def __init__(self) -> None:
        self._single: dict[int, deque[float]] = {}  # bucket: seconds of 1-token forwards
        self._ratios: dict[int, dict[int, deque[float]]] = {}  # bucket: T: ratios to 1 token
        self._curves: dict[int, list[tuple[int, float]]] = {}
        self._medians: dict[tuple[int, int], float] = {}  # (bucket, tokens): median, until an add

    def _median(self, b: int, tokens: int) -> float:
        """The median of bucket ``b``'s samples for ``tokens`` (seconds for 1, else ratios),
        kept until that list changes."""
        key = (b, tokens)
        if key not in self._medians:
            samples = self._single[b] if tokens == 1 else self._ratios[b][tokens]
            self._medians[key] = statistics.median(samples)
        return self._medians[key]

    def _base(self, b: int) -> float | None:
        """The single-token median of bucket ``b``, else of the nearest bucket with one."""
        if not self._single:
            return None
        return self._median(min(self._single, key=lambda bb: (abs(bb - b), bb)), 1)

    def add(self, context: int, tokens: int, seconds: float) -> None:
        """Records one forward of ``tokens`` tokens that took ``seconds`` at a context of
        ``context`` cached rows (a larger one before any single-token forward is dropped)."""
        b = bucket_of(context)
        if tokens == 1:
            self._single.setdefault(b, deque(maxlen=SAMPLES)).append(seconds)
        else:
            base = self._base(b)
            if base is None or base <= 0:
                return
            self._ratios.setdefault(b, {}).setdefault(tokens, deque(maxlen=SAMPLES)).append(
                seconds / base)
        self._medians.pop((b, tokens), None)
        self._curves.clear()

    def median(self, context: int, tokens: int) -> float | None:
        """The estimated seconds of a ``tokens``-token forward from ``context``'s own bucket
        (no other bucket's figures), or None when it has none."""
        b = bucket_of(context)
        if b not in self._single:
            return None
        base = self._median(b, 1)
        if tokens == 1:
            return base
        ratios = self._ratios.get(b, {}).get(tokens)
        return base * self._median(b, tokens) if ratios else None

    def measured(self) -> bool:
        """Whether a single-token and a larger forward have been timed."""
        return bool(self._single) and bool(self._ratios)

    def curve(self, context: int) -> list[tuple[int, float]]:
        """``(tokens fed, seconds)`` in increasing T at a context of ``context`` rows (see the
        module docstring); empty until :meth:`measured`. Cached until the next :meth:`add`."""
        if not self.measured():
            return []
        b = bucket_of(context)
        if b not in self._curves:
            near = sorted(self._ratios, key=lambda bb: (abs(bb - b), bb))
            ratios: dict[int, float] = {1: 1.0}
            for bb in near:
                for t in self._ratios[bb]:
                    if t not in ratios:
                        ratios[t] = self._median(bb, t)
            base = self._base(b)
            self._curves[b] = [(t, base * ratios[t]) for t in sorted(ratios)]
        return self._curves[b]


_BOOK: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], StepCosts]] = (
    weakref.WeakKeyDictionary())


def costs_of(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> StepCosts:
    """The :class:`StepCosts` of ``model`` on ``device`` in ``dtype`` (made on first use)."""
    return _BOOK.setdefault(model, {}).setdefault((str(device), str(dtype)), StepCosts())


def interpolate(curve: list[tuple[int, float]], tokens: float) -> float:
    """Seconds of a forward of ``tokens`` tokens on ``curve`` (at least two points): linear
    between points, and along the last two beyond them."""
    for (t0, c0), (t1, c1) in zip(curve, curve[1:]):
        if tokens <= t1:
            return c0 + (c1 - c0) * (tokens - t0) / (t1 - t0)
    (t0, c0), (t1, c1) = curve[-2], curve[-1]
    return c1 + (c1 - c0) * (tokens - t1) / (t1 - t0)
