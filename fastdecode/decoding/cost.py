"""The cost model of ``config="auto"``: the seconds of one forward against the number of tokens it
feeds, measured on this device at the current context length and cached per model, device,
dtype and context-length bucket. The probe forwards' KV is cropped off right away, so the
output cannot change.
"""

from __future__ import annotations

import time

import torch

from fastdecode.decoding.drafter import History
from fastdecode.hf.model import TreeRunner

PROBE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
_COST_CACHE: dict[tuple, list[tuple[int, float]]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_costs(runner: TreeRunner, tokens: torch.Tensor) -> list[tuple[int, float]]:
    """(tokens fed, seconds) of one chain-shaped forward per probe size, at the runner's current
    context (the single-token cost the faster of two runs). ``tokens``: int64 ``[B, 1]``, the
    token fed at every position. The probe's KV is cropped off."""
    B, device = tokens.shape[0], tokens.device
    costs = []
    for T in PROBE_TOKENS:
        parents = (torch.arange(T, device=device) - 1).expand(B, T).contiguous()
        feed = tokens[:, :1].expand(B, T).contiguous()
        best = float("inf")
        for _ in range(2 if T == 1 else 1):
            _sync(device)
            t0 = time.perf_counter()
            runner.forward(feed, parents)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            runner.cache.crop(-T)
        costs.append((T, best))
    return costs


def forward_costs(runner: TreeRunner, history: History) -> list[tuple[int, float]]:
    """The cost curve for ``runner``'s model at its current context length: measured once per
    model, device, dtype and power-of-two context bucket, then cached."""
    model = runner.model
    bucket = max(1, runner.seq_len).bit_length()
    key = (id(model), str(history.tokens.device), str(model.dtype), bucket)
    if key not in _COST_CACHE:
        last = history.tokens.gather(1, (history.end - 1)[:, None])
        _COST_CACHE[key] = measure_costs(runner, last)
    return _COST_CACHE[key]


def interpolate(costs: list[tuple[int, float]], T: float) -> float:
    """Seconds of a T-token forward, linear between probes and beyond the last two."""
    for (t0, c0), (t1, c1) in zip(costs, costs[1:]):
        if T <= t1:
            return c0 + (c1 - c0) * (T - t0) / (t1 - t0)
    (t0, c0), (t1, c1) = costs[-2], costs[-1]
    return c1 + (c1 - c0) * (T - t1) / (t1 - t0)
