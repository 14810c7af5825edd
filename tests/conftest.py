"""Shared test fixtures: the devices to run on and the backends to compare on each."""

from __future__ import annotations

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
