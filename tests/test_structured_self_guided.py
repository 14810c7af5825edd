"""Self-guided training (fastdecode.nn.SelfGuided): the α schedules, the output at t = 0 and
at α = 1, the deterministic mix, the stochastic variant's expectation α² W x + (1 − α²) S(x)
(statistically), its host-side seeded coin, freeing the dense W at α = 0, and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from fastdecode.nn.ffn import StructuredFFN
from fastdecode.nn.self_guided import SelfGuided, guide_alpha, self_guide, step_self_guided
from fastdecode.nn.structured_linear import (
    BlockDenseLinear,
    BlockShuffleLinear,
    LowRankLinear,
)


def test_alpha_schedules() -> None:
    assert guide_alpha(0, 100) == 1.0
    assert guide_alpha(50, 100) == pytest.approx(0.5, abs=1e-15)
    assert guide_alpha(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert guide_alpha(100, 100) == 0.0
    assert guide_alpha(150, 100) == 0.0
    assert guide_alpha(0, 100, "linear") == 1.0
    assert guide_alpha(25, 100, "linear") == 0.75
    assert guide_alpha(100, 100, "linear") == 0.0
    assert guide_alpha(0, 0) == 0.0
    with pytest.raises(ValueError):
        guide_alpha(0, 10, "exp")
    with pytest.raises(ValueError):
        guide_alpha(-1, 10)


@pytest.mark.parametrize("make", [lambda: LowRankLinear(12, 8, 4, bias=True),
                                  lambda: BlockDenseLinear(12, 8, 4, 2, bias=True),
                                  lambda: BlockShuffleLinear(12, 8, 4, bias=True)])
def test_start_equals_structured_and_alpha_one_is_dense(make) -> None:
    layer = make()
    with torch.no_grad():
        layer.bias.normal_()
    sg = SelfGuided(layer, guide_steps=10)
    x = torch.randn(5, 12)
    torch.testing.assert_close(sg(x), layer(x), rtol=1e-5, atol=1e-6)
    # alpha = 1: exactly W x + b, and the structured factors get zero gradient.
    with torch.no_grad():
        sg.guide.add_(0.1 * torch.randn_like(sg.guide))
    y = sg(x)
    torch.testing.assert_close(y, x @ sg.guide.T + layer.bias, rtol=0, atol=0)
    y.sum().backward()
    for f in layer.factors():
        assert f.grad is None or f.grad.abs().max() == 0
    assert sg.guide.grad is not None and sg.guide.grad.abs().max() > 0


def test_deterministic_mix() -> None:
    layer = LowRankLinear(12, 8, 4, bias=True)
    sg = SelfGuided(layer, guide_steps=4)
    with torch.no_grad():
        sg.guide.normal_()
        layer.bias.normal_()
    x = torch.randn(3, 12)
    for _ in range(2):
        sg.step()
    a = sg.alpha
    assert a == pytest.approx(0.5)
    expected = a * (x @ sg.guide.T) + (1 - a) * (x @ layer.to_dense().T) + layer.bias
    torch.testing.assert_close(sg(x), expected)


def test_stochastic_expectation_is_alpha_squared() -> None:
    layer = LowRankLinear(6, 4, 2)
    sg = SelfGuided(layer, guide_steps=3, stochastic=True, seed=7, layer_id=3)
    with torch.no_grad():
        sg.guide.normal_()
    sg.step()
    a = sg.alpha  # 0.75
    x = torch.randn(2, 6)
    dense, structured = x @ sg.guide.T, layer(x)
    n, hits = 4000, 0
    total = torch.zeros_like(structured)
    with torch.no_grad():
        for _ in range(n):
            y = sg(x)
            hits += not torch.equal(y, structured)
            total += y
    # The coin: frequency of the dense branch -> alpha (binomial, 5 sigma).
    assert abs(hits / n - a) < 5 * math.sqrt(a * (1 - a) / n)
    mean = total / n
    expected = a * a * dense + (1 - a * a) * structured
    deterministic = a * dense + (1 - a) * structured
    # Per element, the mean's standard error is alpha |W x - S x| sqrt(a(1 - a)/n).
    sigma = a * (dense - structured).abs() * math.sqrt(a * (1 - a) / n)
    assert ((mean - expected).abs() <= 5 * sigma + 1e-6).all()
    assert ((mean - deterministic).abs() > 5 * sigma).any()


def test_coin_is_host_side_and_reproducible() -> None:
    def draws(seed: int, layer_id: int) -> list[float]:
        sg = SelfGuided(LowRankLinear(6, 4, 2), 5, stochastic=True, seed=seed,
                        layer_id=layer_id)
        out = []
        for _ in range(3):
            for _ in range(2):  # micro-steps
                out.append(sg.coin())
                sg._calls += 1
            sg.step()
        return out

    assert draws(1, 0) == draws(1, 0)  # every rank draws the same
    assert draws(1, 0) != draws(1, 1) and draws(1, 0) != draws(2, 0)
    assert all(isinstance(d, float) for d in draws(1, 0))


def test_guide_freed_at_alpha_zero() -> None:
    layer = BlockShuffleLinear(8, 8, 2)
    sg = SelfGuided(layer, guide_steps=2)
    opt = torch.optim.AdamW(sg.parameters(), lr=1e-2)
    x = torch.randn(4, 8)
    assert sg.num_params == layer.num_params + 64
    for _ in range(2):
        sg(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        step_self_guided(sg, opt)
    assert sg.alpha == 0.0 and sg.guide is None
    assert sg.num_params == layer.num_params
    assert all(p is not None for g in opt.param_groups for p in g["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == layer.num_params
    assert len(opt.state) == 2
    torch.testing.assert_close(sg(x), layer(x))
    sg(x).sum().backward()  # trains on as a plain structured layer
    opt.step()


def test_state_dict_round_trip() -> None:
    sg = SelfGuided(LowRankLinear(6, 4, 2), guide_steps=10)
    for _ in range(3):
        sg.step()
    fresh = SelfGuided(LowRankLinear(6, 4, 2), guide_steps=10)
    fresh.load_state_dict(sg.state_dict())
    assert fresh.step_count == 3 and fresh.alpha == sg.alpha


def test_self_guide_wraps_every_structured_layer() -> None:
    model = torch.nn.Sequential(StructuredFFN(8, 16, "lowrank", rank=4),
                                StructuredFFN(8, 16, "blockshuffle", blocks=2))
    x = torch.randn(3, 8)
    before = model(x)
    wrappers = self_guide(model, guide_steps=4, stochastic=True)
    assert [w.layer_id for w in wrappers] == [0, 1, 2, 3]
    assert isinstance(model[0].fc1, SelfGuided)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        SelfGuided(torch.nn.Linear(4, 4), 3)
    with pytest.raises(ValueError):
        SelfGuided(LowRankLinear(4, 4, 2), -1)
    with pytest.raises(ValueError):
        SelfGuided(LowRankLinear(4, 4, 2), 3, schedule="step")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_forward_captures_in_a_cuda_graph() -> None:
    """No device-to-host sync in the forward (a sync inside capture raises)."""
    for stochastic in (False, True):
        sg = SelfGuided(LowRankLinear(64, 32, 16).cuda(), 10, stochastic=stochastic).cuda()
        sg.step()
        x = torch.randn(4, 64, device="cuda")
        with torch.no_grad():
            sg(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = sg(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()
