"""Self-guided training (Wei et al. 2024, section 2): a structured layer S trains next to a dense
``W`` that starts as S's own dense equivalent and hands over control as α decays,

    o = α W x + (1 − α) S(x) + bias,   α(t) = ½ (1 + cos(π t / T_g)) for t ≤ T_g, then 0,

with t the number of optimizer steps taken. Once α reaches 0 the dense W is freed (and
removed from the optimizer when one is given), leaving a plain structured layer.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.nn.structured_linear import StructuredLinear
from fastdecode.ops import _validate

SCHEDULES = ("cosine", "linear")


def guide_alpha(step: int, guide_steps: int, schedule: str = "cosine") -> float:
    """α after ``step`` optimizer steps of a ``guide_steps``-step guided phase: cosine
    ``½(1 + cos(π t/T_g))`` or linear ``1 − t/T_g``; exactly 1 at t = 0 and 0 from t = T_g on
    (and always 0 when ``guide_steps`` is 0)."""
    _validate.integer("step", step, 0)
    _validate.integer("guide_steps", guide_steps, 0)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'cosine' or 'linear', found {schedule!r}")
    if step >= guide_steps:
        return 0.0
    if step == 0:
        return 1.0
    frac = step / guide_steps
    return 0.5 * (1.0 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac


class SelfGuided(nn.Module):
    """Wraps a structured linear layer for self-guided training.

    Args:
        layer: a :class:`~fastdecode.nn.StructuredLinear`; the wrapper's output has its shapes
            and dtype. Its bias is added once.
        guide_steps: T_g, optimizer steps of the guided phase (0: no guidance at all).
        schedule: ``"cosine"`` (the paper's) or ``"linear"``.
        stochastic: the paper's cheap variant: each forward call computes the dense branch only
            with probability α (and then mixes as above), else returns S(x). Its EXPECTED
            output is ``α² W x + (1 − α²) S(x)``, not the deterministic mix: it is an unbiased
            estimate of deterministic guidance with coefficient α². The coin is drawn on the
            host from a generator seeded by ``(seed, layer_id, step, call within the step)``,
            so no device-to-host sync happens and every data-parallel rank draws the same.
        seed, layer_id: the coin's seed parts (give every wrapped layer its own ``layer_id``).

    The dense matrix ``guide`` (``[out, in]``, a parameter) starts as ``layer.to_dense()``, so
    the output at t = 0 equals the layer's. Call :meth:`step` once per optimizer step (after
    all gradient-accumulation micro-steps); the step count is the buffer ``count`` and survives
    ``state_dict`` round trips.
    """

    def __init__(self, layer: StructuredLinear, guide_steps: int, schedule: str = "cosine",
                 stochastic: bool = False, seed: int = 0, layer_id: int = 0) -> None:
        super().__init__()
        if not isinstance(layer, StructuredLinear):
            raise TypeError(f"layer must be a StructuredLinear, found {type(layer).__name__}")
        self.layer = layer
        self.guide_steps = _validate.integer("guide_steps", guide_steps, 0)
        guide_alpha(0, guide_steps, schedule)  # validates schedule
        self.schedule, self.stochastic = schedule, bool(stochastic)
        self.seed = _validate.integer("seed", seed)
        self.layer_id = _validate.integer("layer_id", layer_id)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        if guide_steps > 0:
            self.guide = nn.Parameter(layer.to_dense().detach().clone())
        else:
            self.register_parameter("guide", None)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self._step = 0  # host mirror of `count`: reading the buffer would sync the device
        self._calls = 0  # forward calls since the last step (the coin's micro-step)
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken."""
        return self._step

    @property
    def alpha(self) -> float:
        """The current α."""
        return guide_alpha(self._step, self.guide_steps, self.schedule)

    @property
    def num_params(self) -> int:
        """The structured layer's weight parameters, plus the dense guide's while it lives."""
        return self.layer.num_params + (0 if self.guide is None else self.guide.numel())

    def flops(self, tokens: int) -> int:
        """MACs of a forward call that computes both branches (the structured one alone once
        the guide is freed)."""
        dense = 0 if self.guide is None else self.guide.numel() * tokens
        return self.layer.flops(tokens) + dense

    def coin(self) -> float:
        """The uniform draw of the next forward call (stochastic mode); host-side, seeded."""
        rng = random.Random(f"{self.seed}:{self.layer_id}:{self._step}:{self._calls}")
        return rng.random()

    def reset_guide(self) -> None:
        """Sets the guide to the layer's current dense equivalent (after re-initialising the
        layer, so that the output is unchanged at the start of guidance)."""
        if self.guide is not None:
            with torch.no_grad():
                self.guide.copy_(self.layer.to_dense())

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Advances t by one optimizer step; frees the guide once α reaches 0 (see
        :meth:`release`)."""
        self._step += 1
        self._calls = 0
        self.count.fill_(self._step)
        if self.guide is not None and self.alpha == 0.0:
            self.release(optimizer)

    def release(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Frees the dense guide, and drops it and its state (Adam moments) from ``optimizer``
        when given (else the optimizer keeps a reference and its memory stays)."""
        guide = self.guide
        if guide is None:
            return
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not guide]
            optimizer.state.pop(guide, None)
        self.guide = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.layer(x)
        a = self.alpha
        if self.guide is None or a == 0.0:
            return s
        if self.stochastic:
            draw = self.coin()
            self._calls += 1
            if draw >= a:
                return s
        # α (W x + b) + (1 − α)(S x + b): the bias counts once; lerp gives W x + b exactly at
        # α = 1 (and a zero gradient to S).
        return torch.lerp(s, F.linear(x, self.guide, self.layer.bias), a)

    def extra_repr(self) -> str:
        return (f"guide_steps={self.guide_steps}, schedule={self.schedule!r}, "
                f"stochastic={self.stochastic}, step={self._step}")


def _after_load(module: SelfGuided, _incompatible) -> None:
    module._step = int(module.count)
    module._calls = 0
    if module.guide is not None and module.alpha == 0.0:
        module.release()


def self_guide(model: nn.Module, guide_steps: int, schedule: str = "cosine",
               stochastic: bool = False, seed: int = 0) -> list[SelfGuided]:
    """Wraps every :class:`StructuredLinear` inside ``model`` (in place) in a
    :class:`SelfGuided` with its own ``layer_id`` (their order in ``model.modules()``), and
    returns the wrappers. Build the optimizer afterwards so that it sees the guides."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if isinstance(child, StructuredLinear) and not isinstance(parent, SelfGuided)]
    wrappers = []
    for layer_id, (parent, name, child) in enumerate(targets):
        wrapper = SelfGuided(child, guide_steps, schedule, stochastic, seed, layer_id)
        setattr(parent, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def guided_layers(model: nn.Module) -> Iterator[SelfGuided]:
    """Every :class:`SelfGuided` inside ``model``."""
    return (m for m in model.modules() if isinstance(m, SelfGuided))


def step_self_guided(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Calls :meth:`SelfGuided.step` on every wrapper inside ``model`` (once per optimizer
    step)."""
    for m in guided_layers(model):
        m.step(optimizer)
