"""Running a model's ``nn.Linear`` layers through :func:`fastdecode.ops.small_linear` on the CPU,
where the few-row forwards of speculative decoding are badly served by BLAS sgemm.

``use_cpu_linears(model)`` gives every plain ``nn.Linear`` of the model a forward that calls
``small_linear`` when the call qualifies (float32 CPU input and weight, at most ``max_rows``
rows, no autograd needed) and ``F.linear`` otherwise. The weight and bias are read from the
module at each call, never copied: tied weights (an LM head sharing the embedding), later
weight updates and ``load_state_dict`` are all seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdecode.ops import _validate
from fastdecode.ops.linear import small_linear_unchecked

_MARK = "_fastdecode_cpu_linear"


def _qualifies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               max_rows: int) -> bool:
    """Whether small_linear can take this call: float32 CPU tensors of matching shapes, at
    most ``max_rows`` rows, and nothing that autograd would need to track."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or x.dim() < 1 or weight.dim() != 2
            or x.shape[-1] != weight.shape[1]):
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return math.prod(x.shape[:-1]) <= max_rows


def _make_forward(module: torch.nn.Linear, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        if _qualifies(x, weight, bias, max_rows):
            return small_linear_unchecked(x, weight, bias)
        return F.linear(x, weight, bias)

    setattr(forward, _MARK, True)
    return forward


class CpuLinears:
    """What :func:`use_cpu_linears` changed: :meth:`restore` (or leaving a ``with`` block)
    gives the modules back their stock forward."""

    def __init__(self, modules: list[torch.nn.Linear], max_rows: int) -> None:
        self.modules = modules
        self.max_rows = max_rows

    def restore(self) -> None:
        """Puts every patched module back (idempotent)."""
        for module in self.modules:
            if getattr(module.__dict__.get("forward"), _MARK, False):
                del module.forward
        self.modules = []

    def __enter__(self) -> CpuLinears:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"CpuLinears({len(self.modules)} modules, max_rows={self.max_rows})"


def use_cpu_linears(model: torch.nn.Module, max_rows: int = 64) -> CpuLinears:
    """Makes every ``nn.Linear`` of ``model`` run :func:`fastdecode.ops.small_linear` for calls
    of at most ``max_rows`` rows (the input's leading dims multiplied) with float32 CPU input
    and weight, when autograd is off for them (grad mode disabled, or no input requiring
    grad); other calls run the stock ``F.linear``.

    On the reference CPU (one Zen 4 core, SmolLM2-135M shapes, weights streamed from memory;
    bench/results/cpu-amd-epyc/cpu_linear.md) the kernel took 0.15x to 0.9x the time of
    ``F.linear`` for 1 to 16 rows, and an 8-token tree forward of SmolLM2-135M 0.53x; the gap
    narrows as rows grow (BLAS catches up past a few dozen), hence ``max_rows``. Off x86 only
    the portable path exists: measure before using it there.
    The kernel runs on the calling thread only: with several torch threads, BLAS spreads a
    call over cores and may win sooner.

    Only modules that use ``nn.Linear.forward`` unchanged are patched: subclasses that override
    ``forward``, and modules that already carry an instance-level ``forward`` (e.g. a hook
    wrapper, or an earlier :func:`use_cpu_linears`), are left alone. Weights are read from the
    module at every call, never copied (tied weights keep working).

    Returns:
        a :class:`CpuLinears` handle: ``.restore()`` undoes the change; it is also a context
        manager (``with use_cpu_linears(model): ...``). ``.modules`` lists the patched modules.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    _validate.integer("max_rows", max_rows, 0)
    patched = []
    for module in model.modules():
        if (not isinstance(module, torch.nn.Linear)
                or type(module).forward is not torch.nn.Linear.forward
                or "forward" in module.__dict__):
            continue
        module.forward = _make_forward(module, max_rows)
        patched.append(module)
    return CpuLinears(patched, max_rows)
