"""What every CASTLE op shares: the accepted dtypes and head dims, the spelling of "no
window", the dtype of the state, which tokens write into which lookahead keys, and the checks of
the public arguments."""

from __future__ import annotations

import math

import torch

from fastdecode.ops import _validate

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
NO_WINDOW = -1
"""The custom ops' spelling of ``window=None`` (full lookahead)."""
NAMES = ("qc", "kc", "vc", "qu", "ku", "vu")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lookahead keys and softmax statistics for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lookahead_allowed(s: torch.Tensor, r: torch.Tensor, window: int) -> torch.Tensor:
    """bool ``[len(s), len(r)]``: whether token r writes into the lookahead key of s
    (``s < r``, and ``r <= s + window`` unless ``window == NO_WINDOW``)."""
    ok = s[:, None] < r[None, :]
    if window != NO_WINDOW:
        ok &= r[None, :] <= s[:, None] + window
    return ok


def check_scale(scale: object, D: int) -> float:
    """``scale`` as a float, ``1 / sqrt(D)`` for None; a bool, non-number or non-finite value
    raises."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, found {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, found {scale}")
    return float(scale)


def check_window(window: object) -> int:
    """``window`` as the custom ops take it: :data:`NO_WINDOW` for None, else an int >= 0."""
    if window is None:
        return NO_WINDOW
    return _validate.integer("window", window, 0)


def check_six(tensors: tuple, layout: str) -> tuple[torch.Tensor, ...]:
    """Checks the six projections: 4-D ``[B, H, L, D]`` tensors of one shape, dtype and device
    with D a multiple of 16 in [16, 256]; returns them with unit stride on D."""
    for name, x in zip(NAMES, tensors):
        _validate.tensor(name, x, None, 4, layout)
    qc = tensors[0]
    if qc.dtype not in DTYPES:
        raise TypeError(f"qc must have dtype float16, bfloat16, float32 or float64, found "
                        f"{qc.dtype}")
    for name, x in zip(NAMES, tensors):
        _validate.tensor(name, x, qc.dtype)
        _validate.shape(name, x, qc.shape, layout)
    D = qc.shape[3]
    if D % 16 or not 16 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim D must be a multiple of 16 in [16, {MAX_HEAD_DIM}], "
                         f"found qc shape {tuple(qc.shape)}")
    _validate.same_device(list(zip(NAMES, tensors)))
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in tensors)
