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
    from fastdecode.decoding import cost

    flat = [(t, 1.0) for t in cost.PROBE_TOKENS]
    saved = dict(cost._COST_CACHE)
    try:
        cost._COST_CACHE.update({(id(model), "cpu", str(model.dtype), b): flat for b in range(32)})
        yield
    finally:
        cost._COST_CACHE.clear()
        cost._COST_CACHE.update(saved)
