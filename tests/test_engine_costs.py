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


def test_prior_until_fitted_then_the_engines_price():
    clock = Clock()
    costs = EngineStepCosts(0.1, clock=clock)
    assert costs.token_cost(4) == 0.1 and costs.fit is None
    model = (0.010, 0.002, 0.0005)
    drive(costs, clock, varied(EngineStepCosts.MIN_SAMPLES - 1), model)
    assert costs.fit is None
    drive(costs, clock, varied(EngineStepCosts.MIN_SAMPLES + 8, seed=2), model)
    fixed, per_row, per_draft = costs.fit
    assert fixed == pytest.approx(0.010, rel=1e-6)
    assert per_row == pytest.approx(0.002, rel=1e-6)
    assert per_draft == pytest.approx(0.0005, rel=1e-6)
    for rows in (1, 3, 16):
        assert costs.token_cost(rows) == pytest.approx(0.0005 * rows / (0.010 + 0.002 * rows))
    assert costs.stats()["samples"] == 2 * EngineStepCosts.MIN_SAMPLES + 6  # calls less one


def test_noise_and_outliers_move_the_fit_little():
    clock = Clock()
    costs = EngineStepCosts(0.1, clock=clock)
    model = (0.020, 0.001, 0.002)
    drive(costs, clock, varied(EngineStepCosts.WINDOW), model, noise=0.05, outliers=0.1)
    truth = 0.002 * 8 / (0.020 + 0.001 * 8)
    assert costs.token_cost(8) == pytest.approx(truth, rel=0.15)


def test_intervals_with_prefill_are_not_kept():
    clock = Clock()
    costs = EngineStepCosts(0.1, clock=clock)
    drive(costs, clock, varied(64), (0.01, 0.0, 0.001), clean=False)
    assert costs.stats()["samples"] == 0 and costs.fit is None
    fresh = EngineStepCosts(0.1, clock=clock)
    fresh.call_started(True)  # a drafter's first call closes no interval
    assert fresh.stats()["samples"] == 0


def test_drafts_that_never_vary_keep_the_prior_and_a_fixed_batch_folds_its_costs():
    clock = Clock()
    costs = EngineStepCosts(0.25, clock=clock)
    drive(costs, clock, [(4, 0)] * 64, (0.01, 0.001, 0.002))
    assert costs.fit is None and costs.token_cost(4) == 0.25
    clock2 = Clock()
    costs2 = EngineStepCosts(0.25, clock=clock2)
    rng = random.Random(3)
    drive(costs2, clock2, [(4, rng.randint(0, 32)) for _ in range(64)], (0.01, 0.001, 0.002))
    # one batch size: the fixed and per-row costs are one constant, shared by its 4 rows
    assert costs2.token_cost(4) == pytest.approx(0.002 * 4 / (0.01 + 0.004))
