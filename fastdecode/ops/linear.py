"""A CPU fp32 linear layer for a few rows: ``y = x @ weight.T + bias`` for the handful of tokens
of a speculative-decoding verification forward, where BLAS sgemm is tuned poorly (on the
reference Zen 4 core, torch's ``F.linear`` takes 2x its 1-row time for 2 rows and 3x for 3).

The ``cpu`` backend (fastdecode._C) streams each weight row from memory once, prefetched into
L2, and reuses it for up to 8 rows of ``x`` held in registers; it has AVX-512, AVX2+FMA and
portable paths, picked once per process from the CPU (see :func:`small_linear_isa`). Its
result does not depend on how many rows are computed together: row i of ``small_linear(x)``
equals ``small_linear(x[i:i+1])`` bitwise (on one path). The ``torch`` backend is ``F.linear``.

This file holds the op's plain-torch reference, its native launcher, its ``torch.library``
registration and its public, validated entry point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode import _native
from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) itself when its rows have unit inner stride and do not overlap, else a
    contiguous copy."""
    rows, cols = t.shape
    if (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= cols):
        return t
    return t.contiguous()


# ---- backends ---------------------------------------------------------------------------------


def small_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """Plain-torch :func:`small_linear` on a 2-D ``x``: ``F.linear``."""
    return F.linear(x, weight, bias)


def _small_linear_native(x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    if not x.is_contiguous():
        x = _unit_rows(x)
    if not weight.is_contiguous():
        weight = _unit_rows(weight)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    _native.launch(
        _native._C.small_linear, x,
        x.data_ptr(), x.stride(0) if M > 1 else K,
        weight.data_ptr(), weight.stride(0) if N > 1 else K,
        0 if bias is None else bias.data_ptr(),
        y.data_ptr(), N, M, N, K,
    )
    return y


register("small_linear", "torch")(small_linear_reference)
register("small_linear", "cpu")(_small_linear_native)


# ---- torch.library registration (opaque to torch.compile, with a fake implementation) -------


@torch.library.custom_op("fastdecode::small_linear", mutates_args=())
def _small_linear_op(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return run("small_linear", x.device, x, weight, bias)


@_small_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


# ---- public, validated entry point ----------------------------------------------------------


def small_linear(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32, fast on the CPU for a few rows (1 to about 64).

    Args:
        x: float32 ``[..., K]``: any number of leading dims (flattened into M rows) and any
            strides (when its rows lack unit inner stride, a contiguous copy is used).
        weight: float32 ``[N, K]`` (``nn.Linear.weight``); rows with unit inner stride are
            read in place, any other layout is copied on every call.
        bias: float32 ``[N]`` or None. It is added after the dot product.

    All three share one device. On the CPU the ``cpu`` backend runs (fastdecode._C), on any
    other device the ``torch`` backend, ``F.linear``; ``use_backend`` / ``FASTDECODE_BACKEND``
    force either. M, N or K may be 0 (K = 0 gives the bias, or zeros).

    Returns:
        float32 ``[..., N]`` (x's leading dims), a new contiguous tensor.

    Inference only: the op has no backward. When grad mode is on and an input requires grad,
    it returns ``F.linear(x, weight, bias)`` instead (differentiable; its rounding may differ
    from the kernel's in the last bits).
    """
    _validate.tensor("x", x, torch.float32)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., K], found shape {tuple(x.shape)}")
    _validate.tensor("weight", weight, torch.float32, 2, "[N, K]")
    K = x.shape[-1]
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, K] with K = x.shape[-1] = {K}, found "
                         f"{tuple(weight.shape)}")
    named = [("x", x), ("weight", weight)]
    if bias is not None:
        _validate.tensor("bias", bias, torch.float32, 1, "[N]")
        _validate.shape("bias", bias, (weight.shape[0],), "[N]")
        named.append(("bias", bias))
    _validate.same_device(named)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    return small_linear_unchecked(x, weight, bias)


def small_linear_unchecked(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`small_linear` without its argument checks and autograd fallback, for callers
    that made them already (:func:`fastdecode.hf.use_cpu_linears` per layer call): wrong
    shapes here reach the kernel (which re-checks only sizes, strides and null pointers)."""
    lead = x.shape[:-1]
    K = x.shape[-1]
    y = dispatch("small_linear", _small_linear_op, x.device, x.reshape(lead.numel(), K),
                 weight, bias)
    return y.reshape(*lead, weight.shape[0])


# ---- the native kernel's instruction-set paths ------------------------------------------------


def small_linear_isas() -> list[str]:
    """The ``cpu`` backend's paths this build and CPU support, fastest first: a subset of
    ``["avx512", "avx2", "scalar"]`` (``[]`` when the extension is not built)."""
    return list(_native._C.small_linear_isas()) if _native.cpu_built() else []


def small_linear_isa() -> str | None:
    """The path the ``cpu`` backend takes: the fastest supported one, unless the environment
    variable ``FASTDECODE_CPU_ISA`` (avx512 | avx2 | scalar; read once, at the first call) or
    :func:`set_small_linear_isa` chose another. None when the extension is not built."""
    return _native._C.small_linear_isa() if _native.cpu_built() else None


def set_small_linear_isa(name: str) -> None:
    """Forces the ``cpu`` backend's path for the whole process (tests, benchmarks). Rows stay
    bitwise identical across batch sizes on one path, not across paths."""
    if not _native.cpu_built():
        raise RuntimeError("the native extension fastdecode._C is not built")
    supported = small_linear_isas()
    if name not in supported:
        raise ValueError(f"name must be one of the supported paths {supported}, found {name!r}")
    _native._C.set_small_linear_isa(name)
