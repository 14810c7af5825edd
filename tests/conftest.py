"""Shared test fixtures: the devices to run on and the backends to compare on each."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from hypothesis import settings

settings.register_profile("fastdecode", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("fastdecode")

HAS_CUDA = torch.cuda.is_available()

# Every test parametrized over DEVICES runs on the CPU, and on the GPU where one exists; the GPU
# cases carry the `gpu` mark, so `pytest -m gpu` (make gpu-check) selects them.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                           pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
]

# The backends under test per device, the plain-torch reference first.
BACKENDS_ON = {"cpu": ("torch", "cpu"), "cuda": ("torch", "cuda")}


@contextlib.contextmanager
def flat_forward_costs(model: torch.nn.Module) -> Iterator[None]:
    """``config="auto"`` sees forwards of any size cost the same for ``model`` (as on a
    memory-bound GPU) instead of timing them: its choices no longer depend on this machine's
    speed."""
    from fastdecode.decoding import step_costs

    class Flat(step_costs.StepCosts):
        def add(self, context: int, tokens: int, seconds: float) -> None:
            return None

        def measured(self) -> bool:
            return True

        def curve(self, context: int) -> list[tuple[int, float]]:
            return [(t, 1.0) for t in step_costs.PROBE_TOKENS]

    saved = step_costs._BOOK.pop(model, None)
    step_costs._BOOK[model] = {("cpu", str(model.dtype)): Flat()}
    try:
        yield
    finally:
        del step_costs._BOOK[model]
        if saved is not None:
            step_costs._BOOK[model] = saved
