"""What an engine's step costs against the drafts it verifies, learned from the engine's own
step times as a drafter that the engine calls once per step sees them.

An engine such as vLLM calls its drafter once per step, after sampling, and the next step
verifies the drafts. The time from the end of one call to the start of the next is the engine's
step (schedule, forward, sample, output), so a drafter that records, per interval, the rows it
saw and the drafts it handed out collects the engine's step times without touching the engine.
:class:`EngineStepCosts` fits them with the model

    seconds = a + r * rows + b * drafts

(a fixed cost per step, a cost per request, a cost per draft token), robustly (Huber weights),
over the most recent ``WINDOW`` intervals that were clean: no request joined or was prefilling
during the interval, since prefill tokens are not in the model.

There is no fit until the drafts have varied (``b`` cannot be told from the rest before);
:meth:`EngineStepCosts.explore` tells the drafter when to vary them.

A line is not the whole curve: on vLLM's CPU engine a one-row step that feeds 4 tokens was
measured faster than one that feeds 1 or 2 (the matrix kernels change with the row count). So
:meth:`EngineStepCosts.seconds` answers from the step times kept per ``(rows, drafts)`` cell
(their median, once a cell holds ``CELL_MIN``) and from the line elsewhere.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np


class EngineStepCosts:
    """Step times of an engine, fitted as ``a + r * rows + b * drafts`` (see the module
    docstring).

    Args:
        clock: seconds, monotonic (default ``time.perf_counter``).
    """

    WINDOW = 128  # clean intervals kept
    MIN_SAMPLES = 6  # before the first fit (until then a drafter prices drafts by a guess)
    REFIT_EVERY = 8  # intervals between fits
    EXPLORE_EVERY = 16  # calls between exploring steps while the drafts do not vary
    CELL_KEEP = 16  # step times kept per (rows, drafts) cell
    CELL_MIN = 3  # before a cell's median replaces the line

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.fit: tuple[float, float, float] | None = None  # (a, r, b) in seconds
        self._samples: deque[tuple[int, int, float]] = deque(maxlen=self.WINDOW)
        self._since_fit = 0
        self._open: tuple[float, int, int] | None = None  # (end of the last call, rows, drafts)
        self._calls = 0
        self._cells: dict[tuple[int, int], deque[float]] = {}
        self._cell_median: dict[tuple[int, int], float] = {}

    def call_started(self, clean: bool) -> None:
        """At the start of a drafter call: closes the interval since the previous call and keeps
        it when ``clean`` (the engine ran only the previous call's rows and drafts)."""
        now = self.clock()
        self._calls += 1
        if self._open is not None and clean:
            end, rows, drafts = self._open
            if rows:
                self._samples.append((rows, drafts, now - end))
                self._keep_cell(rows, drafts, now - end)
                self._since_fit += 1
                if len(self._samples) >= self.MIN_SAMPLES and self._since_fit >= self.REFIT_EVERY:
                    self._refit()
        self._open = None

    def call_ended(self, rows: int, drafts: int) -> None:
        """At the end of a drafter call that handed ``drafts`` draft tokens to ``rows``
        decoding rows: the next step starts now."""
        self._open = (self.clock(), rows, drafts)

    def explore(self) -> bool:
        """Whether this call should hand out half the drafts it chose, so that the fit sees the
        drafts vary: every ``EXPLORE_EVERY`` calls while the kept intervals all had the same
        drafts (a batch that always drafts in full would never tell what a draft costs)."""
        if self._calls % self.EXPLORE_EVERY:
            return False
        return len({drafts for _, drafts, _ in self._samples}) < 2

    def seconds(self, rows: int, drafts: int) -> float | None:
        """The expected seconds of a step of ``rows`` decoding rows verifying ``drafts`` draft
        tokens in all: the median of the cell's kept step times once it holds ``CELL_MIN``,
        else the line's ``a + r * rows + b * drafts``; None before the first fit."""
        if self.fit is None:
            return None
        median = self._cell_median.get((rows, drafts))
        if median is not None:
            return median
        a, r, b = self.fit
        return a + r * rows + b * drafts

    def _keep_cell(self, rows: int, drafts: int, seconds: float) -> None:
        key = (rows, drafts)
        cell = self._cells.setdefault(key, deque(maxlen=self.CELL_KEEP))
        cell.append(seconds)
        if len(cell) >= self.CELL_MIN:
            self._cell_median[key] = float(np.median(cell))

    def _refit(self) -> None:
        self._since_fit = 0
        data = np.asarray(self._samples, dtype=np.float64)
        rows, drafts, seconds = data[:, 0], data[:, 1], data[:, 2]
        if np.ptp(drafts) == 0:
            return  # the drafts never varied: b cannot be told from the rest
        vary_rows = np.ptp(rows) > 0
        columns = [np.ones_like(rows), drafts] + ([rows] if vary_rows else [])
        X = np.stack(columns, axis=1)
        weights = np.ones_like(seconds)
        theta = np.zeros(X.shape[1])
        for _ in range(5):  # Huber: residuals past 1.5 robust deviations weigh less
            w = np.sqrt(weights)
            theta = np.linalg.lstsq(X * w[:, None], seconds * w, rcond=None)[0]
            residual = np.abs(seconds - X @ theta)
            scale = 1.4826 * float(np.median(residual)) + 1e-12
            weights = np.minimum(1.0, 1.5 * scale / np.maximum(residual, 1e-12))
        fixed, per_draft = max(0.0, float(theta[0])), max(0.0, float(theta[1]))
        per_row = max(0.0, float(theta[2])) if vary_rows else 0.0
        if not vary_rows:  # a and r are one constant for a batch that never changed size
            fixed, per_row = 0.0, fixed / float(rows[0])
        self.fit = (fixed, per_row, per_draft)

    def stats(self) -> dict:
        """The fit (seconds: fixed, per row, per draft token; None before one), the clean
        intervals kept, and the cells that answer :meth:`seconds` by their median
        (``"rows/drafts"``: seconds)."""
        return {"fit": self.fit, "samples": len(self._samples),
                "cells": {f"{r}/{d}": m for (r, d), m in sorted(self._cell_median.items())}}
