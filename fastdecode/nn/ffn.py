"""A transformer feed-forward block whose projections are structured (or dense):
``fc2(act(fc1(x)))`` with GELU (tanh), or SwiGLU where by default gate and up are ONE
structured ``d -> 2f`` layer (the reference's fused layout: gate is ``fc1``'s outputs
``[0, f)``, up is ``[f, 2f)``, so LowRank and BlockDense share their first factor between gate
and up), or optionally two separate structured ``d -> f`` layers (``fc1`` the gate, ``up`` the
up projection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.nn.structured_linear import (
    BlockDenseLinear,
    LowRankLinear,
    StructuredLinear,
    autocast_args,
    linear_from_dense,
    linear_params,
    make_linear,
)
from fastdecode.ops import _validate
from fastdecode.ops.structured import swiglu_up

ACTIVATIONS = ("swiglu", "gelu")
GATE_UP = ("fused", "separate")


def _check_options(activation: str, gate_up: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'swiglu' or 'gelu', found {activation!r}")
    if gate_up not in GATE_UP:
        raise ValueError(f"gate_up must be 'fused' or 'separate', found {gate_up!r}")
    if gate_up == "separate" and activation != "swiglu":
        raise ValueError("gate_up='separate' needs activation='swiglu'")


class StructuredFFN(nn.Module):
    """``y = fc2(act(fc1(x)))`` over ``[..., d_model]`` inputs.

    Args:
        d_model: model width.
        d_ff: hidden width f (SwiGLU: fc1 is ``d_model -> 2*d_ff``; GELU: ``d_model -> d_ff``).
        kind: ``"lowrank"``, ``"blockdense"``, ``"blockshuffle"`` or ``"dense"``; fc1 and fc2
            get the same structure, rank and blocks, as in the paper.
        rank: for lowrank and blockdense (at most ``min(d_model, d_ff)``).
        blocks: for blockdense and blockshuffle (must divide the widths involved).
        activation: ``"swiglu"`` or ``"gelu"`` (tanh approximation, the paper's).
        gate_up: with SwiGLU, ``"fused"`` (default, the reference's: one ``d -> 2f``
            structured layer; LowRank params ``r(d + 2f) + r(f + d)``) or ``"separate"`` (gate
            ``fc1`` and ``up``, each ``d -> f``; ``2r(d + f) + r(f + d)``).
        bias: biases on every projection.
        kwargs: init, merge_threshold, device, dtype (see the linear classes).

    With SwiGLU and a LowRank or BlockDense fc1 without bias, a call that takes the structured
    path runs :func:`fastdecode.ops.structured.swiglu_up` (the up-projection fused with SwiGLU).
    """

    def __init__(self, d_model: int, d_ff: int, kind: str = "lowrank", rank: int | None = None,
                 blocks: int | None = None, activation: str = "swiglu", bias: bool = False,
                 gate_up: str = "fused", **kwargs) -> None:
        super().__init__()
        self.d_model = _validate.integer("d_model", d_model, 1)
        self.d_ff = _validate.integer("d_ff", d_ff, 1)
        _check_options(activation, gate_up)
        self.kind, self.activation, self.gate_up = kind, activation, gate_up
        fused = activation == "swiglu" and gate_up == "fused"
        self.fc1 = make_linear(kind, d_model, 2 * d_ff if fused else d_ff, rank, blocks, bias,
                               **kwargs)
        self.fc2 = make_linear(kind, d_ff, d_model, rank, blocks, bias, **kwargs)
        if gate_up == "separate":
            self.up = make_linear(kind, d_model, d_ff, rank, blocks, bias, **kwargs)

    @classmethod
    def from_dense(cls, fc1: nn.Linear | torch.Tensor, fc2: nn.Linear | torch.Tensor,
                   kind: str, rank: int | None = None, blocks: int | None = None,
                   activation: str = "swiglu", gate_up: str = "fused",
                   **kwargs) -> StructuredFFN:
        """Each projection's best fit (see the linear classes' ``from_dense``): ``fc1`` is the
        ``[2f, d]`` (SwiGLU: gate rows, then up rows) or ``[f, d]`` (GELU) weight or
        ``nn.Linear``, ``fc2`` the ``[d, f]`` one. With ``gate_up="separate"`` the gate and
        up halves of ``fc1`` are fitted separately. Biases come along with ``nn.Linear``
        inputs."""
        _check_options(activation, gate_up)
        w1, b1 = (fc1.weight, fc1.bias) if isinstance(fc1, nn.Linear) else (fc1, None)
        w2 = fc2.weight if isinstance(fc2, nn.Linear) else fc2
        d, f = w2.shape
        expected = (2 * f if activation == "swiglu" else f, d)
        if tuple(w1.shape) != expected:
            raise ValueError(f"fc1 must be [{'2f' if activation == 'swiglu' else 'f'}, d] = "
                             f"{expected} for fc2 [d, f] = {tuple(w2.shape)}, found "
                             f"{tuple(w1.shape)}")
        ffn = cls.__new__(cls)
        nn.Module.__init__(ffn)
        ffn.d_model, ffn.d_ff = d, f
        ffn.kind, ffn.activation, ffn.gate_up = kind, activation, gate_up
        if gate_up == "separate":
            halves = [_linear(w1[i * f:(i + 1) * f], None if b1 is None else b1[i * f:(i + 1) * f])
                      for i in range(2)]
            ffn.fc1 = linear_from_dense(kind, halves[0], rank, blocks, **kwargs)
            ffn.up = linear_from_dense(kind, halves[1], rank, blocks, **kwargs)
        else:
            ffn.fc1 = linear_from_dense(kind, fc1, rank, blocks, **kwargs)
        ffn.fc2 = linear_from_dense(kind, fc2, rank, blocks, **kwargs)
        return ffn

    def projections(self) -> list[nn.Module]:
        """fc1, fc2 and (separate gate/up) up."""
        return [self.fc1, self.fc2] + ([self.up] if self.gate_up == "separate" else [])

    @property
    def num_params(self) -> int:
        """Weight parameters of every projection (biases excluded)."""
        return sum(linear_params(fc) for fc in self.projections())

    def flops(self, tokens: int) -> int:
        """Multiply-accumulates of the two projections for ``tokens`` tokens."""
        return self.num_params * _validate.integer("tokens", tokens, 0)

    def merge(self) -> None:
        """Pre-merges both projections (see :meth:`StructuredLinear.merge`); dense is a no-op."""
        for fc in self.projections():
            if isinstance(fc, StructuredLinear):
                fc.merge()

    def unmerge(self) -> None:
        """Drops the merged copies."""
        for fc in self.projections():
            if isinstance(fc, StructuredLinear):
                fc.unmerge()

    def _fused_up(self, x2: torch.Tensor) -> bool:
        fc1 = self.fc1
        if self.activation != "swiglu" or self.gate_up != "fused" or \
                type(fc1) not in (LowRankLinear, BlockDenseLinear):
            return False
        if fc1.bias is not None:
            return False
        needs_grad = torch.is_grad_enabled() and (
            x2.requires_grad or any(p.requires_grad for p in fc1.parameters()))
        return fc1.path(x2.shape[0], needs_grad, x2.device) == "structured"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have d_model = {self.d_model} in its last dim, found "
                             f"shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        if self._fused_up(x2):
            v = self.fc1.v if self.fc1.v.dim() == 3 else self.fc1.v[None]
            h = swiglu_up(*autocast_args(x2, v, self.fc1.u))
        elif self.gate_up == "separate":
            h = F.silu(self.fc1(x2)) * self.up(x2)
        elif self.activation == "swiglu":
            gate, up = self.fc1(x2).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.fc1(x2), approximate="tanh")
        return self.fc2(h).reshape(*lead, self.d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, kind={self.kind!r}, "
                f"activation={self.activation!r}, gate_up={self.gate_up!r}")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding (not copying) ``weight`` and ``bias``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach())
    return layer
