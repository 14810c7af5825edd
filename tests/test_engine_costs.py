"""fastdecode.integrations.engine_costs.EngineStepCosts on a fake clock: an engine whose steps
take ``a + r * rows + b * drafts`` seconds, as a drafter called once per step sees them."""

from __future__ import annotations

import random

import pytest

from fastdecode.integrations.engine_costs import EngineStepCosts


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(costs: EngineStepCosts, clock: Clock, steps: list[tuple[int, int]],
          model: tuple[float, float, float], clean: bool = True,
          noise: float = 0.0, outliers: float = 0.0, seed: int = 0) -> None:
    """One drafter call per (rows, drafts), the engine's step between calls."""
    rng = random.Random(seed)
    a, r, b = model
    for rows, drafts in steps:
        costs.call_started(clean)
        costs.call_ended(rows, drafts)
        seconds = (a + r * rows + b * drafts) * (1 + noise * rng.uniform(-1, 1))
        if rng.random() < outliers:
            seconds *= 5  # another job took the core for a while
        clock.now += seconds


def varied(n: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rows = rng.randint(1, 16)
        out.append((rows, rng.randint(0, 8 * rows)))
    return out


def test_no_fit_until_the_drafts_vary_then_the_engines_line():
    clock = Clock()
    costs = EngineStepCosts(clock=clock)
    assert costs.seconds(4, 8) is None and costs.fit is None
    model = (0.010, 0.002, 0.0005)
    drive(costs, clock, varied(EngineStepCosts.MIN_SAMPLES - 1), model)
    assert costs.fit is None and costs.seconds(4, 8) is None
    drive(costs, clock, varied(EngineStepCosts.MIN_SAMPLES + 8, seed=2), model)
    fixed, per_row, per_draft = costs.fit
    assert fixed == pytest.approx(0.010, rel=1e-6)
    assert per_row == pytest.approx(0.002, rel=1e-6)
    assert per_draft == pytest.approx(0.0005, rel=1e-6)
    for rows, drafts in ((1, 0), (3, 17), (16, 128)):
        assert costs.seconds(rows, drafts) == pytest.approx(0.010 + 0.002 * rows
                                                            + 0.0005 * drafts)
    assert costs.stats()["samples"] == 2 * EngineStepCosts.MIN_SAMPLES + 6  # calls less one


def test_noise_and_outliers_move_the_fit_little():
    clock = Clock()
    costs = EngineStepCosts(clock=clock)
    model = (0.020, 0.001, 0.002)
    drive(costs, clock, varied(EngineStepCosts.WINDOW), model, noise=0.05, outliers=0.1)
    fixed, per_row, per_draft = costs.fit
    assert per_draft == pytest.approx(0.002, rel=0.15)
    assert fixed + 8 * per_row == pytest.approx(0.020 + 0.008, rel=0.15)


def test_intervals_with_prefill_are_not_kept():
    clock = Clock()
    costs = EngineStepCosts(clock=clock)
    drive(costs, clock, varied(64), (0.01, 0.0, 0.001), clean=False)
    assert costs.stats()["samples"] == 0 and costs.fit is None
    fresh = EngineStepCosts(clock=clock)
    fresh.call_started(True)  # a drafter's first call closes no interval
    assert fresh.stats()["samples"] == 0


def test_drafts_that_never_vary_give_no_fit_and_a_fixed_batch_folds_its_costs():
    clock = Clock()
    costs = EngineStepCosts(clock=clock)
    drive(costs, clock, [(4, 0)] * 64, (0.01, 0.001, 0.002))
    assert costs.fit is None and costs.seconds(4, 0) is None
    clock2 = Clock()
    costs2 = EngineStepCosts(clock=clock2)
    rng = random.Random(3)
    drive(costs2, clock2, [(4, rng.randint(0, 32)) for _ in range(64)], (0.01, 0.001, 0.002))
    # one batch size: the fixed and per-row costs are one constant, shared by its 4 rows
    fixed, per_row, per_draft = costs2.fit
    assert fixed == 0.0 and per_row == pytest.approx(0.014 / 4)
    assert per_draft == pytest.approx(0.002)


def test_a_cell_seen_often_answers_by_its_median_where_the_line_is_wrong():
    """An engine whose one-row steps feeding 4 tokens take less than those feeding 1 (as
    vLLM's CPU engine was measured): once a (rows, drafts) cell holds CELL_MIN step times its
    median answers, and cells not seen often enough keep the line."""
    clock = Clock()
    costs = EngineStepCosts(clock=clock)
    times = {0: 0.050, 1: 0.060, 2: 0.047, 3: 0.044, 4: 0.044, 5: 0.044, 6: 0.052, 7: 0.054}
    steps = [(1, d) for d in times] * 4
    for rows, drafts in steps:
        costs.call_started(True)
        costs.call_ended(rows, drafts)
        clock.now += times[drafts]
    assert costs.fit is not None
    for drafts, seconds in times.items():  # the last cell was closed 3 times, not 4
        assert costs.seconds(1, drafts) == pytest.approx(seconds)
    assert costs.seconds(1, 3) < costs.seconds(1, 0)
    a, r, b = costs.fit
    assert costs.seconds(2, 3) == pytest.approx(a + 2 * r + 3 * b)
    assert costs.stats()["cells"]["1/3"] == pytest.approx(0.044)
