"""Timing helpers shared by the benchmarks: the median time per call of a function, on the host
clock (CPU) or with CUDA events (GPU), and CUDA-graph capture of a call.

Each measurement runs ``repeats`` rounds of ``iters`` back-to-back calls and reports the median
over rounds of the time per call. ``iters`` is chosen from a warm-up estimate so that one round
takes about ``target_s`` seconds, between 1 and ``max_iters`` calls.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

Clock = Callable[[Callable[[], object], int], float]
"""``clock(fn, n)``: seconds that ``n`` back-to-back calls of ``fn`` take."""


@dataclass(frozen=True)
class Plan:
    """How long to measure: rounds, the most calls per round, and the wall time aimed at per
    round."""

    repeats: int = 20
    max_iters: int = 50
    target_s: float = 0.02
    warmup: int = 3


@dataclass(frozen=True)
class Timing:
    """Microseconds per call: the median and the fastest round, and how they were measured."""

    median_us: float
    min_us: float
    repeats: int
    iters: int


def host_clock(fn: Callable[[], object], n: int) -> float:
    """Wall time of ``n`` calls on the host clock (for CPU work, which finishes in the call)."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def cuda_clock(fn: Callable[[], object], n: int) -> float:
    """GPU time of ``n`` calls between two CUDA events on the current stream (waits for it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(fn: Callable[[], object], clock: Clock, plan: Plan) -> Timing:
    """Median time per call of ``fn`` over ``plan.repeats`` rounds, after a warm-up."""
    estimate = clock(fn, plan.warmup) / plan.warmup
    iters = max(1, min(plan.max_iters, round(plan.target_s / max(estimate, 1e-9))))
    per_call = [clock(fn, iters) / iters * 1e6 for _ in range(plan.repeats)]
    return Timing(statistics.median(per_call), min(per_call), plan.repeats, iters)


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of ``fn``, captured after ``warmup`` calls on a side stream (as
    torch.cuda.graph requires); replaying it re-runs the call's kernels without Python."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph
