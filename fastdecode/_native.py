"""Access to the native extension ``fastdecode._C`` and the facts the dispatcher needs about it."""

from __future__ import annotations

import torch

try:
    from fastdecode import _C
except ImportError:  # a source tree that was never built: only the torch backend runs
    _C = None


def cpu_built() -> bool:
    """Whether the C++ (``cpu``) kernels are importable."""
    return _C is not None


def cuda_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built)


def cuda_archs() -> list[str]:
    """The CUDA architectures the extension was compiled for, e.g. ``["80", "90"]``."""
    return [a for a in (_C.cuda_archs.split(",") if cuda_built() else []) if a]


def stream_of(t: torch.Tensor) -> int:
    """The raw ``cudaStream_t`` of the current stream on ``t``'s device, as an integer."""
    return torch.cuda.current_stream(t.device).cuda_stream
