"""Access to the native extension ``fastdecode._C`` and the facts the dispatcher needs about it."""

from __future__ import annotations

from typing import Callable

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


def launch(fn: Callable[..., None], like: torch.Tensor, *args: object) -> None:
    """Runs the native op ``fn`` (e.g. ``_C.verify_tree``) on ``like``'s device.

    Every op of ``_C`` takes ``(device, stream, *args)``: for a CUDA tensor this calls
    ``fn("cuda", stream, *args)`` inside ``torch.cuda.device(like.device)`` with the raw current
    stream there; for any other tensor ``fn(like.device.type, 0, *args)``, which runs on the
    CPU or, for a device the extension has no kernels for, raises ValueError. ``args`` are the
    op's data pointers and sizes.
    """
    if like.device.type == "cuda":
        with torch.cuda.device(like.device):
            fn("cuda", stream_of(like), *args)
    else:
        fn(like.device.type, 0, *args)
