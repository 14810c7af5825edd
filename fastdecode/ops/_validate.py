"""Argument checks shared by the ops: each failure names the argument, what was expected and what
was found, and raises before any pointer reaches C++ or CUDA."""

from __future__ import annotations

from typing import Sequence

import torch


def tensor(name: str, x: object, dtype: torch.dtype | None = None, ndim: int | None = None,
           layout: str = "") -> torch.Tensor:
    """Checks that ``x`` is a tensor of ``dtype`` with ``ndim`` dims (``layout`` names them)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, found {type(x).__name__}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, found {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dims {layout}".rstrip() + f", found shape {tuple(x.shape)}"
        )
    return x


def shape(name: str, x: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    """Checks ``x.shape == expected``; ``layout`` spells the expected dims, e.g. ``[B, T]``."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, found {tuple(x.shape)}"
        )


def same_device(named: Sequence[tuple[str, torch.Tensor]]) -> torch.device:
    """Checks that all tensors share the first one's device, and returns it."""
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.device != first.device:
            raise ValueError(
                f"{name} is on {x.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )
    return first.device


def integer(name: str, x: object, low: int | None = None, high: int | None = None) -> int:
    """Checks that ``x`` is an int in ``[low, high]`` (either bound optional)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, found {type(x).__name__}")
    if (low is not None and x < low) or (high is not None and x > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], found {x}")
    return x
